"""Hostile payloads: a mutation fuzzer over valid wire messages, and hypothesis strategies.

The fuzzer starts from messages built from :mod:`llm_ops_helper.proto.messages` (so it follows
the wire contract as it changes) and breaks them the ways a buggy or hostile sender would: bit
flips, truncation, type swaps, huge numbers, deep nesting, NaN and infinities, odd unicode,
oversize fields, a wrong schema version, another host in the payload. It is seeded: a failing
run names its seed and payload index, and replays exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import (
    AgentCounters,
    CollectorStat,
    Command,
    CommandResult,
    Event,
    GpuInfo,
    GpuSample,
    Histogram,
    HostSample,
    ReplicaSample,
    Status,
    Telemetry,
)

GIB = 1 << 30


@dataclass(frozen=True)
class Raw:
    """JSON text put into a document as it is (NaN, 1e999, 10**40, deep nesting)."""

    text: bytes


def valid_messages(host: str, now: float, seq: int = 1) -> dict[str, msgspec.Struct]:
    """One valid message of each kind an agent sends, for ``host`` at ``now``."""
    gpus = [GpuSample(index=i, uuid=f"GPU-{i:04d}", name="NVIDIA A100", utilization_gpu_pct=50.0,
                      memory_used_bytes=20 * GIB, memory_total_bytes=80 * GIB,
                      temperature_c=60.0, power_w=250.0, throttle_reasons=["gpu_idle"],
                      ecc_corrected_total=0, ecc_uncorrected_total=0) for i in range(2)]
    replica = ReplicaSample(
        name="r0", runtime="vllm", up=True, scrape_ms=3.0, state="ready", deployment="chat",
        version="chat@1", url="http://127.0.0.1:9", gpus=[0], pid=123, started_at=now - 60,
        metrics={"requests_running": 1.0, "requests_finished_total": 100.0},
        histograms={"ttft_seconds": Histogram(sum=5.0, count=100.0,
                                              buckets=[(0.1, 50.0), (1.0, 100.0)])})
    return {
        "telemetry": Telemetry(
            host=host, run_id="fuzz-run", seq=seq, ts=now, interval_s=1.0,
            host_metrics=HostSample(cpu_pct=20.0, cpu_count=8, load_1m=1.0, load_5m=1.0,
                                    load_15m=1.0, memory_total_bytes=64 * GIB,
                                    memory_available_bytes=40 * GIB,
                                    memory_used_bytes=24 * GIB),
            gpus=gpus, replicas=[replica],
            collectors=[CollectorStat(name="nvml", ok=True, duration_ms=1.5)],
            agent=AgentCounters(commands_rejected={"bad_signature": 1})),
        "status": Status(host=host, state="online", ts=now, run_id="fuzz-run",
                         agent_version="0.0", interval_s=1.0, capabilities=["telemetry"],
                         gpus=[GpuInfo(index=0, uuid="GPU-0000", name="NVIDIA A100")],
                         runtimes=["vllm"]),
        "events": Event(host=host, ts=now, kind="xid", severity="critical", message="XID 79",
                        gpu=0, replica="r0", data={"xid": 79, "pid": None}),
        "results": CommandResult(command_id="c-1", host=host, status="error", ts=now,
                                 error="failed: nope", detail={"replica": "r0"}),
    }


def valid_command(now: float, seq: int = 1) -> Command:
    """A well-formed command envelope with a signature no agent key makes."""
    return Command(id=f"fuzz-{seq}", kind="stop_replica", issued_at=now, expires_at=now + 60,
                   key_id="fleet", body={"name": "r0", "drain": True}, sig="0" * 64)


_WEIRD_STRINGS = ["", "\u0000", "\ud800", "\udfff", "\u202e\u202d", "💥" * 100, "a" * 70_000,
                  "${jndi:ldap://x}", "../../../../etc/passwd", "llmops/v1/agents/+/#",
                  "\\", "\"", "\n\r\t", "NaN", "-0", " host ", "Ω≈ç√∫µ≤≥÷", "\x7f\x80"]
_WEIRD_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-999",
                  b"18446744073709551616", b"-9223372036854775809", b"1" + b"0" * 400,
                  b"-0", b"0.0000000000000000000001", b"9007199254740993", b"1.7976931348623157e308",
                  b"1E+2", b"0x10", b"01", b"+1", b".5", b"5.", b"1e", b"--1"]
_TYPE_SAMPLES: list[Any] = [None, True, False, 0, -1, 2**63, 1.5, "", "x", [], {}, [1, "a"],
                            {"a": {"b": []}}]


def dumps(value: Any, rng: random.Random) -> bytes:
    """JSON text of ``value``, with :class:`Raw` pieces put in verbatim and strings written
    ASCII-escaped or as raw UTF-8 (lone surrogates as the invalid bytes they make) at random."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b",".join(dumps(str(k), rng) + b":" + dumps(v, rng)
                                for k, v in value.items()) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(dumps(v, rng) for v in value) + b"]"
    if isinstance(value, str):
        ascii_ = rng.random() < 0.5
        return json.dumps(value, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


class Mutator:
    """Breaks one valid document (its JSON as Python values) into a hostile payload."""

    def __init__(self, rng: random.Random, hosts: list[str], limit: int) -> None:
        self.rng = rng
        self.hosts = hosts
        self.limit = limit  # the most bytes a payload may have (the broker's packet size)
        self.operators: list[Callable[[Any, bytes], bytes]] = [
            self.bit_flips, self.truncate, self.splice_bytes, self.type_swap, self.huge_number,
            self.deep_nesting, self.weird_string, self.oversize, self.wrong_version,
            self.wrong_host, self.drop_key, self.extra_keys, self.bad_timestamp,
            self.replace_root, self.duplicate_keys, self.valid_as_is]
        self.weights = [0.05 if op in (self.oversize, self.deep_nesting) else 1.0
                        for op in self.operators]

    def mutate(self, doc: Any) -> tuple[str, bytes]:
        rng = self.rng
        valid = dumps(doc, rng)
        # Payloads near the size limit are few: they cost the broker and the wire, not ingest.
        op = rng.choices(self.operators, self.weights)[0]
        payload = op(json.loads(valid), valid)
        if rng.random() < 0.1:  # a second, byte-level break on top
            payload = self.bit_flips(None, payload)
        return op.__name__, payload[:self.limit]

    def _path(self, doc: Any) -> tuple[Any, ...]:
        return self.rng.choice(list(_paths(doc)))

    def bit_flips(self, doc: Any, valid: bytes) -> bytes:
        data = bytearray(valid)
        for _ in range(self.rng.randint(1, 8)):
            if data:
                i = self.rng.randrange(len(data))
                data[i] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def truncate(self, doc: Any, valid: bytes) -> bytes:
        return valid[:self.rng.randrange(len(valid))]

    def splice_bytes(self, doc: Any, valid: bytes) -> bytes:
        i = self.rng.randrange(len(valid) + 1)
        junk = self.rng.choice([b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"}", b"]]",
                                b",", b'"', b"\\", bytes(self.rng.randbytes(16))])
        return valid[:i] + junk + valid[i:]

    def type_swap(self, doc: Any, valid: bytes) -> bytes:
        path = self._path(doc)
        return dumps(_set(doc, path, self.rng.choice(_TYPE_SAMPLES)), self.rng)

    def huge_number(self, doc: Any, valid: bytes) -> bytes:
        path = self._path(doc)
        return dumps(_set(doc, path, Raw(self.rng.choice(_WEIRD_NUMBERS))), self.rng)

    def deep_nesting(self, doc: Any, valid: bytes) -> bytes:
        depth = self.rng.choice([64, 1_000, 10_000, 100_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        return dumps(_set(doc, self._path(doc), Raw(opener * depth + closer * depth)), self.rng)

    def weird_string(self, doc: Any, valid: bytes) -> bytes:
        return dumps(_set(doc, self._path(doc), self.rng.choice(_WEIRD_STRINGS)), self.rng)

    def oversize(self, doc: Any, valid: bytes) -> bytes:
        size = self.rng.choice([(64 << 10) + 1, (64 << 10) + 1, (256 << 10) + 1, self.limit - 1024])
        pad = {"pad": "x" * size} if isinstance(doc, dict) else ["x" * size]
        if isinstance(doc, dict):
            doc.update(pad)
            return dumps(doc, self.rng)
        return dumps(pad, self.rng)

    def wrong_version(self, doc: Any, valid: bytes) -> bytes:
        doc["v"] = self.rng.choice([0, 2, 99, -1, "1", None, 1.5, 2**70, [1]])
        return dumps(doc, self.rng)

    def wrong_host(self, doc: Any, valid: bytes) -> bytes:
        key = "host" if "host" in doc else "id"
        doc[key] = self.rng.choice([*self.hosts, "", "-x", "a" * 64, "h/1", "h+", "#"])
        return dumps(doc, self.rng)

    def drop_key(self, doc: Any, valid: bytes) -> bytes:
        path = self._path(doc)
        if path and isinstance(_get(doc, path[:-1]), dict):
            del _get(doc, path[:-1])[path[-1]]
        return dumps(doc, self.rng)

    def extra_keys(self, doc: Any, valid: bytes) -> bytes:
        target = _get(doc, self._path(doc))
        if isinstance(target, dict):
            for i in range(self.rng.choice([1, 10, 1000])):
                target[f"unknown_{i}"] = self.rng.choice(_TYPE_SAMPLES)
        return dumps(doc, self.rng)

    def bad_timestamp(self, doc: Any, valid: bytes) -> bytes:
        key = self.rng.choice([k for k in ("ts", "issued_at", "expires_at", "seq", "interval_s")
                               if k in doc] or ["ts"])
        base = doc.get(key, 0)
        doc[key] = self.rng.choice([base * 1000 if isinstance(base, int | float) else 0, 0, -1,
                                    -(2**63), 2**63 - 1, Raw(b"NaN"), Raw(b"1e999"), 1e-300])
        return dumps(doc, self.rng)

    def replace_root(self, doc: Any, valid: bytes) -> bytes:
        return self.rng.choice([b"", b"null", b"[]", b"{}", b"0", b'""', b"true", b" ",
                                b"\xef\xbb\xbf{}", b"{" * 3, valid * 2, valid + b"garbage"])

    def duplicate_keys(self, doc: Any, valid: bytes) -> bytes:
        key = next(iter(doc), "v")
        return valid[:-1] + b"," + json.dumps(key).encode() + b':{"x":1}}'

    def valid_as_is(self, doc: Any, valid: bytes) -> bytes:
        return valid


def hostile_stream(kinds: list[str], hosts: list[str], bad_hosts: list[str], count: int,
                   seed: int, now: float, limit: int) -> Iterator[tuple[str, str, str, bytes]]:
    """``count`` (topic kind, host in the topic, operator, payload): mutations of valid messages
    of each kind, spread over ``hosts``, with a share on host names no topic may carry."""
    rng = random.Random(seed)
    mutator = Mutator(rng, hosts, limit)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        host = rng.choice(bad_hosts) if bad_hosts and rng.random() < 0.02 else rng.choice(hosts)
        if kind == "commands":
            base: msgspec.Struct = valid_command(now, i)
        else:
            base = valid_messages(host, now, seq=rng.randint(1, 50))[kind]
        op, payload = mutator.mutate(json.loads(codec.encode(base)))
        yield kind, host, op, payload


# --- hypothesis: arbitrary JSON, and arbitrary bytes, for the in-process properties ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)


@st.composite
def message_like(draw: st.DrawFn, kind: str) -> bytes:
    """A document shaped like a ``kind`` message: its fields, each a valid or arbitrary value."""
    doc = json.loads(codec.encode(valid_messages("h1", 1_700_000_000.0)[kind]
                                  if kind != "commands" else valid_command(1_700_000_000.0)))
    for key in list(doc):
        if draw(st.booleans()):
            doc[key] = draw(json_values)
    return dumps(doc, random.Random(draw(st.integers(0, 2**32))))


payload_bytes = st.binary(max_size=2048)
