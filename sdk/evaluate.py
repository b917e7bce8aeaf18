"""``llmops eval``: score the anomaly detector on NAB data; replay traffic through the autoscaler.

Kept apart from cli.py, and importing the scorer (numpy) and the runner (river) only inside
the commands, so `llmops demo` and `llmops watch` never pay for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_ops_helper.controller.evaluation.nab_score import CorpusScore

PROFILE_NAMES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
EXIT_USAGE = 2


class EvalError(Exception):
    """A bad path or input: printed as one line, exit code 2, never a traceback."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``eval nab-score``, ``eval anomaly`` and ``eval autoscale``."""
    group = sub.add_parser("eval", help="evaluate the anomaly detector and the autoscaler")
    commands = group.add_subparsers(dest="eval_command", required=True)

    score = commands.add_parser("nab-score", help="score detector results with NAB's scorer")
    score.add_argument("--results", type=Path, required=True, metavar="OUT",
                       help="results folder: OUT/<category>/<name>.csv with "
                            "timestamp,value,anomaly_score,is_anomaly")
    score.add_argument("--windows", type=Path, required=True, metavar="PATH",
                       help="NAB's combined_windows.json")
    score.add_argument("--profile", choices=(*PROFILE_NAMES, "all"), default="all",
                       help="NAB profile (default: all three)")
    score.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="also write the scores as JSON")

    anomaly = commands.add_parser("anomaly", help="run the detector over NAB-layout CSVs")
    anomaly.add_argument("--data", type=Path, required=True, metavar="DIR",
                         help="DIR/<category>/<name>.csv with timestamp,value")
    anomaly.add_argument("--out", type=Path, required=True, metavar="OUT",
                         help="where to write OUT/<category>/<name>.csv results")

    scale = commands.add_parser(
        "autoscale", help="replay a request trace through an autoscaling policy",
        description="Replay a trace in virtual time: each bin's replicas are decided from the "
                    "bins before it; new replicas serve COLD_START seconds after they are asked "
                    "for. Writes one row per bin and prints the time short of replicas and the "
                    "billed replica-seconds.")
    scale.add_argument("--trace", type=Path, required=True, metavar="FILE",
                       help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens (Azure LLM trace)")
    scale.add_argument("--bin", type=_positive, default=5.0, metavar="SECONDS",
                       help="bin width (default 5)")
    scale.add_argument("--capacity", type=_positive, required=True, metavar="TOKENS_PER_S",
                       help="tokens per second one replica serves")
    scale.add_argument("--cold-start", type=_non_negative, default=60.0, metavar="SECONDS",
                       help="seconds from asking for a replica to its serving (default 60)")
    scale.add_argument("--policy", choices=("predictive", "reactive", "hpa"),
                       default="predictive", help="default: predictive (the controller's own)")
    scale.add_argument("--window", type=_non_negative, default=None, metavar="SECONDS",
                       help="scale-down stabilisation window (hpa default 300, predictive 0)")
    scale.add_argument("--target-utilization", type=_fraction, default=None, metavar="F",
                       help="fraction of capacity to plan for (reactive 1.0, hpa 0.8, "
                            "predictive 0.5)")
    scale.add_argument("--quantile", type=_fraction, default=0.9, metavar="Q",
                       help="predictive: coverage of the forecast's upper bound (default 0.9)")
    scale.add_argument("--min-replicas", type=int, default=1, metavar="N")
    scale.add_argument("--max-replicas", type=int, default=1000, metavar="N")
    scale.add_argument("--out", type=Path, required=True, metavar="CSV",
                       help="decisions: t,load_tokens,desired_replicas (then active_replicas, "
                            "short, rule)")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``eval`` command; bad input exits 2 with one line naming the path."""
    try:
        if args.eval_command == "nab-score":
            return _nab_score(args)
        if args.eval_command == "autoscale":
            return _autoscale(args)
        return _anomaly(args)
    except EvalError as exc:
        print(f"llmops eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _summary(score: CorpusScore) -> dict[str, Any]:
    return {"threshold": score.threshold, "normalized": score.normalized, "raw": score.raw,
            "null": score.null, "perfect": score.perfect, "tp": score.tp, "fp": score.fp,
            "fn": score.fn, "windows": score.windows, "windows_detected": score.detected}


def nab_report(results_dir: Path, windows_path: Path, profiles: list[str]) -> dict[str, Any]:
    """Both scores for each profile: the detector's own decisions, and NAB's optimised threshold.

    Raises `EvalError` for missing or malformed files.
    """
    from llm_ops_helper.controller.evaluation import nab_score as nab

    try:
        windows = nab.load_windows(windows_path)
        results = nab.read_results_dir(results_dir)
        decisions = {name: (ts, flags) for name, (ts, _, flags) in results.items()}
        report: dict[str, Any] = {"results": str(results_dir), "windows": str(windows_path),
                                  "files": len(results),
                                  "rows": sum(len(ts) for ts, _, _ in results.values()),
                                  "profiles": {}}
        for name in profiles:
            profile = nab.PROFILES[name]
            report["profiles"][name] = {
                "is_anomaly": _summary(nab.score_decisions(decisions, windows, profile)),
                "optimized": _summary(nab.score_corpus(results, windows, profile)),
            }
    except nab.NabDataError as exc:
        raise EvalError(str(exc)) from None
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: one line per profile and kind of threshold."""
    lines = [f"NAB score of {report['results']}: {report['files']} files, {report['rows']} rows",
             f"{'profile':<20} {'decisions':<11} {'score':>7} {'threshold':>10} "
             f"{'TP rows':>8} {'FP rows':>8} {'FN rows':>8} {'windows hit':>12}"]
    for name, kinds in report["profiles"].items():
        for kind, label in (("is_anomaly", "is_anomaly"), ("optimized", "NAB-optimal")):
            s = kinds[kind]
            lines.append(f"{name:<20} {label:<11} {s['normalized']:7.2f} {s['threshold']:10.6g} "
                         f"{s['tp']:8d} {s['fp']:8d} {s['fn']:8d} "
                         f"{str(s['windows_detected']) + '/' + str(s['windows']):>12}")
    lines.append("score: 0 = never fires, 100 = every window caught at its first row; "
                 "TP/FP/FN count rows, as NAB does")
    return "\n".join(lines)


def _nab_score(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        raise EvalError(f"{args.results}: results directory not found")
    if not args.windows.is_file():
        raise EvalError(f"{args.windows}: windows file not found")
    profiles = list(PROFILE_NAMES) if args.profile == "all" else [args.profile]
    report = nab_report(args.results, args.windows, profiles)
    print(format_report(report))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise EvalError(f"{args.json}: cannot write JSON: {exc.strerror}") from None
    return 0


def _anomaly(args: argparse.Namespace) -> int:
    if not args.data.is_dir():
        raise EvalError(f"{args.data}: data directory not found")
    try:
        from llm_ops_helper.controller.evaluation.run_anomaly import (  # type: ignore[import-not-found, unused-ignore]
            run_directory,
        )
    except ImportError as exc:
        raise EvalError(f"cannot load the anomaly runner ({exc}); install the controller "
                        "extra: pip install 'llm-ops-helper[controller]'") from None
    try:
        summary = run_directory(args.data, args.out)
    except (OSError, ValueError) as exc:  # bad CSVs and paths; NabDataError is a ValueError
        raise EvalError(str(exc)) from None
    us_per_sample = 1e6 * summary.seconds / summary.rows if summary.rows else 0.0
    print(f"{summary.files} files, {summary.rows} rows in {summary.seconds:.2f} s "
          f"({us_per_sample:.1f} µs per sample); results in {args.out}")
    return 0


def _autoscale(args: argparse.Namespace) -> int:
    try:
        from llm_ops_helper.controller.autoscale import replay as rp
    except ImportError as exc:
        raise EvalError(f"cannot load the autoscaler ({exc}); install the controller "
                        "extra: pip install 'llm-ops-helper[controller]'") from None
    if not 0 <= args.min_replicas <= args.max_replicas:
        raise EvalError(f"need 0 <= --min-replicas <= --max-replicas, got {args.min_replicas} "
                        f"and {args.max_replicas}")
    if args.quantile >= 1:
        raise EvalError(f"--quantile must be below 1, got {args.quantile:g}")
    try:
        trace = rp.read_trace(args.trace)
    except rp.TraceError as exc:
        raise EvalError(str(exc)) from None
    setup = rp.Setup(args.bin, args.capacity, args.cold_start)
    stepper = rp.stepper_for(args.policy, setup, min_replicas=args.min_replicas,
                             max_replicas=args.max_replicas,
                             target_utilization=args.target_utilization, window_s=args.window,
                             quantile=args.quantile)
    rows = rp.replay(rp.bin_loads(trace, args.bin), stepper, setup, args.min_replicas)
    try:
        rp.write_csv(rows, args.out)
    except OSError as exc:
        raise EvalError(f"{args.out}: cannot write decisions: {exc.strerror}") from None
    summary = rp.summarize(rows, setup, args.min_replicas)
    print(f"{args.policy}: {summary.text()}; decisions in {args.out}")
    return 0
