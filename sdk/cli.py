"""``llmops``: the operator's command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from llm_ops_helper import __version__, cli_deploy, cli_keys, cli_models, cli_tokens, evaluate

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "1883")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {value!r}")
    return port


def _client_options(parser: argparse.ArgumentParser, default: object) -> None:
    """--url, --token and --json, before the command or after it (where they default to
    SUPPRESS, so an option given before is not overwritten)."""
    parser.add_argument("--url", default=default,
                        help="controller URL (default: $LLMOPS_URL, else http://127.0.0.1:8470)")
    parser.add_argument("--token", default=default,
                        help="API token (default: $LLMOPS_TOKEN or the file $LLMOPS_TOKEN_FILE)")
    parser.add_argument("--json", action="store_true",
                        default=False if default is None else default,
                        help="print JSON instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmops", description="LLM Ops Helper command line")
    parser.add_argument("--version", action="version", version=f"llmops {__version__}")
    _client_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _client_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run a whole fleet here: broker, controller and dashboard, gateway, "
        "3 agents, a model deployed under a rising and falling load, one GPU fault")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--agents", type=int, default=3, help="agents (default 3)")
    demo.add_argument("--gpus", type=int, default=2,
                      help="simulated GPUs per agent (default 2)")
    demo.add_argument("--runtime", choices=("auto", "llamacpp", "sim"), default="auto",
                      help="auto: llama.cpp on a tiny generated model where xllamacpp "
                           "imports, else the sim runtime")
    demo.add_argument("--port", type=_port, default=None,
                      help="controller and dashboard port if free, else any; 0: any "
                           "(default 8470)")
    demo.add_argument("--gateway-port", type=_port, default=None,
                      help="gateway port if free, else any; 0: any (default 8480)")
    demo.add_argument("--workdir", default=None,
                      help="configs, state and logs (default: a new temporary directory)")

    watch = sub.add_parser("watch", help="print agents' status, telemetry and events")
    watch.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), metavar="HOST:PORT")
    watch.add_argument("--raw", action="store_true", help="print topic and raw JSON payloads")

    top = sub.add_parser("top", parents=[common],
                         help="live terminal view of hosts, GPUs, replicas and alerts (q quits)")
    top.add_argument("--interval", type=float, default=1.0, help="refresh every N s (default 1)")
    top.add_argument("--once", action="store_true",
                     help="print one frame and exit (no terminal needed)")

    logs = sub.add_parser("logs", help="pretty-print the daemons' JSON log lines, filtered")
    logs.add_argument("files", nargs="*", metavar="FILE",
                      help="log files (default: stdin, or journalctl with --unit)")
    logs.add_argument("-u", "--unit", action="append", default=[],
                      help="read `journalctl -o cat -u UNIT` (repeatable)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep reading (journalctl -f)")
    logs.add_argument("--host", action="append", default=[], help="only these hosts")
    logs.add_argument("--deployment", action="append", default=[],
                      help="only these deployments")
    logs.add_argument("--level", default=None,
                      help="minimum level: debug, info, warning, error, critical")
    logs.add_argument("--event", action="append", default=[],
                      help="only events matching this glob, e.g. 'replica_*' (repeatable)")
    logs.add_argument("--catalogue", action="store_true",
                      help="list every event the daemons emit, with its level and fields")

    evaluate.add_parser(sub)
    cli_models.add_parser(sub, common)
    cli_deploy.add_parsers(sub, common)
    cli_keys.add_parser(sub)
    cli_tokens.add_parser(sub)
    return parser


def run_client_command(args: argparse.Namespace) -> int:
    """Run a command that talks to the controller; its errors become one line and exit 1."""
    from llm_ops_helper.client import LLMOpsError, LLMOpsHelper

    try:
        helper = LLMOpsHelper(args.url, args.token)
        code: int = args.run(helper, args)
        return code
    except LLMOpsError as exc:
        print(f"llmops: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("llmops: interrupted (what the controller accepted goes on)", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return evaluate.run(args)
    if args.command == "keys":
        return cli_keys.run(args)
    if args.command == "tokens":
        return cli_tokens.run(args)
    if args.command == "logs":
        from llm_ops_helper.logview import run_logs
        return run_logs(args)
    if args.command == "top":
        from llm_ops_helper.top import run_top
        return run_top(args)
    if args.command == "demo":
        from llm_ops_helper.demo import run_demo
        return run_demo(args)
    if hasattr(args, "run"):
        return run_client_command(args)
    try:
        from llm_ops_helper.watch import watch as watch_broker
        asyncio.run(watch_broker(*args.broker, raw=args.raw))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
