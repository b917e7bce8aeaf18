"""The ``runtime`` collector: scrape each replica's Prometheus ``/metrics`` into canonical names.

Which source metrics feed which canonical name, and how series that differ only in labels
(engines, data-parallel ranks, finish reasons) combine, is data: ``metric_names.toml``.

CPU matters here: the agent's whole budget is a few ms of CPU per second, and
prometheus_client's text parser costs ~40-50 us per sample line: 30-37 ms of CPU for a
realistic vLLM page with two engines (tests/fixtures/metrics/vllm.txt, 884 lines) on the
reference box. Two things bring that down:

1. Only the families named in the mapping (and their HELP/TYPE lines) reach the parser.
2. Per target, :class:`MetricsParser` remembers, for every sample line the parser has read,
   the exact text before the value and what it fed (a scalar source and the label matchers
   it passed, a histogram bucket/sum/count). Label matchers (``labels = {...}`` in the
   mapping) are decided then, once per line: the text before the value holds the labels, so
   a line that matched keeps feeding, and one that did not is remembered as feeding nothing.
   While a page keeps its shape and only values move, the next scrape reads the values of
   those known lines and nothing else; any new or changed series or HELP/TYPE line of a
   mapped family sends the whole page back through prometheus_client.

Measured on that page: whole page 30-37 ms, pre-filtered ~7 ms (first scrape, or when the
page's shape changes), known shape ~0.65 ms.
"""

from __future__ import annotations

import asyncio
import errno
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llm_ops_helper.agent.collectors.base import Collected
from llm_ops_helper.agent.collectors.metric_map import LabelMatcher, mapping_for, matches
from llm_ops_helper.agent.collectors.quantiles import interval_percentiles
from llm_ops_helper.proto.messages import Histogram, ReplicaSample

_HIST_SUFFIXES: Final = ("_bucket", "_sum", "_count")
# Ask for the classic text format (not OpenMetrics), uncompressed: on localhost gzip only burns
# CPU on both ends.
_SCRAPE_HEADERS: Final = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}


class MetricsParseError(ValueError):
    """A /metrics page that the parser rejects or that holds none of the runtime's metrics."""


# --- parsing -------------------------------------------------------------------------------

# What one sample line feeds: a scalar source's value, or a histogram source's bucket (with its
# upper bound), sum or count. A scalar line names its source (the source is then present on the
# page) and the feeds its labels matched: one per distinct (source, label matcher) of the
# mapping, possibly none.
_SCALAR, _BUCKET, _SUM, _COUNT = range(4)
_Slot = tuple[int, str, float, tuple[int, ...]]


@dataclass(slots=True)
class _Hist:
    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0


@dataclass(slots=True)
class _Values:
    """Source values of one page, summed over series per histogram bound."""

    scalars: dict[int, list[float]] = field(default_factory=dict)  # per feed
    present: set[str] = field(default_factory=set)  # scalar sources with any series
    hists: dict[str, _Hist] = field(default_factory=dict)

    def add(self, slot: _Slot, value: float) -> None:
        kind, source, le, feeds = slot
        if kind == _SCALAR:
            self.present.add(source)
            for feed in feeds:
                found = self.scalars.get(feed)
                if found is None:
                    self.scalars[feed] = [value]
                else:
                    found.append(value)
            return
        hist = self.hists.get(source)
        if hist is None:
            hist = self.hists[source] = _Hist()
        if kind == _BUCKET:
            hist.buckets[le] = hist.buckets.get(le, 0.0) + value
        elif kind == _SUM:
            hist.sum += value
        else:
            hist.count += value


def _aggregate(values: list[float], agg: str) -> float:
    if agg == "sum":
        return math.fsum(values)
    if agg == "max":
        return max(values)
    if agg == "min":
        return min(values)
    return math.fsum(values) / len(values)


class MetricsParser:
    """Parses one target's pages; keeps what it learnt of the page's shape between calls."""

    def __init__(self, runtime: str) -> None:
        self.mapping = mapping_for(runtime)
        self._scalar_sources = {s for spec in self.mapping.metrics.values() for s in spec.sources}
        # One feed per distinct (source, label matcher); canonical names sharing one share it.
        self._feed_ids: dict[tuple[str, LabelMatcher], int] = {}
        for spec in self.mapping.metrics.values():
            for source in spec.sources:
                self._feed_ids.setdefault((source, spec.labels), len(self._feed_ids))
        self._feeds_of: dict[str, list[tuple[int, LabelMatcher]]] = {}
        for (source, matcher), feed in self._feed_ids.items():
            self._feeds_of.setdefault(source, []).append((feed, matcher))
        self._hist_sources = {s for sources in self.mapping.histograms.values() for s in sources}
        self._families = self._scalar_sources | self._hist_sources
        self._sample_names = self._scalar_sources | {
            h + suffix for h in self._hist_sources for suffix in _HIST_SUFFIXES}
        # One C-level scan picks out the lines that matter (samples of mapped names and the
        # HELP/TYPE lines of mapped families); on a vLLM page that is ~250 of ~900 lines, and
        # the regex is ~2x faster than testing every line in Python.
        alternatives = _alternation(self._sample_names)
        families = _alternation(self._families)
        # Anchored on "\n" rather than on ^ with re.M, which is 3x slower to scan.
        self._wanted = re.compile(
            rf"\n((?:{alternatives})[{{ \t][^\n]*|# (?:HELP|TYPE) (?:{families})[ \t][^\n]*)")
        self._layout: dict[str, _Slot] = {}
        self._comments: set[str] = set()

    def parse(self, text: str) -> tuple[dict[str, float], dict[str, Histogram]]:
        values = self._read_known(text) if self._layout else None
        if values is None:
            values = self._read_full(text)
        return self._canonical(values)

    def _family_comment(self, line: str) -> bool:
        parts = line.split(None, 3)
        return len(parts) > 2 and parts[1] in ("HELP", "TYPE") and parts[2] in self._families

    def _sample_name(self, line: str) -> str:
        brace = line.find("{")
        return line[:brace].rstrip() if brace >= 0 else line.partition(" ")[0]

    def _read_known(self, text: str) -> _Values | None:
        """Values of a page whose mapped lines all match the learnt layout; else None."""
        layout, values = self._layout, _Values()
        for line in self._wanted.findall("\n" + text):
            key, _, value = line.rpartition(" ")
            slot = layout.get(key)
            if slot is not None:
                try:
                    values.add(slot, float(value))
                except ValueError:
                    return None
            elif line.startswith("#"):
                if line not in self._comments and self._family_comment(line):
                    return None
            elif self._sample_name(line) in self._sample_names:
                return None
        return values if values.present or values.hists else None

    def _read_full(self, text: str) -> _Values:
        kept: list[str] = []
        sample_lines: list[str] = []
        for line in text.splitlines():
            if line.startswith("#"):
                if self._family_comment(line):
                    kept.append(line)
            elif self._sample_name(line) in self._sample_names:
                kept.append(line)
                sample_lines.append(line)
        if not sample_lines:
            head = text.lstrip()[:60]
            raise MetricsParseError(f"none of the {self.mapping.runtime} metrics in "
                                    f"{len(text)} characters starting {head!r}")
        try:
            samples = [(family.type, family.name, sample)
                       for family in text_string_to_metric_families("\n".join(kept))
                       for sample in family.samples]
        except Exception as exc:  # the parser raises bare ValueError, IndexError, ...
            raise MetricsParseError((str(exc) or type(exc).__name__)[:200]) from None
        values = _Values()
        layout: dict[str, _Slot] = {}
        for (family_type, family_name, sample), line in zip(samples, sample_lines, strict=False):
            slot = self._slot(family_type, family_name, sample.name, sample.labels)
            if slot is None:
                continue
            values.add(slot, float(sample.value))
            key, _, value = line.rpartition(" ")
            if sample.timestamp is None and _same_float(value, float(sample.value)):
                layout[key] = slot
        if len(samples) == len(sample_lines):
            self._layout = layout
            self._comments = {line for line in kept if line.startswith("#")}
        return values

    def _slot(self, family_type: str, family_name: str, name: str,
              labels: dict[str, str]) -> _Slot | None:
        source = name if name in self._scalar_sources else None
        # prometheus_client names a counter declared without `_total` (llama.cpp's
        # n_tokens_max) by its declared name and suffixes its samples with `_total`.
        if source is None and family_type == "counter" and family_name in self._scalar_sources:
            source = family_name
        if source is not None:
            # Label matchers are decided here, once per line shape: a line that matches none
            # is still remembered (it feeds nothing), so it does not defeat the fast path.
            feeds = tuple(feed for feed, matcher in self._feeds_of[source]
                          if matches(matcher, labels))
            return (_SCALAR, source, 0.0, feeds)
        base, _, suffix = name.rpartition("_")
        if base not in self._hist_sources:
            return None
        if suffix == "bucket":
            try:
                return (_BUCKET, base, float(labels["le"]), ())
            except (KeyError, ValueError):
                raise MetricsParseError(f"{name} sample without a numeric le label") from None
        if suffix in ("sum", "count"):
            return (_SUM if suffix == "sum" else _COUNT, base, 0.0, ())
        return None

    def _canonical(self, values: _Values) -> tuple[dict[str, float], dict[str, Histogram]]:
        metrics: dict[str, float] = {}
        for canonical, spec in self.mapping.metrics.items():
            # The first source present wins: a release that exposes both the new and the
            # deprecated name reports the same quantity twice.
            source = next((s for s in spec.sources if s in values.present), None)
            if source is None:
                continue
            found = values.scalars.get(self._feed_ids[source, spec.labels], [])
            # A source on the page with no series matching the labels (no 5xx yet) is a sum
            # of nothing, 0; a max or mean of nothing is not reported.
            if found or spec.agg == "sum":
                value = _aggregate(found, spec.agg)
                if math.isfinite(value):  # JSON has no NaN/Inf; absent means "not reported"
                    metrics[canonical] = value
        histograms: dict[str, Histogram] = {}
        for canonical, sources in self.mapping.histograms.items():
            hist = next((values.hists[s] for s in sources if s in values.hists), None)
            if hist is not None:
                # The +Inf bucket always equals `count`, and JSON cannot carry an infinite bound.
                buckets = sorted((le, n) for le, n in hist.buckets.items() if math.isfinite(le))
                histograms[canonical] = Histogram(sum=hist.sum, count=hist.count, buckets=buckets)
        return metrics, histograms


def _alternation(names: set[str]) -> str:
    """A regex alternation of ``names``, grouped by namespace (``vllm:``, ``sglang:``, none).

    The regex compiler moves a prefix that all branches of a group share out in front of them,
    which is what keeps the scan fast; one name from outside the namespace
    (``http_requests_total`` on a vLLM page) would otherwise cost every line a try of every
    branch, ~2.5x the scan time.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.partition(":")[0] if ":" in name else "", []).append(name)
    return "|".join(
        "(?:" + "|".join(map(re.escape, sorted(group, key=len, reverse=True))) + ")"
        for _, group in sorted(groups.items()))


def _same_float(text: str, value: float) -> bool:
    try:
        parsed = float(text)
    except ValueError:
        return False
    return parsed == value or (math.isnan(parsed) and math.isnan(value))


def parse_metrics(text: str, runtime: str) -> tuple[dict[str, float], dict[str, Histogram]]:
    """Canonical metrics and histograms of one /metrics page of ``runtime``.

    Raises :class:`MetricsParseError` for a page the parser rejects or that holds none of the
    runtime's mapped metrics, and ``ValueError`` for an unknown runtime.
    """
    return MetricsParser(runtime).parse(text)


# --- the collector -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One replica to scrape. An unknown runtime or a non-HTTP URL fails here, at once."""

    name: str
    runtime: str
    metrics_url: str

    def __post_init__(self) -> None:
        mapping_for(self.runtime)
        if not self.metrics_url.startswith(("http://", "https://")):
            raise ValueError(f"replica {self.name!r}: metrics_url must be an http(s) URL, "
                             f"got {self.metrics_url!r}")


class RuntimeCollector:
    """Scrapes every target concurrently each tick; one ReplicaSample per target, up or not."""

    name = "runtime"

    def __init__(self, targets: Callable[[], Sequence[ScrapeTarget]],
                 timeout_s: float = 2.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.targets = targets
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._parsers: dict[ScrapeTarget, MetricsParser] = {}
        # Each target's histograms at its last scrape, for this interval's percentiles.
        self._histograms: dict[ScrapeTarget, dict[str, Histogram]] = {}

    async def collect(self) -> Collected:
        targets = list(self.targets())
        # Keep what each parser learnt for targets still listed; forget the rest.
        self._parsers = {t: self._parsers.get(t) or MetricsParser(t.runtime) for t in targets}
        self._histograms = {t: h for t, h in self._histograms.items() if t in self._parsers}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=_SCRAPE_HEADERS, timeout=aiohttp.ClientTimeout(total=None))
        session = self._session
        replicas = await asyncio.gather(*(self._scrape(session, t) for t in targets))
        return Collected(replicas=list(replicas))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _scrape(self, session: aiohttp.ClientSession, target: ScrapeTarget) -> ReplicaSample:
        start = time.perf_counter()

        def down(error: str) -> ReplicaSample:
            return ReplicaSample(name=target.name, runtime=target.runtime, up=False, error=error,
                                 scrape_ms=round((time.perf_counter() - start) * 1000, 3))

        url = target.metrics_url
        parser = self._parsers[target]
        try:
            async with asyncio.timeout(self.timeout_s), session.get(url) as resp:
                if resp.status != 200:
                    hint = parser.mapping.disabled_hint
                    if hint and resp.status == parser.mapping.disabled_status:
                        return down(f"HTTP {resp.status} from {url} ({hint})")
                    return down(f"HTTP {resp.status} from {url}")
                body = await resp.read()
        except TimeoutError:
            return down(f"timed out after {float(self.timeout_s)} s")
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno == errno.ECONNREFUSED:
                return down(f"connection refused to {url}")
            return down(f"cannot connect to {url}: {exc.os_error.strerror or exc.os_error}")
        except aiohttp.ClientError as exc:
            return down(f"scrape of {url} failed: {type(exc).__name__}: {exc}")
        try:
            metrics, histograms = parser.parse(body.decode("utf-8"))
        except (UnicodeDecodeError, MetricsParseError) as exc:
            return down(f"unparseable metrics: {exc}")
        before = self._histograms.get(target)
        self._histograms[target] = histograms
        if before is not None:
            metrics = metrics | interval_percentiles(before, histograms)
        return ReplicaSample(name=target.name, runtime=target.runtime, up=True,
                             scrape_ms=round((time.perf_counter() - start) * 1000, 3),
                             metrics=metrics, histograms=histograms)
