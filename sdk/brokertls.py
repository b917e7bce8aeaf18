"""TLS for the MQTT links of the agent and the controller: one SSLContext from config paths.

The context is built twice: once while loading the config (:func:`check_tls`: a missing,
unreadable or malformed certificate is a config error naming the key, exit 78, not a retry
loop), and once per connection attempt (:func:`settings_context`). A handshake failure at
connect time is an ordinary connection error, retried with backoff; :func:`handshake_hint`
says what to check in the log line, and :func:`connect_hint` does for a refused login or a
broker that never answered.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec

from llm_ops_helper.tomlfile import ConfigError

SYSTEM_CAS = "the system's default CAs"
TLS_FILES = ("ca_file", "cert_file", "key_file")


class TlsSettings(Protocol):
    """The TLS keys of the agent's and the controller's ``[broker]`` sections."""

    @property
    def tls(self) -> bool: ...
    @property
    def ca_file(self) -> str: ...
    @property
    def cert_file(self) -> str: ...
    @property
    def key_file(self) -> str: ...
    @property
    def tls_insecure(self) -> bool: ...


class LoginSettings(TlsSettings, Protocol):
    """The whole ``[broker]`` login of the agent and the controller: TLS and credentials."""

    @property
    def username(self) -> str: ...
    @property
    def password_file(self) -> str: ...


S = TypeVar("S", bound=msgspec.Struct)

# aiomqtt's error when no CONNACK came within its timeout. Mosquitto closes a client it turns
# away before CONNACK (plain MQTT on its TLS listener, no client certificate where one is
# required) without a reason, and aiomqtt waits out its timeout on such a close: this string
# is all the link is told.
NO_CONNACK = "Operation timed out"
# MQTT v5 CONNACK reason codes of a refused login: 134 bad user name or password, 135 not
# authorized (what Mosquitto answers to a wrong password or an unknown user).
REFUSED_LOGIN = ("[code:134]", "[code:135]")
# A TLS client on a plain listener: Mosquitto takes the ClientHello for a malformed packet
# and resets the connection in the middle of the handshake.
HANDSHAKE_RESET = "Connection reset by peer"


class TlsConfigError(ValueError):
    """A TLS file that cannot be used; ``key`` names the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def client_context(ca_file: str, cert_file: str, key_file: str,
                   insecure: bool = False) -> ssl.SSLContext:
    """A TLS client context that verifies the broker against ``ca_file`` (or the system CAs).

    ``cert_file``/``key_file`` (both or neither) present a client certificate, for a broker
    with ``require_certificate true``. ``insecure`` skips only the host name check (the
    certificate chain is still verified), for a broker reached by an address its certificate
    does not name.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except OSError as exc:
        raise TlsConfigError("ca_file", f"cannot load CA certificates from {ca_file!r}: "
                             f"{_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file or None)
        except OSError as exc:
            raise TlsConfigError("cert_file", f"cannot load client certificate {cert_file!r} "
                                 f"with key {key_file!r}: {_reason(exc)}") from None
    if insecure:
        context.check_hostname = False
    return context


def settings_context(broker: TlsSettings) -> ssl.SSLContext | None:
    """The context for a ``[broker]`` section; None when ``tls`` is off."""
    if not broker.tls:
        return None
    return client_context(broker.ca_file, broker.cert_file, broker.key_file,
                          broker.tls_insecure)


def check_tls(broker: TlsSettings, source: str, resolve: Callable[[str], Path]) -> None:
    """Raise :class:`ConfigError` naming the ``broker.*`` key whose TLS setting is unusable."""
    if not broker.tls:
        for key in (*TLS_FILES, "tls_insecure"):
            if getattr(broker, key):
                raise ConfigError(f"{source}: key 'broker.{key}': set, but broker.tls is false "
                                  "(set tls = true to use it, or remove it)")
        return
    if bool(broker.cert_file) != bool(broker.key_file):
        missing = "key_file" if broker.cert_file else "cert_file"
        raise ConfigError(f"{source}: key 'broker.{missing}': a client certificate needs both "
                          "broker.cert_file and broker.key_file")
    paths: dict[str, str] = {}
    for key in TLS_FILES:
        value: str = getattr(broker, key)
        if not value:
            paths[key] = ""
            continue
        path = resolve(value)
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{source}: key 'broker.{key}': cannot read {value!r}: "
                              f"{exc.strerror}") from None
        paths[key] = str(path)
    try:
        client_context(paths["ca_file"], paths["cert_file"], paths["key_file"])
    except TlsConfigError as exc:
        raise ConfigError(f"{source}: key 'broker.{exc.key}': {exc}") from None


def with_tls_paths(broker: S, resolve: Callable[[str], Path]) -> S:
    """``broker`` with its TLS files resolved against the config file's directory."""
    changes = {key: str(resolve(getattr(broker, key))) for key in TLS_FILES
               if getattr(broker, key)}
    return msgspec.structs.replace(broker, **changes)


def handshake_hint(error: str, ca_file: str) -> str | None:
    """What to check when a connection failed in the TLS handshake; None for other errors."""
    if "CERTIFICATE_VERIFY_FAILED" in error:
        return (f"the broker's certificate does not verify against {ca_file or SYSTEM_CAS} "
                "(wrong ca_file, expired certificate, or a host name it does not name)")
    if "SSL" in error or "TLS" in error or HANDSHAKE_RESET in error:
        return "TLS handshake failed: is the broker's listener TLS, and is this its TLS port?"
    return None


def connect_hint(error: str, broker: LoginSettings) -> str | None:
    """What to check when the broker refused the login or never answered the CONNECT; None
    for other errors (see :func:`handshake_hint` for TLS handshakes)."""
    if any(code in error for code in REFUSED_LOGIN):
        if not broker.username:
            return ("the broker wants a login: set broker.username and broker.password_file "
                    "(a user of its password file)")
        return (f"the broker refused user {broker.username!r}: check broker.username and the "
                f"password in broker.password_file ({broker.password_file or 'not set'}) "
                "against the broker's password file")
    if NO_CONNACK not in error:
        return None
    if not broker.tls:
        return ("the broker took the connection but never answered the MQTT CONNECT: if its "
                "listener is TLS (port 8883 in mosquitto-tls.conf), set broker.tls = true and "
                "broker.ca_file")
    if not broker.cert_file:
        return ("the broker took the TLS connection but never answered the MQTT CONNECT: if "
                "it sets require_certificate true, set broker.cert_file and broker.key_file to "
                "a client certificate signed by its cafile")
    return None


def _reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    return str(reason or exc.strerror or exc)
