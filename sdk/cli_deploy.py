"""``llmops deploy | scale | rollback | status | delete``: deployments of registry versions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llm_ops_helper.cli_format import (
    deployment_line,
    emit,
    key_value,
    parse_bytes,
    table,
    when,
)
from llm_ops_helper.client import Deployment, LLMOpsHelper
from llm_ops_helper.progress import TransferBars


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None:
    deploy = sub.add_parser(
        "deploy", parents=[common], help="deploy a model file or a registry version",
        description="Deploy a model file (pushed first as a new version) or a registry ref: "
                    "NAME@N, NAME@ALIAS or NAME (its production version, else its latest). "
                    "Pass runtime flags as --arg=--ctx-size=4096.")
    deploy.add_argument("target", metavar="PATH_OR_REF")
    deploy.add_argument("--name", help="deployment (and, for a file, model) name")
    deploy.add_argument("--runtime", help="llamacpp, vllm, sglang, sim or command")
    deploy.add_argument("--replicas", type=int, default=1, metavar="N")
    deploy.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs per replica")
    deploy.add_argument("--gpu-memory", type=parse_bytes, default=None, metavar="SIZE",
                        help="free GPU memory each replica needs, e.g. 40GiB")
    deploy.add_argument("--arg", action="append", default=[], metavar="ARG",
                        help="extra runtime argument (repeat; write --arg=--flag)")
    deploy.add_argument("--env", type=key_value, action="append", default=[], metavar="K=V")
    _wait_options(deploy, default_wait=True)
    deploy.set_defaults(run=_deploy)

    scale = sub.add_parser("scale", parents=[common], help="set a deployment's replica count")
    scale.add_argument("name", metavar="NAME")
    scale.add_argument("replicas", type=int, metavar="N")
    _wait_options(scale, default_wait=False)
    scale.set_defaults(run=_scale)

    rollback = sub.add_parser("rollback", parents=[common],
                              help="go back to the previous (or a given) version")
    rollback.add_argument("name", metavar="NAME")
    rollback.add_argument("--to", metavar="VERSION", help="N or NAME@N (default: the previous)")
    _wait_options(rollback, default_wait=True)
    rollback.set_defaults(run=_rollback)

    status = sub.add_parser("status", parents=[common], help="deployments and their replicas")
    status.add_argument("name", nargs="?", metavar="NAME")
    status.set_defaults(run=_status)

    delete = sub.add_parser("delete", parents=[common], help="stop and remove a deployment")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(run=_delete)


def _wait_options(parser: argparse.ArgumentParser, *, default_wait: bool) -> None:
    if default_wait:
        parser.add_argument("--no-wait", dest="wait", action="store_false",
                            help="return once the controller has accepted it")
    else:
        parser.add_argument("--wait", action="store_true", help="wait until it is done")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long to wait (default 600)")


class _Narrator:
    """Prints each new state of a rollout to stderr while the command waits."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, state: Deployment) -> None:
        line = deployment_line(state)
        if line != self.last:
            print(line, file=sys.stderr, flush=True)
            self.last = line


def _deploy(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {}
    if args.gpus is not None:
        spec["gpus_per_replica"] = args.gpus
    if args.gpu_memory is not None:
        spec["gpu_memory_bytes"] = args.gpu_memory
    if args.arg:
        spec["args"] = args.arg
    if args.env:
        spec["env"] = dict(args.env)
    with TransferBars() as bars:
        result = helper.deploy_model(args.target, args.name, args.runtime, args.replicas,
                                     args.wait, timeout=args.timeout, progress=bars,
                                     on_update=_Narrator(), **spec)
    emit(args, result, _summary(helper, result, args.wait))
    return 0


def _scale(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    result = helper.scale(args.name, args.replicas, args.wait, timeout=args.timeout)
    emit(args, result, deployment_line(result))
    return 0


def _rollback(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    result = helper.rollback(args.name, args.to, args.wait, timeout=args.timeout,
                             on_update=_Narrator())
    emit(args, result, _summary(helper, result, args.wait))
    return 0


def _status(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    if args.name is not None:
        one = helper.status(args.name)
        emit(args, one, _details(one))
        return 0
    every = helper.status()
    rows = [(d.name, d.version, d.phase, f"{d.ready}/{d.desired}", d.revision,
             when(d.updated_at), d.message) for d in every]
    emit(args, every, table(("NAME", "VERSION", "PHASE", "READY", "REVISION", "UPDATED",
                             "MESSAGE"), rows) if every else "no deployments")
    return 0


def _delete(helper: LLMOpsHelper, args: argparse.Namespace) -> int:
    helper.delete_deployment(args.name)
    emit(args, {"deployment": args.name, "deleting": True},
         f"deployment {args.name}: deleting (replicas are being stopped)")
    return 0


def _summary(helper: LLMOpsHelper, state: Deployment, waited: bool) -> str:
    if not waited:
        return deployment_line(state) + f"\nfollow it with: llmops status {state.name}"
    lines = [deployment_line(state)]
    lines += [f"  {e.replica}: {e.url}" for e in helper.endpoints(state.name)]
    return "\n".join(lines)


def _details(d: Deployment) -> str:
    head = [deployment_line(d),
            f"revision {d.revision}; previous version {d.previous_version or '-'}; "
            f"updated {when(d.updated_at)}"]
    rows = [(r.name, r.host, ",".join(str(g) for g in r.gpus), r.version, r.state, r.restarts,
             r.url, r.reason) for r in d.replicas]
    if rows:
        head.append(table(("REPLICA", "HOST", "GPUS", "VERSION", "STATE", "RESTARTS", "URL",
                           "REASON"), rows))
    head += [f"placement: {p}" for p in d.placement]
    return "\n".join(head)
