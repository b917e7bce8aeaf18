"""Detection and false-positive rates of the gateway's prompt-injection heuristic.

The labelled set is tests/fixtures/injection/prompts.jsonl (injection prompts in five
published attack categories, benign prompts with hard negatives). It is split by a fixed hash
of the text: TUNE (where the feature weights and the threshold were chosen, by reading only
its misses and false positives) and HOLDOUT (never looked at while tuning). Reports both
halves and all, per category, the time per prompt, and what output redaction costs.

    python bench/injection.py
Writes bench/results/injection.json.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_ops_helper.controller.gateway.injection import THRESHOLD, HeuristicClassifier
from llm_ops_helper.controller.gateway.redact import StreamRedactor, redact

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "tests" / "fixtures" / "injection" / "prompts.jsonl"
RESULTS = ROOT / "bench" / "results" / "injection.json"


def load() -> list[dict[str, str]]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]


def split(row: dict[str, str]) -> str:
    """"tune" or "holdout", from the text alone, so adding prompts never moves the others."""
    return "tune" if hashlib.sha256(row["text"].encode()).digest()[0] % 2 == 0 else "holdout"


def rates(rows: Sequence[dict[str, str]], scores: Sequence[float],
          threshold: float) -> dict[str, Any]:
    """Detection rate over injections, false-positive rate over benign prompts, per category."""
    flagged = [s >= threshold for s in scores]
    out: dict[str, Any] = {}
    injections = [f for r, f in zip(rows, flagged, strict=True) if r["label"] == "injection"]
    benign = [f for r, f in zip(rows, flagged, strict=True) if r["label"] == "benign"]
    out["injections"] = len(injections)
    out["benign"] = len(benign)
    out["detection_rate"] = round(sum(injections) / len(injections), 4)
    out["false_positive_rate"] = round(sum(benign) / len(benign), 4)
    out["per_category"] = {}
    for category in sorted({r["category"] for r in rows}):
        hits = [f for r, f in zip(rows, flagged, strict=True) if r["category"] == category]
        key = "false_positive_rate" if category == "benign" else "detection_rate"
        out["per_category"][category] = {"n": len(hits), key: round(sum(hits) / len(hits), 4)}
    return out


def figures() -> dict[str, Any]:
    """The rates the unit test pins: deterministic, no timing."""
    rows = load()
    classifier = HeuristicClassifier()
    scores = [classifier.score(r["text"]) for r in rows]
    result: dict[str, Any] = {"threshold": THRESHOLD}
    for part in ("tune", "holdout"):
        chosen = [(r, s) for r, s in zip(rows, scores, strict=True) if split(r) == part]
        result[part] = rates([r for r, _ in chosen], [s for _, s in chosen], THRESHOLD)
    result["all"] = rates(rows, scores, THRESHOLD)
    return result


def timing(repeats: int = 20) -> dict[str, float]:
    texts = [r["text"] for r in load()]
    classifier = HeuristicClassifier()
    per_prompt: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            classifier.score(text)
        per_prompt.append((time.perf_counter() - start) / len(texts) * 1e6)
    per_prompt.sort()
    chars = sorted(len(t) for t in texts)
    return {"us_per_prompt_median": round(per_prompt[len(per_prompt) // 2], 1),
            "us_per_prompt_min": round(per_prompt[0], 1),
            "prompt_chars_median": chars[len(chars) // 2]}


def redaction_timing() -> dict[str, float]:
    """Output redaction cost per 1,000 characters, whole and streamed in 20-character chunks,
    on the set's prompts joined (prose) and on a wall of digits (a run held to its end)."""
    prose = "\n".join(r["text"] for r in load()) + " mail a@example.com, key AKIAIOSFODNN7EXAMPLE"
    out: dict[str, float] = {}
    for name, text in (("prose", prose), ("digit_run", "4" * 100_000)):
        start = time.perf_counter()
        redact(text)
        whole = time.perf_counter() - start
        start = time.perf_counter()
        stream = StreamRedactor()
        for i in range(0, len(text), 20):
            stream.feed(text[i:i + 20])
        stream.flush()
        streamed = time.perf_counter() - start
        out[f"{name}_whole_us_per_kchar"] = round(whole / len(text) * 1e9, 1)
        out[f"{name}_stream_us_per_kchar"] = round(streamed / len(text) * 1e9, 1)
    return out


def main() -> None:
    result = figures()
    result["timing"] = timing()
    result["redaction_timing"] = redaction_timing()
    result["machine"] = {"cores": os.cpu_count(), "python": platform.python_version(),
                         "processor": platform.processor() or platform.machine()}
    result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    result["method"] = ("split by sha256(text)[0] % 2; weights and threshold chosen on 'tune' "
                        "only; same author wrote the patterns and the prompts, so these rates "
                        "are optimistic for prompts unlike them")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
