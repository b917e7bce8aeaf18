"""``llmops``: the operator's command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from llm_ops_helper import __version__, evaluate


def _broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "1883")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops", description="LLM Ops Helper command line")
    parser.add_argument("--version", action="version", version=f"llmops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a local broker and an agent with simulated GPUs")
    demo.add_argument("--gpus", type=int, default=8, help="simulated GPUs (default 8)")
    demo.add_argument("--interval", type=float, default=1.0, help="telemetry interval, s")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--scenario", default=None,
                      help="fault scenario TOML (default: the shipped example timeline)")

    watch = sub.add_parser("watch", help="print agents' status, telemetry and events")
    watch.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), metavar="HOST:PORT")
    watch.add_argument("--raw", action="store_true", help="print topic and raw JSON payloads")

    evaluate.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "eval":
        return evaluate.run(args)
    try:
        if args.command == "demo":
            from llm_ops_helper.demo import run_demo
            return asyncio.run(run_demo(gpus=args.gpus, interval_s=args.interval,
                                        duration_s=args.duration, scenario=args.scenario))
        from llm_ops_helper.watch import watch as watch_broker
        asyncio.run(watch_broker(*args.broker, raw=args.raw))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
