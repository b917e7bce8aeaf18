"""Ingest: does the controller keep up with a fleet? Its drain rate against a bare subscriber's,
and a fleet of hosts held at 1 s for a minute.

Snapshots are real agent output (8 simulated GPUs, host metrics, 2 vLLM replicas scraped over
HTTP), recorded once by bench/data/record_snapshots.py; bench/ingest_publisher.py replays them as
hosts ``bench-0000``.. from its own process (paho-mqtt, pre-encoded bodies), QoS 1, to a private
Mosquitto running the shipped systemd/mosquitto.conf. Two workloads, by the recording replayed:

steady  (default) bench/data/steady.toml: every GPU busy with a load pattern of its own (sine,
        square, constant), nothing faulty: a fleet on a normal day. 120 snapshots, a whole
        number of every period, so a host's replay wraps without a jump.
faults  systemd/scenario.example.toml, the fault demo (a GPU lost, XIDs, ECC errors, throttling,
        a hot GPU) on every host at once: a storm of alerts and anomaly detections, each an
        SQLite write, log lines and an MQTT publish. 60 snapshots; each host's replay jumps
        from the scenario's end back to its start.

a. Drain. Each consumer first runs once so that the broker holds its persistent session (and
   its subscriptions, whatever they are), and is stopped; the publisher then loads a backlog
   into that session and exits; the consumer starts again and the bench times how fast it
   works the backlog off: messages per second of wall time between 10 % and 90 % of it, and
   the consumer's CPU per message from /proc/PID/task/*/schedstat over the same stretch. The
   publisher's CPU is never in the window. Consumers: a bare aiomqtt subscriber that only
   counts (persistent session, QoS 1, the controller's telemetry filter), and the controller.
b. Fleet hold. A fresh controller, then HOSTS hosts at 1 s for SECONDS: published vs accepted,
   seqs missing, drops by reason, and /metrics sampled every few seconds for the lag (now - ts
   of the newest processed snapshot), whose slope must not be positive beyond noise.
Both phases report the alerts fired and anomalies detected meanwhile (the controller's
llmops_alerts_fired_total and llmops_anomalies_detected_total) and the alerts firing at the end
by severity. One critical alert in a hold is the bench's own: host_offline for ``bench-probe``,
the host that checks the subscription, once it falls silent.

    python bench/ingest.py [--workload steady|faults] [--quick] [--hosts 2000] [--seconds 60]
                           [--backlog 30000] [--consumers bare,controller] [--profile FILE]
Writes bench/results/ingest.json (steady) or bench/results/ingest-faults.json (faults), not
with --quick or --profile, and prints a short table. The consumers and phases are in
bench/ingest_consumers.py and bench/ingest_phases.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from ingest_consumers import BareSubscriber, BenchError, Consumer, Controller
from ingest_phases import drain, hold, stopped_on_error

import llm_ops_helper.controller as controller_package
from llm_ops_helper.broker import LocalMosquitto, mosquitto_binary

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.5


@dataclass(frozen=True)
class Workload:
    """A recording to replay, where its results go, and what it is."""

    name: str
    data: Path
    out: Path
    made_by: str


_AGENT = ("bench/data/record_snapshots.py (the real agent: 8 simulated GPUs with {}, host "
          "metrics, 2 vLLM replicas scraped from tests/fixtures/metrics/vllm.txt with counters "
          "rising)")
WORKLOADS = {
    "steady": Workload("steady", HERE / "data" / "telemetry-8gpu-2vllm-steady.jsonl.gz",
                       HERE / "results" / "ingest.json",
                       _AGENT.format("bench/data/steady.toml: load patterns, no faults; 180 s "
                                     "of warm-up dropped, 120 s kept")),
    "faults": Workload("faults", HERE / "data" / "telemetry-8gpu-2vllm.jsonl.gz",
                       HERE / "results" / "ingest-faults.json",
                       _AGENT.format("systemd/scenario.example.toml: the fault demo on every "
                                     "host")),
}


def versions() -> dict[str, str]:
    mosq = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True)
    first = (mosq.stdout or mosq.stderr).splitlines()[0]
    return {"mosquitto": first.removeprefix("mosquitto version ").strip(),
            "aiomqtt": metadata.version("aiomqtt"), "paho-mqtt": metadata.version("paho-mqtt"),
            "msgspec": metadata.version("msgspec"), "python": platform.python_version()}


def code_version() -> dict[str, Any]:
    """The commit measured, and the files of the controller changed on top of it."""
    def git(*argv: str) -> str:
        run = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=HERE.parent)
        return run.stdout.rstrip() if run.returncode == 0 else ""

    # rstrip only: each porcelain line starts with a two-letter status and a space, and a
    # leading " M" stripped off the first line cut the first letter off its file name.
    changed = git("status", "--porcelain", "--", "controller", "proto", "sdk").splitlines()
    # The editable install links each module into build/ one by one: a module added since it
    # was made is not there, and the controller that runs is not quite the tree's.
    installed = Path(controller_package.__file__).parent
    tree = HERE.parent / "controller"
    absent = sorted(str(f.relative_to(tree)) for f in tree.rglob("*.py")
                    if not (installed / f.relative_to(tree)).exists())
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted": sorted(line[3:] for line in changed),
            "controller_modules_not_installed": absent}


def snapshot_sizes(data: Path) -> dict[str, int]:
    with gzip.open(data, "rb") as f:
        sizes = sorted(len(line.strip()) for line in f if line.strip())
    return {"count": len(sizes), "bytes_median": sizes[len(sizes) // 2],
            "bytes_min": sizes[0], "bytes_max": sizes[-1]}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    consumers = args.consumers.split(",")
    workload: Workload = args.workload
    data = workload.data
    if not data.exists():
        raise BenchError(f"{data} is missing: record it with bench/data/record_snapshots.py")
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "workload": workload.name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions(),
        "code": code_version(),
        "snapshot": {**snapshot_sizes(data), "source": str(data.relative_to(HERE.parent)),
                     "made_by": workload.made_by},
        "setup": "one Mosquitto (systemd/mosquitto.conf), one publisher process (paho-mqtt, "
                 "pre-encoded bodies, one connection for all hosts), QoS 1 throughout; CPU from "
                 "/proc/PID/task/*/schedstat; all processes on this machine's cores",
        "quick": args.quick,
    }
    if args.workdir:
        result["workdir"] = str(args.workdir)  # the broker's and the consumers' logs are there
    rounds = max(1, math.ceil(args.backlog / args.hosts))
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        broker = LocalMosquitto(work / "mosquitto")
        await broker.start()
        try:
            drains: dict[str, Any] = {"hosts": args.hosts, "rounds_per_host": rounds}
            if "bare" in consumers and not args.skip_drain:
                bare = BareSubscriber(broker, work)
                drains["bare"] = await stopped_on_error(
                    bare, drain(broker, bare, data, args.hosts, rounds, 0.05))
                await bare.forget_session()
            if "controller" in consumers and not args.skip_drain:
                ctl = Controller(broker, work, work / "state-drain", args.profile)
                drains["controller"] = await stopped_on_error(
                    ctl, drain(broker, ctl, data, args.hosts, rounds, args.drain_poll_s))
            if "bare" in drains and "controller" in drains:
                ratio = drains["controller"]["rate_msgs_per_s"] / drains["bare"]["rate_msgs_per_s"]
                drains["ratio_controller_to_bare"] = round(ratio, 3)
                # What the rates would be with a core each: robust to other load on the machine.
                drains["ratio_by_cpu_per_msg"] = round(
                    drains["bare"]["cpu_us_per_msg"] / drains["controller"]["cpu_us_per_msg"], 3)
                drains["target_ratio"] = TARGET_RATIO
                drains["meets_target"] = ratio >= TARGET_RATIO
            if not args.skip_drain:
                result["drain"] = drains
            if not args.skip_hold:
                holder: Consumer
                if "controller" in consumers:
                    # Profiled where nothing else is: the drain's controller has it if it runs.
                    profile = args.profile if args.skip_drain else None
                    holder = Controller(broker, work, work / "state-hold", profile)
                else:
                    holder = BareSubscriber(broker, work)
                held = await stopped_on_error(holder, hold(broker, holder, data,
                                                           args.hosts_hold, args.seconds,
                                                           args.sample_s))
                result["hold"] = {"consumer": holder.name, **held}
        finally:
            for child in psutil.Process().children(recursive=True):
                if child.name() != "mosquitto":
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            await broker.stop()
    return result


def _alerts(d: dict[str, Any]) -> str:
    firing = ", ".join(f"{k} {v}" for k, v in sorted(d.get("alerts_firing_at_end", {}).items()))
    return (f"alerts fired {d.get('alerts_fired')}, anomalies detected "
            f"{d.get('anomalies_detected')}" + (f" (firing at the end: {firing})" if firing else ""))


def table(result: dict[str, Any]) -> str:
    lines = [f"workload {result['workload']}: {result['snapshot']['source']}"]
    rows: list[tuple[str, ...]] = [("", "rate msg/s", "CPU us/msg", "cores busy", "peak RSS MB")]
    drains = result.get("drain", {})
    for name in ("bare", "controller"):
        if name in drains:
            d = drains[name]
            rows.append((f"drain {name}", str(d["rate_msgs_per_s"]), str(d["cpu_us_per_msg"]),
                         str(d["cpu_cores_busy"]), str(d["peak_rss_mb"])))
            if d["lost"]:
                rows.append((f"  LOST {d['lost']} of {d['backlog']}: {d['lost_note']}",))
    if len(rows) > 1:
        lines += [f"{row[0]:<18}" + "".join(f"{c:>13}" for c in row[1:]) for row in rows]
    if "alerts_fired" in drains.get("controller", {}):
        lines.append(f"  controller drain of {drains['controller']['backlog']}: "
                     + _alerts(drains["controller"]))
    if any(drains.get(name, {}).get("lost") for name in ("bare", "controller")):
        lines.append("drain: FAIL (messages lost)")
    if "ratio_controller_to_bare" in drains:
        lines.append(f"controller/bare drain ratio {drains['ratio_controller_to_bare']} "
                     f"(by CPU per message {drains['ratio_by_cpu_per_msg']}; "
                     f"target >= {TARGET_RATIO}): "
                     f"{'PASS' if drains['meets_target'] else 'FAIL'}")
    if "hold" in result:
        h = result["hold"]
        lines.append(f"hold ({h['consumer']}): {h['hosts']} hosts x {h['seconds']} s at "
                     f"{h['interval_s']} s: published {h['published']}, "
                     f"{'accepted' if 'accepted' in h else 'received'} "
                     f"{h['received_or_accepted']}, lost {h['lost']}"
                     + (f" ({h['lost_note']})" if h["lost_note"] else ""))
        if "seq_missing" in h:
            lines.append(f"  seq missing {h['seq_missing']}, dropped {h['dropped'] or 0}, "
                         f"lag {h['lag_start_s']} -> {h['lag_end_s']} s "
                         f"(slope {h['lag_slope_s_per_s']} s/s), CPU "
                         f"{h['cpu_pct_of_one_core']} % of a core "
                         f"({h['cpu_us_per_msg']} us/msg), RSS "
                         f"{h['rss_mb_start_end'][0]} -> {h['rss_mb_start_end'][1]} MB")
            lines.append(f"  {_alerts(h)}")
        lines.append(f"  publisher kept schedule: {h['publisher_kept_schedule']} "
                     f"(max late {h['publisher']['late_max_s']} s); "
                     f"{'PASS' if h['pass'] else 'FAIL'} (no loss, no growing lag)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="steady",
                        help="the recording replayed: steady (default), a fleet on a normal day; "
                             "faults, the fault demo on every host at once")
    parser.add_argument("--quick", action="store_true",
                        help="small numbers, about a minute: a smoke test; writes no results")
    parser.add_argument("--hosts", type=int, help="hosts in the fleet hold (default 2000)")
    parser.add_argument("--seconds", type=int, help="length of the fleet hold (default 60)")
    parser.add_argument("--backlog", type=int, help="messages in each drain (default 30000)")
    parser.add_argument("--sample-s", type=float, help="/metrics sampling during the hold")
    parser.add_argument("--consumers", default="bare,controller",
                        help="comma-separated: bare, controller (the hold uses the controller "
                             "if it is listed, else the bare subscriber)")
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument("--skip-hold", action="store_true")
    parser.add_argument("--profile", type=Path,
                        help="run the draining controller (the holding one with --skip-drain) "
                             "under cProfile, writing this file; bench/ingest_profile.py reads it")
    parser.add_argument("--workdir", type=Path,
                        help="keep the broker's and the consumers' files and logs here")
    parser.add_argument("--out", type=Path,
                        help="results file (default: the workload's, under bench/results/, "
                             "but none with --profile)")
    args = parser.parse_args()
    args.workload = WORKLOADS[args.workload]
    # A profiled controller runs slower: its figures go to the workload's file only if asked.
    args.out = args.out or (None if args.profile else args.workload.out)
    quick = args.quick
    args.hosts_hold = args.hosts or (200 if quick else 2000)
    args.seconds = args.seconds or (15 if quick else 60)
    args.backlog = args.backlog or (10000 if quick else 30000)
    args.hosts = min(args.hosts_hold, args.backlog)  # drain hosts: a few snapshots each
    args.sample_s = args.sample_s or (1.0 if quick else 5.0)
    # A scrape walks every GPU of the fleet (about 0.5 s of the controller's loop at 2,000
    # hosts): poll the draining controller seldom, and report what the scrapes took.
    args.drain_poll_s = max(1.0, args.hosts / 400)
    try:
        result = asyncio.run(measure(args))
    except BenchError as exc:
        sys.exit(f"ingest: FAILED: {exc}")
    if not quick and args.out is not None:
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
