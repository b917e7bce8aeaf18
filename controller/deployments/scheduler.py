"""Where replicas go: a pure function from the fleet as it is now to a placement, with reasons.

The scheduler sees hosts as :class:`HostView` s (built from the fleet and the firing alerts by
:func:`host_view`) and places the replicas of one deployment on online, healthy hosts that run
its runtime, on GPUs with enough free memory and no open critical alert (an XID, an uncorrected
ECC error, a failed row remap, a GPU that stopped answering). Every placement carries the reason
it went there and every refusal says, with numbers, why nothing fits.

Free memory is what telemetry saw free minus the :class:`Reservation` s the caller passes: the
replicas placed but not yet ready (pending, fetching, starting), whose weights may not have
reached the GPU when the snapshot was taken. A ready replica's memory is already in the reading,
so the caller passes no reservation for it. A replica half loaded is counted twice, which errs
towards not over-committing a GPU; the next reconcile sees the truth.

Order of preference for each replica: the host with the fewest replicas of this deployment
(spread: one host lost takes as few as possible with it); among those, the host with the most
free GPU memory (least loaded, as Kubernetes' default LeastAllocated scoring); then by name.
Within the host, the GPUs that fit most tightly (best fit), so whole GPUs stay free for the big
models that need one. A replica of several GPUs takes them on one host.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llm_ops_helper.controller.fleet import HostState
from llm_ops_helper.proto.messages import Alert, GpuSample

GIB = 1 << 30
# Alerts that make a GPU untrustworthy until someone drains and resets (or replaces) it.
CRITICAL_GPU_RULES = frozenset({"gpu_xid", "gpu_ecc_uncorrected", "gpu_row_remap_failed",
                                "gpu_unhealthy"})


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True, slots=True)
class GpuView:
    index: int
    uuid: str = ""
    name: str = ""
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None  # None: not known (no telemetry yet)
    healthy: bool = True
    critical: str | None = None  # why it must not be used, e.g. "open alert gpu_xid: ..."


@dataclass(frozen=True, slots=True)
class HostView:
    host: str
    online: bool = True
    runtimes: tuple[str, ...] = ()
    gpus: tuple[GpuView, ...] = ()
    unhealthy: str | None = None  # why no replica may go there now


@dataclass(frozen=True, slots=True)
class Reservation:
    """GPU memory held for a replica placed on ``host`` but not yet ready (bytes per GPU)."""

    host: str
    gpus: tuple[int, ...]
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    deployment: str
    runtime: str
    gpus_per_replica: int = 1  # 0: CPU only
    gpu_memory_bytes: int = 0  # per GPU; 0: not stated, any usable GPU will do
    count: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus_per_replica", "gpu_memory_bytes", "count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Placed:
    host: str
    gpus: tuple[int, ...]
    why: str


@dataclass(frozen=True, slots=True)
class Placement:
    placed: tuple[Placed, ...]
    refused: str | None  # why the rest of the request could not be placed; None: all placed


@dataclass(frozen=True, slots=True)
class _Fit:
    host: HostView
    gpus: tuple[tuple[GpuView, int | None], ...]  # chosen GPUs, free bytes before this replica
    free: int  # free memory on the host's usable GPUs, for the tie-break


def place(request: PlacementRequest, hosts: Sequence[HostView],
          reservations: Iterable[Reservation] = (),
          existing_per_host: Mapping[str, int] | None = None) -> Placement:
    """Place ``request.count`` replicas, each accounting for the ones placed before it.

    ``existing_per_host`` counts the replicas of this deployment already on each host (they are
    what spreading spreads against); ``reservations`` hold memory of replicas not yet ready.
    """
    reserved: dict[tuple[str, int], int] = {}
    starting: Counter[tuple[str, int]] = Counter()  # replicas not yet ready, per GPU
    for r in reservations:
        for i in r.gpus:
            reserved[(r.host, i)] = reserved.get((r.host, i), 0) + r.memory_bytes
            starting[(r.host, i)] += 1
    spread = dict(existing_per_host or {})
    ordered = sorted(hosts, key=lambda h: h.host)
    placed: list[Placed] = []
    for n in range(request.count):
        fits = [f for h in ordered if (f := _fit(request, h, reserved, starting)) is not None]
        if not fits:
            left = request.count - n
            return Placement(tuple(placed), f"{left} of {_plural(request.count, 'replica')} of "
                             f"{request.deployment} not placed: "
                             f"{_refusal(request, ordered, reserved)}")
        fits.sort(key=lambda f: (spread.get(f.host.host, 0), -f.free, f.host.host))
        best = fits[0]
        placed.append(Placed(best.host.host, tuple(g.index for g, _ in best.gpus),
                             _why(request, best, fits, spread)))
        spread[best.host.host] = spread.get(best.host.host, 0) + 1
        for g, _ in best.gpus:
            key = (best.host.host, g.index)
            reserved[key] = reserved.get(key, 0) + request.gpu_memory_bytes
            starting[key] += 1
    return Placement(tuple(placed), None)


def _eligible(request: PlacementRequest, host: HostView) -> bool:
    return host.online and host.unhealthy is None and request.runtime in host.runtimes


def _free(host: HostView, gpu: GpuView, reserved: Mapping[tuple[str, int], int]) -> int | None:
    if gpu.memory_free_bytes is None:
        return None
    return max(0, gpu.memory_free_bytes - reserved.get((host.host, gpu.index), 0))


def _usable(gpu: GpuView) -> bool:
    return gpu.healthy and gpu.critical is None


def _fit(request: PlacementRequest, host: HostView,
         reserved: Mapping[tuple[str, int], int],
         starting: Mapping[tuple[str, int], int]) -> _Fit | None:
    if not _eligible(request, host):
        return None
    need, k = request.gpu_memory_bytes, request.gpus_per_replica
    if k == 0:
        return _Fit(host, (), 0)
    usable = [(g, _free(host, g, reserved)) for g in host.gpus if _usable(g)]
    room = [(g, free) for g, free in usable
            if need == 0 or (free is not None and free >= need)]
    if len(room) < k:
        return None
    if need:  # best fit: the tightest GPUs, leaving whole ones for models that need them
        room.sort(key=lambda gf: (gf[1] or 0, gf[0].index))
    else:  # size unknown, so its memory does not show as reserved: count replicas instead
        room.sort(key=lambda gf: (starting.get((host.host, gf[0].index), 0), gf[1] is None,
                                  -(gf[1] or 0), gf[0].index))
    return _Fit(host, tuple(room[:k]), sum(free or 0 for _, free in usable))


def _gpu_part(request: PlacementRequest, fit: _Fit) -> str:
    if not fit.gpus:
        return f"CPU only (runtime {request.runtime})"
    gpus = ", ".join(f"GPU {g.index} ({_memory(free, g.memory_total_bytes)})"
                     for g, free in fit.gpus)
    if request.gpu_memory_bytes:
        each = " each" if len(fit.gpus) > 1 else ""
        return f"{gpus}, best fit for {gib(request.gpu_memory_bytes)}{each}"
    return f"{gpus}, fewest replicas starting then most free (no GPU memory requested)"


def _memory(free: int | None, total: int | None) -> str:
    if free is None:
        return "free memory unknown" + ("" if total is None else f", {gib(total)} total")
    return f"{gib(free)} free" + ("" if total is None else f" of {gib(total)}")


def _why(request: PlacementRequest, best: _Fit, fits: list[_Fit],
         spread: Mapping[str, int]) -> str:
    n = spread.get(best.host.host, 0)
    why = (f"{best.host.host}: {_gpu_part(request, best)}; "
           f"{_plural(n, 'replica')} of {request.deployment} there before, the fewest of "
           f"{_plural(len(fits), 'host')} that fit")
    tied = [f for f in fits if spread.get(f.host.host, 0) == n]
    if len(tied) > 1:
        if best.free > tied[1].free:
            why += f"; most free GPU memory ({gib(best.free)}) of the {len(tied)} tied"
        else:
            why += f"; first by name of the {len(tied)} tied"
    return why


def _refusal(request: PlacementRequest, hosts: Sequence[HostView],
             reserved: Mapping[tuple[str, int], int]) -> str:
    eligible = [h for h in hosts if _eligible(request, h)]
    need, k = request.gpu_memory_bytes, request.gpus_per_replica
    if not hosts:
        main = "no hosts are known"
    elif not eligible:
        main = f"no online, healthy host offers runtime {request.runtime}"
    else:
        main = _short_of_gpus(request, eligible, reserved)
    parts = [main]
    offline = [h.host for h in hosts if not h.online]
    if offline:
        parts.append(f"offline: {', '.join(offline)}")
    sick = [f"{h.host} ({h.unhealthy})" for h in hosts if h.online and h.unhealthy is not None]
    if sick:
        parts.append(f"unhealthy: {', '.join(sick)}")
    lacking = [f"{h.host} (has {', '.join(h.runtimes) or 'none'})" for h in hosts
               if h.online and h.unhealthy is None and request.runtime not in h.runtimes]
    if lacking:
        parts.append(f"without runtime {request.runtime}: {', '.join(lacking)}")
    if k:
        excluded = [f"{h.host} GPU {g.index} ({g.critical or 'unhealthy'})"
                    for h in eligible for g in h.gpus if not _usable(g)]
        if excluded:
            parts.append(f"GPUs excluded: {', '.join(excluded)}")
        unknown = [f"{h.host} GPU {g.index}" for h in eligible for g in h.gpus
                   if _usable(g) and g.memory_free_bytes is None]
        if need and unknown:
            parts.append(f"free memory unknown: {', '.join(unknown)}")
    return "; ".join(parts)


def _short_of_gpus(request: PlacementRequest, eligible: Sequence[HostView],
                   reserved: Mapping[tuple[str, int], int]) -> str:
    need, k = request.gpu_memory_bytes, request.gpus_per_replica
    frees = [(free, h.host, g.index) for h in eligible for g in h.gpus
             if _usable(g) and (free := _free(h, g, reserved)) is not None]
    largest = min(frees, key=lambda t: (-t[0], t[1], t[2]), default=None)
    counts = {h.host: sum(1 for g in h.gpus if _usable(g) and (
        need == 0 or ((f := _free(h, g, reserved)) is not None and f >= need)))
        for h in eligible}
    most = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if need == 0:
        return f"no host has {_plural(k, 'usable GPU')}; the most is {most[1]} on {most[0]}"
    head = (f"no host has {gib(need)} free on one GPU" if k == 1
            else f"no host has {k} GPUs with {gib(need)} free each; the most is {most[1]} "
                 f"on {most[0]}")
    if largest is None:
        return f"{head}; no usable GPU with known free memory"
    return f"{head}; largest free is {gib(largest[0])} on {largest[1]} GPU {largest[2]}"


def feasible(request: PlacementRequest, hosts: Sequence[HostView]) -> str | None:
    """None if some online host could ever hold one replica (its runtime, GPU count and GPU
    sizes, ignoring what runs there now and its alerts); else why none could.

    A GPU whose size is not known is given the benefit of the doubt: this check rejects what
    can never fit, not what cannot be confirmed yet.
    """
    online = sorted((h for h in hosts if h.online), key=lambda h: h.host)
    if not online:
        return "no host is online"
    with_runtime = [h for h in online if request.runtime in h.runtimes]
    if not with_runtime:
        offered = sorted({r for h in online for r in h.runtimes})
        return (f"no online host offers runtime {request.runtime} "
                f"(offered: {', '.join(offered) or 'none'})")
    need, k = request.gpu_memory_bytes, request.gpus_per_replica
    if k == 0:
        return None
    big = {h.host: sum(1 for g in h.gpus if g.memory_total_bytes is None
                       or g.memory_total_bytes >= need) for h in with_runtime}
    if max(big.values()) >= k:
        return None
    where = f"online host with runtime {request.runtime}"
    if need == 0:
        roomy = min(with_runtime, key=lambda h: (-len(h.gpus), h.host))
        return (f"no {where} has {_plural(k, 'GPU')}; the most is {len(roomy.gpus)} "
                f"on {roomy.host}")
    sized = [(g.memory_total_bytes, h.host, g.index) for h in with_runtime for g in h.gpus
             if g.memory_total_bytes is not None]
    largest = min(sized, key=lambda t: (-t[0], t[1], t[2]), default=None)
    if k == 1:
        head = f"no {where} has a GPU of {gib(need)} or more"
    else:
        host, most = min(big.items(), key=lambda kv: (-kv[1], kv[0]))
        head = f"no {where} has {k} GPUs of {gib(need)} or more; the most is {most} on {host}"
    if largest is None:
        return f"{head}; no host reports a GPU"
    return f"{head}; the largest is {gib(largest[0])} on {largest[1]} GPU {largest[2]}"


# Which replica goes first on scale-down: the ones serving nothing (failed, stopped, draining
# anyway), then the ones still on their way (pending, fetching), then starting; ready last.
_VICTIM_RANK = {"failed": 0, "stopped": 0, "draining": 0, "pending": 1, "fetching": 1,
                "starting": 2}


def pick_victims(replicas: Sequence[tuple[str, str, str, float]], count: int,
                 per_host: Mapping[str, int] | None = None) -> list[str]:
    """The ``count`` replicas to remove, as (name, host, state, created_at) tuples give them.

    Not-ready ones first; then one from the host with the most replicas of the deployment
    (``per_host``, counted from ``replicas`` when not given), re-counted after each pick so
    that removals keep the spread; then the newest (the oldest has proven itself longest).
    """
    counts = dict(per_host) if per_host is not None else {}
    if per_host is None:
        for _, host, _, _ in replicas:
            counts[host] = counts.get(host, 0) + 1
    left = list(replicas)
    out: list[str] = []
    while left and len(out) < count:
        victim = min(left, key=lambda r: (_VICTIM_RANK.get(r[2], 3), -counts.get(r[1], 0),
                                          -r[3], r[0]))
        left.remove(victim)
        counts[victim[1]] = counts.get(victim[1], 0) - 1
        out.append(victim[0])
    return out


def host_view(state: HostState, alerts: Iterable[Alert]) -> HostView:
    """What the scheduler needs of one host: its last telemetry (free memory), its retained
    status (runtimes, GPU inventory) and the open critical alerts on its GPUs. A critical
    alert that names no GPU (an XID the driver did not attribute) bars every GPU of the host.
    """
    critical: dict[int | None, str] = {}
    for a in alerts:
        if a.state == "firing" and a.host == state.host and a.rule in CRITICAL_GPU_RULES:
            critical.setdefault(a.gpu, f"open alert {a.rule}: {a.summary}")
    inventory = {g.index: g for g in state.status.gpus} if state.status else {}
    samples: Sequence[GpuSample] = state.telemetry.gpus if state.telemetry else []
    gpus: list[GpuView] = []
    for s in samples:
        info = inventory.get(s.index)
        total = s.memory_total_bytes if s.memory_total_bytes is not None else (
            info.memory_total_bytes if info else None)
        free = (None if total is None or s.memory_used_bytes is None or not s.healthy
                else max(0, total - s.memory_used_bytes))
        gpus.append(GpuView(s.index, s.uuid, s.name or (info.name if info else ""), total, free,
                            s.healthy, critical.get(s.index) or critical.get(None)))
    if not samples:  # no telemetry yet: the inventory, with free memory unknown
        gpus = [GpuView(g.index, g.uuid, g.name, g.memory_total_bytes, None, True,
                        critical.get(g.index) or critical.get(None))
                for g in inventory.values()]
    runtimes = tuple(state.status.runtimes) if state.status else ()
    return HostView(state.host, state.online, runtimes, tuple(sorted(gpus, key=lambda g: g.index)))
