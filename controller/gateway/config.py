"""The gateway's config file, read once into frozen structs.

    [http]
    host = "127.0.0.1"
    port = 8080

    [controller]
    url = "http://127.0.0.1:8470"
    token_file = "controller.token"   # bearer token for the controller API (a file, not inline)
    refresh_s = 2.0

    [limits]
    max_body_bytes = 1048576
    hold_s = 30.0          # how long a request waits for a ready replica (scale from zero)

    [state]
    dir = "/var/lib/llmops/gateway"   # usage.sqlite lives here

    [[keys]]
    name = "team-a"
    sha256 = "..."          # of the API key; the key itself is never stored
    models = ["*"]
    rpm = 600
    tpm = 100000
    max_prompt_tokens = 4096
    max_completion_tokens = 1024
    guards = "default"      # a profile of [guards.NAME], or an inline table

    [[models]]
    name = "tiny"           # a deployment: its versions and aliases (tiny@2) too
    guards = "strict"       # on every request to it, as well as the key's own

A bad file raises :class:`ConfigError` naming the file and the key (exit 78).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import msgspec

from llm_ops_helper.controller.deployments.spec import NAME as DEPLOYMENT_NAME
from llm_ops_helper.controller.gateway.guards import GuardConfig, parse_guard_config
from llm_ops_helper.tomlfile import (
    EX_CONFIG,
    ConfigError,
    NonNegative,
    Positive,
    Section,
    parse,
    read_secret,
    read_text,
    resolve,
)

__all__ = ["EX_CONFIG", "ConfigError", "GatewayConfig", "KeyConfig", "ModelConfig", "load",
           "parse_config"]

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,100}$")
GuardSpec = str | dict[str, Any] | None  # a profile's name, an inline table, or no guards


class Http(Section, kw_only=True, frozen=True):
    # Address the gateway listens on.
    host: str = "127.0.0.1"
    # The gateway's port (0: any free port).
    port: Port = 8080


class Controller(Section, kw_only=True, frozen=True):
    # The controller API the gateway reads deployments and replicas from, http://HEAD:8470
    # (the controller's http.port; required).
    url: str
    # A file holding a controller API token (viewer is enough).
    token_file: str | None = None
    # How often deployments and their ready replicas are re-read.
    refresh_s: Positive = 2.0


class Limits(Section, kw_only=True, frozen=True):
    # Larger request bodies are refused with 413.
    max_body_bytes: PositiveInt = 1_048_576
    # A request waits this long for a ready replica (scale from zero) before 503.
    hold_s: NonNegative = 30.0
    # A replica that does not accept in time is passed over for another.
    connect_timeout_s: Positive = 2.0
    # Between two chunks of a backend's answer; past this the stream ends with an error event.
    read_timeout_s: Positive = 120.0
    # A replica that refused a connection is passed over this long.
    suspect_s: Positive = 5.0


class State(Section, kw_only=True, frozen=True):
    # Where usage.sqlite (requests and tokens per hour, key and model) lives (required).
    dir: str
    # Usage counters are written to SQLite this often.
    flush_s: Positive = 1.0


class KeyConfig(Section, kw_only=True, frozen=True):
    # The key's name in usage, metrics and logs (1-100 of A-Z a-z 0-9 _ . @ : -).
    name: str
    # SHA-256 (hex) of the API key: `printf %s "$KEY" | sha256sum`; the key itself is never stored.
    sha256: Sha256
    # Deployment names (or name@N) the key may call; "*": all.
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    # Requests per minute (token bucket; 429 with Retry-After); unset: no limit.
    rpm: PositiveInt | None = None
    # Tokens per minute: prompt estimate + max_tokens, settled after.
    tpm: PositiveInt | None = None
    # Larger prompts are refused with 400.
    max_prompt_tokens: PositiveInt | None = None
    # Larger max_tokens are refused with 400; a request without one gets this.
    max_completion_tokens: PositiveInt | None = None
    # A guard profile's name, or an inline table of guard keys; unset: no guards.
    guards: GuardSpec = None

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class ModelConfig(Section, kw_only=True, frozen=True):
    # A deployment's name; its versions and aliases (name@N, name@alias) are guarded with it.
    name: str
    # A guard profile's name, or an inline table of guard keys, for every request to this
    # deployment; a key's own guards apply as well.
    guards: GuardSpec = None


class GatewayConfig(Section, kw_only=True, frozen=True):
    controller: Controller
    state: State
    http: Http = Http()
    limits: Limits = Limits()
    # API keys the gateway accepts.
    keys: list[KeyConfig] = msgspec.field(default_factory=list)
    # Deployments with guards of their own, which a request to one gets besides its key's.
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    # Guard profiles, [guards.NAME], that keys and models name.
    guards: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # Least level written to the JSON log (debug, info, warning, error).
    log_level: str = "info"
    # Filled by load(): the controller token read from its file; the config's directory.
    controller_token: str | None = None
    source: str = ""

    def state_dir(self) -> Path:
        return resolve(self.source, self.state.dir)

    def guard_config(self, key: KeyConfig) -> GuardConfig | None:
        """The guards a key names (a profile or an inline table); None: no guards."""
        return self._guards_of(key.guards, f"keys.{key.name}.guards")

    def model_guard_config(self, model: ModelConfig) -> GuardConfig | None:
        """The guards a deployment names (a profile or an inline table); None: no guards."""
        return self._guards_of(model.guards, f"models.{model.name}.guards")

    def _guards_of(self, spec: GuardSpec, inline_where: str) -> GuardConfig | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            return parse_guard_config(self.guards[spec], f"guards.{spec}")
        return parse_guard_config(spec, inline_where)


def parse_config(text: str, source: str) -> GatewayConfig:
    config = parse(text, source, GatewayConfig)
    if config.controller_token is not None or config.source:  # filled below, not by the file
        raise ConfigError(f"{source}: key 'controller_token'/'source': unknown key (remove it)")
    seen: set[str] = set()
    for i, key in enumerate(config.keys):
        where = f"{source}: key 'keys[{i}]' ({key.name!r})"
        if not _NAME.match(key.name):
            raise ConfigError(f"{where}: name: expected 1-100 of A-Z a-z 0-9 _ . @ : -")
        if key.name in seen:
            raise ConfigError(f"{where}: name: duplicate key name")
        if key.sha256 in {k.sha256 for k in config.keys[:i]}:
            raise ConfigError(f"{where}: sha256: the same API key is listed twice")
        seen.add(key.name)
        _check_profile(config, key.guards, where)
        if not key.models:
            raise ConfigError(f"{where}: models: expected at least one model or \"*\"")
    _check_models(config, source)
    try:
        for name, raw in config.guards.items():
            parse_guard_config(raw, f"guards.{name}")
        for key in config.keys:
            config.guard_config(key)
        for model in config.models:
            config.model_guard_config(model)
    except ConfigError as exc:
        raise ConfigError(f"{source}: key {exc}") from None
    token = None
    if config.controller.token_file is not None:
        token = read_secret(source, config.controller.token_file,
                            "controller.token_file").decode()
    return msgspec.structs.replace(config, controller_token=token, source=source)


def _check_profile(config: GatewayConfig, spec: GuardSpec, where: str) -> None:
    if isinstance(spec, str) and spec not in config.guards:
        raise ConfigError(f"{where}: guards: no profile [guards.{spec}] "
                          f"(profiles: {', '.join(config.guards) or 'none'})")


def _check_models(config: GatewayConfig, source: str) -> None:
    seen: set[str] = set()
    for i, model in enumerate(config.models):
        where = f"{source}: key 'models[{i}]' ({model.name!r})"
        if not DEPLOYMENT_NAME.fullmatch(model.name):
            raise ConfigError(f"{where}: name: expected a deployment's name (1-40 of a-z 0-9 -, "
                              "no @version: its versions and aliases are guarded with it)")
        if model.name in seen:
            raise ConfigError(f"{where}: name: duplicate model name")
        seen.add(model.name)
        _check_profile(config, model.guards, where)


def load(path: str | Path) -> GatewayConfig:
    return parse_config(read_text(path), str(path))
