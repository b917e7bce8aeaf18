"""``llmops eval``: run the controller's anomaly detector over NAB data and score it.

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
    """Register ``eval nab-score`` and ``eval anomaly`` under the top-level parser."""
    group = sub.add_parser("eval", help="evaluate the anomaly detector on NAB data")
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


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``eval`` command; bad input exits 2 with one line naming the path."""
    try:
        if args.eval_command == "nab-score":
            return _nab_score(args)
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
