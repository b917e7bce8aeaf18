"""A deployment's desired state as users write it, and the checks that name the field at fault.

:func:`parse_spec` turns a request body into a :class:`DeploymentSpec` or raises
:class:`~llm_ops_helper.controller.deployments.errors.Invalid` with one line such as
``spec field 'replicas': expected an int >= 0, got -1``. What can only be checked against the
registry and the fleet (does the model exist, does any host have that much GPU memory) is the
engine's job, at apply time.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

from llm_ops_helper.controller.deployments.errors import Invalid
from llm_ops_helper.tomlfile import describe

KNOWN_RUNTIMES: Final = ("llamacpp", "vllm", "sglang", "sim", "command")
# Runtimes that load a file the controller serves (the others may fetch by source_uri).
ARTIFACT_RUNTIMES: Final = frozenset({"llamacpp", "sim"})
# A replica name is "{deployment}-r{revision}-{6 hex}" and must stay within 63 characters.
NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
MODEL_REF: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(?:@[A-Za-z0-9._-]{1,63})?")
ENV_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The most replicas one deployment may ask for (spec, /scale): a typo of 20000 must not make
# the controller place twenty thousand replicas.
MAX_REPLICAS: Final = 1000

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
ReplicaCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Strict(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    pass


class RollbackPolicy(_Strict, kw_only=True, frozen=True):
    # Roll back by itself when a new replica fails or the canary comparison says so.
    auto: bool = True
    # After the first new replica is ready, hold the rollout this long and compare it with the
    # old ones (0: no comparison).
    observe_s: NonNegFloat = 30.0
    # New error rate above old + this (absolute, 0.05 = 5 points) fails the rollout.
    error_rate_margin: NonNegFloat = 0.05
    # New mean time to first token above old x this fails the rollout.
    ttft_ratio_margin: Annotated[float, msgspec.Meta(ge=1.0)] = 1.5
    # Fewer requests than this on either side over the window: no verdict, the rollout goes on.
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20


class AutoscaleSpec(_Strict, kw_only=True, frozen=True):
    # off: replicas as set; advisory: decide and explain, change nothing; on: write the count.
    mode: Literal["off", "advisory", "on"] = "off"
    # Fraction of a replica's learned capacity to plan for.
    target_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    # Scale down only to the largest recommendation of this window.
    scale_down_window_s: NonNegFloat = 300.0
    # The latency objectives capacity is learned against (window means; see signals.py).
    ttft_slo_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    itl_slo_s: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    # Tokens/s (prompt + generated) one replica sustains: only where learning starts.
    capacity_tokens_per_s: Annotated[float, msgspec.Meta(gt=0)] = 1000.0
    # Waiting requests one more replica absorbs.
    queue_per_replica: Annotated[float, msgspec.Meta(gt=0)] = 8.0
    # Seconds between decisions; None: the controller's [autoscale] interval_s.
    interval_s: Annotated[float, msgspec.Meta(gt=0)] | None = None


class DeploymentSpec(_Strict, kw_only=True, frozen=True):
    model: str
    runtime: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    replicas: ReplicaCount = 1
    gpus_per_replica: NonNegInt = 1
    # Per GPU; 0: estimated from the artifact (size x 1.2 + 256 MiB), or most of a GPU.
    gpu_memory_bytes: NonNegInt = 0
    min_replicas: ReplicaCount = 0
    max_replicas: ReplicaCount | None = None
    max_surge: NonNegInt = 1
    max_unavailable: NonNegInt = 0
    ready_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    drain_timeout_s: NonNegFloat = 30.0
    command: list[str] = []
    health_path: str = "/health"
    metrics_path: str | None = "/metrics"
    metrics_format: str | None = None
    rollback: RollbackPolicy = RollbackPolicy()
    autoscale: AutoscaleSpec = AutoscaleSpec()


# Fields whose change makes new replicas (a new revision); the others act on the running ones.
REVISION_FIELDS: Final = ("runtime", "args", "env", "gpus_per_replica", "gpu_memory_bytes",
                          "ready_timeout_s", "drain_timeout_s", "command", "health_path",
                          "metrics_path", "metrics_format")


def parse_spec(body: bytes) -> DeploymentSpec:
    if not body.strip():
        raise Invalid("spec: the request body is empty; expected a JSON deployment spec "
                      'such as {"model": "tiny@1", "replicas": 2}')
    try:
        spec = msgspec.json.decode(body, type=DeploymentSpec)
    except msgspec.ValidationError as exc:
        key, expected = describe(exc, DeploymentSpec)
        raise Invalid(f"spec field '{key}': {expected}") from None
    except msgspec.DecodeError as exc:
        raise Invalid(f"spec: not valid JSON: {exc}") from None
    check_spec(spec)
    return spec


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise Invalid(f"deployment name {name!r}: expected 1-40 characters of lowercase "
                      "letters, digits and '-', starting and ending with a letter or digit")
    return name


def check_spec(spec: DeploymentSpec) -> None:
    if not MODEL_REF.fullmatch(spec.model):
        raise Invalid(f"spec field 'model': expected 'name', 'name@N' or 'name@alias', "
                      f"got {spec.model!r}")
    if spec.runtime is not None and spec.runtime not in KNOWN_RUNTIMES:
        raise Invalid(f"spec field 'runtime': unknown runtime {spec.runtime!r} "
                      f"(known: {', '.join(KNOWN_RUNTIMES)})")
    if spec.runtime == "command" and not spec.command:
        raise Invalid("spec field 'command': the command runtime needs an argv, e.g. "
                      '["my-server", "--port", "{port}", "--model", "{model}"]')
    top = spec.max_replicas
    if top is not None and top < spec.min_replicas:
        raise Invalid(f"spec field 'max_replicas': {top} is below min_replicas "
                      f"{spec.min_replicas}")
    check_replicas(spec, spec.replicas)
    if spec.autoscale.mode != "off" and top is None:
        raise Invalid(f"spec field 'max_replicas': autoscale mode {spec.autoscale.mode!r} "
                      "needs a maximum (the most replicas the autoscaler may ask for)")
    if spec.max_surge == 0 and spec.max_unavailable == 0:
        raise Invalid("spec fields 'max_surge' and 'max_unavailable' are both 0: a rolling "
                      "update could neither add a replica nor remove one")
    for key in spec.env:
        if not ENV_KEY.fullmatch(key):
            raise Invalid(f"spec field 'env': {key!r} is not a valid environment variable name")
    for field, path in (("health_path", spec.health_path), ("metrics_path", spec.metrics_path)):
        if path is not None and not path.startswith("/"):
            raise Invalid(f"spec field '{field}': expected a path starting with '/', "
                          f"got {path!r}")


def check_replicas(spec: DeploymentSpec, replicas: int) -> None:
    if not 0 <= replicas <= MAX_REPLICAS:
        raise Invalid(f"replicas: expected an int from 0 to {MAX_REPLICAS}, got {replicas}")
    if replicas < spec.min_replicas:
        raise Invalid(f"replicas: {replicas} is below min_replicas {spec.min_replicas}")
    if spec.max_replicas is not None and replicas > spec.max_replicas:
        raise Invalid(f"replicas: {replicas} is above max_replicas {spec.max_replicas}")


def revision_key(spec: DeploymentSpec, version: str) -> tuple[object, ...]:
    """What identifies a revision: the resolved version and every field its replicas run."""
    return (version, *(_freeze(getattr(spec, f)) for f in REVISION_FIELDS))


def _freeze(value: object) -> object:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return value
