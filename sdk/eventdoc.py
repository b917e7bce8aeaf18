"""What each logged event means (kept by hand), and the catalogue rendered as Markdown or text.

``DESCRIPTIONS`` is keyed by event name, or by ``daemon:event`` where one name means different
things in different daemons. ``tests/sdk/test_eventcatalogue.py`` fails when an event the
source emits has no description here, when one here is no longer emitted, and when
``docs/events.md`` is not what :func:`markdown` writes now. Regenerate it with
``python -m llm_ops_helper.eventdoc docs/events.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from llm_ops_helper.eventcatalogue import Catalogue, Event, scan

REGENERATE = "python -m llm_ops_helper.eventdoc docs/events.md"

UNITS = {"agent": "llmops-agent.service", "controller": "llmops-controller.service",
         "gateway": "llmops-gateway.service",
         "simserver": "stderr of a `sim` runtime replica (the agent keeps its last line)",
         "cli": "the `llmops` command"}

DESCRIPTIONS: dict[str, str] = {
    # -- shared by every daemon (sdk/lifecycle.py) --
    "agent_stopping": "SIGTERM or SIGINT received; shutting down (a second signal exits at once).",
    "controller_stopping": "SIGTERM or SIGINT received; shutting down (a second signal exits at "
                           "once).",
    "gateway_stopping": "SIGTERM or SIGINT received; shutting down (a second signal exits at "
                        "once).",
    "sim_stopping": "SIGTERM or SIGINT received; the simulator shuts down.",
    "shutdown_timeout": "Graceful shutdown did not finish within `limit_s`; the process exits "
                        "anyway.",
    "broker_connected": "Connected (again) to Mosquitto; `connects` counts sessions since start.",
    "broker_disconnected": "Left the broker on shutdown.",
    "broker_tls_failed": "TLS handshake with the broker failed; `hint` says what to check. "
                         "Retried after `retry_in_s`.",
    "broker_unreachable": "The broker could not be reached, refused the login or dropped the "
                          "session; `hint` says what to check when it can tell (the user and "
                          "password file of a refused login, TLS or a client certificate for a "
                          "CONNECT never answered). Retried with backoff after `retry_in_s`.",
    # -- agent --
    "agent_started": "The agent is up: its collectors, GPUs and broker.",
    "agent_stopped": "The agent stopped; `unsent` telemetry messages were still queued.",
    "artifact_blob_wrong_size": "A cached model blob has the wrong size; it is fetched again.",
    "artifact_download_interrupted": "A model download broke off; it resumes where it stopped.",
    "artifact_evicted": "A cached model blob was deleted (by command, or least recently used "
                        "to make room).",
    "artifact_failed": "A model blob could not be fetched from the controller; the replica "
                       "that needs it fails.",
    "artifact_fetched": "A model blob was downloaded and its SHA-256 checked.",
    "artifact_resume_mismatch": "A resumed download did not match; it restarts from the start.",
    "collector_failed": "A telemetry collector (NVML, host, replica metrics) failed this "
                        "interval; the others still report.",
    "command_applied": "A signed command from the controller was carried out.",
    "command_duplicate": "A command already applied arrived again (redelivery); ignored.",
    "agent:command_failed": "A valid command could not be carried out; the error goes back to "
                            "the controller.",
    "command_internal_error": "A bug while applying a command; the traceback is in "
                              "`exception`.",
    "command_key_unreadable": "A command verification key file could not be read.",
    "command_keys_loaded": "The keys that verify the controller's signed commands, at start.",
    "command_keys_reloaded": "The command keys directory changed; keys added or removed.",
    "command_rejected": "A command failed decoding, signature, expiry or replay checks and was "
                        "dropped; `reason` says which.",
    "commands_disabled": "No command key is configured: the agent reports telemetry but runs "
                         "no replicas.",
    "host_event": "A hardware event on this host (an XID error, a GPU lost, throttling).",
    "message_unexpected_topic": "An MQTT message arrived on a topic the agent does not handle.",
    "nvml_unavailable": "NVML could not be loaded; GPUs are simulated instead.",
    "replica_accepted": "The controller asked for a replica and the agent took it on.",
    "replica_adopted": "After an agent restart, a replica still running was taken back.",
    "replica_drain_cut_short": "A draining replica was told to stop at once.",
    "replica_drain_timeout": "A replica still had requests in flight when its drain time ran "
                             "out; it is stopped anyway.",
    "replica_drained": "A replica finished its in-flight requests before stopping.",
    "replica_internal_error": "A bug in a replica's life cycle; the traceback is in "
                              "`exception`.",
    "replica_leftovers_killed": "Processes left behind by a stopped replica were killed.",
    "agent:replica_lost": "A replica recorded before an agent restart is no longer running.",
    "replica_not_restored": "A replica recorded before an agent restart cannot be restored "
                            "(its runtime is not available).",
    "replica_orphan_killed": "A replica process the agent had no record of was killed.",
    "replica_port_wait": "A replica's port is still taken; waiting before starting it.",
    "replica_probe_failed": "A replica's health probe failed; after enough failures it is "
                            "restarted.",
    "agent:replica_ready": "A replica answers its health probe and serves.",
    "replica_restarting": "A replica's process ended; it is restarted after `delay_s` "
                          "(`last_line` is its last output).",
    "replica_started": "A replica's server process was started.",
    "replica_state_changed": "A replica moved to a new state (reported to the controller).",
    "replica_stopped": "A replica's process ended after being stopped.",
    "agent:replica_stopping": "A replica is being stopped, drained first if `drain`.",
    "replica_unknown_left_running": "A process that looks like a replica could not be killed; "
                                    "it is left running.",
    "runtimes_available": "Which runtimes (llama.cpp, vLLM, sim) this host can run, and why "
                          "the others cannot.",
    "state_file_write_failed": "The agent's replica state file could not be written; retried.",
    "state_file_written_again": "The replica state file is written again after a failure.",
    "supervisor_closed": "The replica supervisor stopped; replicas may be left running for the "
                         "next agent.",
    "watchdog_too_short": "The systemd watchdog is shorter than the telemetry interval allows.",
    # -- controller --
    "alert_fired": "An alert rule started firing.",
    "alert_publish_failed": "An alert could not be published to the broker; kept and retried.",
    "alert_resolved": "A firing alert is resolved.",
    "alerts_restored": "Alerts still firing when the controller last stopped, loaded again.",
    "anomaly_detected": "An anomaly detector flagged a telemetry series (`score`, `value` "
                        "against `expected`).",
    "api_call": "A mutating HTTP API call (POST, PUT, PATCH, DELETE), refused ones too, as "
                "written to the audit log: who, what, and the status; reads are not logged.",
    "audit_write_failed": "An API call could not be written to the audit table.",
    "autoscale_checkpoint_unreadable": "The autoscaler's saved state could not be read; it "
                                       "starts fresh.",
    "autoscale_decision": "The autoscaler decided a replica count for a deployment, and why.",
    "autoscale_restored": "The autoscaler's saved state was loaded at start.",
    "backoff": "Replicas of a deployment keep failing; replacements wait.",
    "blob_collected": "A model blob no version uses any more was deleted.",
    "blob_delete_failed": "A model blob could not be deleted.",
    "blob_temp_files_removed": "Unfinished uploads left by an earlier run were removed.",
    "blobs_collected": "Unused model blobs were deleted.",
    "bootstrap_token_registered": "The bootstrap admin API token was registered from its file.",
    "canary_failed": "A canary's new version did worse than the old one; the rollout is rolled "
                     "back.",
    "canary_inconclusive": "A canary did not see enough requests to judge.",
    "canary_passed": "A canary's new version did as well as the old one; the rollout goes on.",
    "canary_restarted": "A canary's comparison started again.",
    "canary_started": "A rollout sent part of the traffic to the new version.",
    "checkpoint_failed": "The controller's state checkpoint could not be written.",
    "command_expired_unsent": "A command expired before the broker came back; not sent.",
    "controller:command_failed": "An agent reported that a command failed.",
    "command_not_sent": "A command to an agent could not be queued.",
    "command_publish_failed": "Publishing a command to the broker failed; retried.",
    "command_resent": "A command got no answer in time and was sent again.",
    "command_result_error": "An agent answered a command with an error.",
    "command_sent": "A signed command was sent to an agent.",
    "controller_started": "The controller is up: its HTTP address, broker and state directory.",
    "controller_stopped": "The controller stopped.",
    "deployment_applied": "A deployment was created or its spec changed.",
    "deployment_deleted": "Every replica of a deleted deployment stopped; it is gone.",
    "deployment_deleting": "A deployment is being deleted; its replicas stop.",
    "deployment_phase": "A deployment changed phase (progressing, available, degraded...).",
    "deployment_scaled": "A deployment's replica count was changed.",
    "detectors_restored": "Anomaly detectors' saved state was loaded at start.",
    "host_forgotten": "A host offline for long enough was dropped with its series.",
    "host_offline": "A host went offline (`reason`: its Last Will, or telemetry stopped).",
    "host_online": "A host came online.",
    "ingest_internal_error": "A bug while handling an MQTT message; the traceback is in "
                             "`exception`.",
    "message_dropped": "An MQTT message was dropped (bad payload, bad signature, out of order); "
                       "`reason` says which.",
    "model_stage_changed": "A model version moved stage (e.g. staging to production).",
    "model_upload_failed": "A model upload was refused or broke off.",
    "model_version_registered": "A new model version was stored in the registry.",
    "orphan_stopped": "An agent runs a replica no deployment wants; it was told to stop it.",
    "periodic_task_failed": "A periodic controller task raised; it runs again next time.",
    "placement_refused": "No host has room for a replica (GPUs, memory); it stays pending.",
    "reconcile_failed": "A deployment's reconcile pass raised; retried next pass.",
    "replica_draining": "A replica is draining before it stops.",
    "replica_failed": "A replica failed; it will be replaced.",
    "controller:replica_lost": "A replica's host went away; the replica is replaced.",
    "replica_placed": "A replica was placed on a host and GPUs.",
    "controller:replica_ready": "A replica reported ready.",
    "replica_removed": "A replica's record was removed.",
    "controller:replica_stopping": "A replica was told to stop.",
    "rollback_completed": "A rollback finished: the older version serves again.",
    "rollback_started": "A deployment rolls back to an earlier version.",
    "rollout_completed": "A new version serves on every replica.",
    "rollout_failed": "A rollout failed; the deployment stays on (or returns to) the old "
                      "version.",
    "rollout_started": "A new version of a deployment started rolling out.",
    "store_pruned": "Telemetry older than the retention period was deleted.",
    "webhook_failed": "An alert webhook failed; retried after `retry_in_s`.",
    "webhook_refused": "An alert webhook answered with a client error; not retried.",
    "webhook_store_error": "Alerts for a webhook could not be read from the store.",
    # -- gateway --
    "controller_unreachable": "The gateway could not fetch routes from the controller; it "
                              "keeps the last ones.",
    "gateway_error": "A bug while handling a request; the traceback is in `exception`.",
    "gateway_listening": "The gateway is up and listening.",
    "gateway_stopped": "The gateway stopped.",
    "replica_suspect": "A replica failed requests; it gets none for `for_s` seconds.",
    "guard_blocked": "A guard blocked a request: the key, the model, the check and why, and "
                     "the input's hash and length (never its text).",
    "upstream_connect_failed": "A replica could not be reached; the request tries another.",
    "upstream_stream_failed": "A streamed response from a replica broke off.",
    "usage_write_failed": "Token usage could not be written.",
    # -- sim runtime --
    "sim_hanging": "The simulator hangs on purpose (a scenario fault).",
    "sim_loading": "The simulator is loading its model card.",
    "sim_ready": "The simulator serves.",
}


def description(daemon: str, event: str) -> str | None:
    return DESCRIPTIONS.get(f"{daemon}:{event}", DESCRIPTIONS.get(event))


def selected(catalogue: Catalogue, globs: list[str]) -> dict[str, list[Event]]:
    return {d: kept for d, events in catalogue.by_daemon().items()
            if (kept := [e for e in events
                         if not globs or any(fnmatch.fnmatchcase(e.name, g) for g in globs)])}


def _fields(e: Event) -> list[str]:
    return sorted(e.fields)


def _levels(e: Event) -> str:
    order = ["debug", "info", "warning", "error", "critical"]
    return ", ".join(sorted(e.levels, key=lambda lv: order.index(lv) if lv in order else 9))


def _where(e: Event) -> str:
    where = ", ".join(f"`{m}`" for m in sorted(e.modules))
    via = sorted(e.via - e.modules)
    return where + (f" via `{via[0]}`" if len(via) == 1 else
                    f" via {', '.join(f'`{v}`' for v in via)}" if via else "")


def markdown(catalogue: Catalogue) -> str:
    out = [
        "# Log events",
        "",
        f"<!-- Generated by `{REGENERATE}`; do not edit. Descriptions live in "
        "`sdk/eventdoc.py`. -->",
        "",
        "Every daemon writes one JSON object per line to standard output (systemd's journal "
        "under its unit). Every line has `event` (the names below), `level` and `timestamp` "
        "(UTC, ISO 8601); the agent's lines also carry `host`, bound at start. Events logged "
        "with an error also carry `exception`, the traceback as text. Fields are listed as "
        "the source passes them: a field is absent when the code has nothing to say.",
        "",
        "Read them with `llmops logs`: `journalctl -o cat -u llmops-agent | llmops logs "
        "--level warning`, or `llmops logs -u llmops-controller -f --deployment chat`. Times "
        "are shown in UTC, as the lines carry them. `llmops logs --catalogue` prints this list.",
        "",
        "The journal shows a system service's lines only to root and to members of the "
        "`systemd-journal` (or `adm`) group: join it (`sudo usermod -aG systemd-journal "
        "\"$USER\"`, then log in again) or run `sudo journalctl -o cat -u llmops-agent | "
        "llmops logs`.",
        "",
        "This list is read from the source (`llm_ops_helper.eventcatalogue`), so it "
        "cannot drift: a test fails when an event has no description or this file is stale.",
        "",
    ]
    for daemon, events in catalogue.by_daemon().items():
        out += [f"## {daemon}", "", f"Written by {UNITS.get(daemon, daemon)}: "
                f"{len(events)} events.", "",
                "| event | level | fields | description | where |",
                "| --- | --- | --- | --- | --- |"]
        for e in events:
            fields = ", ".join(f"`{f}`" for f in _fields(e)) or "—"
            text = (description(daemon, e.name) or "(no description)").replace("|", "\\|")
            out.append(f"| `{e.name}` | {_levels(e)} | {fields} | {text} | {_where(e)} |")
        out.append("")
    if catalogue.unresolved:
        out += ["## Not resolved from the source", ""]
        out += [f"- `{u.module}` line {u.line}: {u.why}" for u in catalogue.unresolved]
        out.append("")
    return "\n".join(out)


def text(catalogue: Catalogue, globs: list[str] | None = None) -> str:
    """The catalogue for a terminal: one event a line, then its fields."""
    out = []
    for daemon, events in selected(catalogue, globs or []).items():
        out.append(f"{daemon} ({UNITS.get(daemon, daemon)})")
        width = max(len(e.name) for e in events)
        for e in events:
            out.append(f"  {e.name:<{width}}  {_levels(e):<7}  "
                       f"{description(daemon, e.name) or ''}")
            if e.fields:
                out.append(f"  {'':<{width}}  {'':<7}  fields: {', '.join(_fields(e))}")
        out.append("")
    for u in catalogue.unresolved:
        out.append(f"not resolved: {u.module} line {u.line}: {u.why}")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the Markdown catalogue to the file named, or to standard output."""
    parser = argparse.ArgumentParser(prog="python -m llm_ops_helper.eventdoc",
                                     description="Generate docs/events.md from the source.")
    parser.add_argument("file", nargs="?", default="-",
                        help="where to write it (default: standard output)")
    args = parser.parse_args(argv)
    document = markdown(scan())
    if args.file == "-":
        sys.stdout.write(document)
    else:
        Path(args.file).write_text(document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
