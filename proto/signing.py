"""HMAC-SHA256 signing and verification of command envelopes.

The signature covers the canonical encoding of every field but ``sig``: JSON with sorted keys,
as msgspec writes it. Verification checks, in order: the key is known, the signature matches
(constant-time), the command is inside its validity window, and its ``id`` was not seen before.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from .messages import Command

_canonical = msgspec.json.Encoder(order="sorted")

REJECT_REASONS: Final = (
    "unsigned", "unknown_key", "bad_signature", "expired", "not_yet_valid",
    "lifetime_too_long", "replayed", "replay_cache_full",
)


class CommandRejected(Exception):
    """A command that must not be applied. ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_bytes(command: Command) -> bytes:
    fields: dict[str, Any] = msgspec.to_builtins(command)
    del fields["sig"]
    return _canonical.encode(fields)


def signature(command: Command, secret: bytes) -> str:
    return hmac.new(secret, canonical_bytes(command), hashlib.sha256).hexdigest()


def sign_command(
    kind: str,
    body: Mapping[str, Any],
    *,
    key_id: str,
    secret: bytes,
    command_id: str,
    ttl_s: float = 60.0,
    now: float | None = None,
) -> Command:
    issued = time.time() if now is None else now
    unsigned = Command(id=command_id, kind=kind, issued_at=issued, expires_at=issued + ttl_s,
                       key_id=key_id, body=dict(body))
    return msgspec.structs.replace(unsigned, sig=signature(unsigned, secret))


class CommandVerifier:
    """Verifies commands against a set of keys (two during a rotation) and a replay cache.

    The replay cache keeps each accepted ``id`` until its command expires; since lifetimes are
    capped at ``max_lifetime_s`` the cache is bounded by the command rate times that cap.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        max_lifetime_s: float = 600.0,
        clock_skew_s: float = 30.0,
        max_cached_ids: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = dict(keys)
        self.max_lifetime_s = max_lifetime_s
        self.clock_skew_s = clock_skew_s
        self.max_cached_ids = max_cached_ids
        self.clock = clock
        self._seen: dict[str, float] = {}

    def verify(self, command: Command) -> None:
        if not command.sig:
            raise CommandRejected("unsigned", f"command {command.id!r} carries no signature")
        secret = self.keys.get(command.key_id)
        if secret is None:
            raise CommandRejected("unknown_key", f"key id {command.key_id!r} is not configured")
        expected = signature(command, secret).encode("ascii")
        # Compare bytes: compare_digest raises TypeError on a str with non-ASCII characters,
        # which a hostile publisher could otherwise put in ``sig``.
        if not hmac.compare_digest(expected, command.sig.encode("utf-8", "surrogatepass")):
            raise CommandRejected("bad_signature", f"signature of command {command.id!r} "
                                  f"does not match key {command.key_id!r}")
        now = self.clock()
        lifetime = command.expires_at - command.issued_at
        # The checks are written as "not (within bounds)" so that NaN fails them, and the
        # lifetime bound as issued_at + cap (the sum sign_command computes) so that a ttl of
        # exactly the cap passes despite float rounding.
        if not command.expires_at <= command.issued_at + self.max_lifetime_s:
            raise CommandRejected("lifetime_too_long", f"lifetime {lifetime:.0f} s exceeds "
                                  f"{self.max_lifetime_s:.0f} s")
        if not now <= command.expires_at + self.clock_skew_s:
            raise CommandRejected("expired", f"command {command.id!r} expired "
                                  f"{now - command.expires_at:.1f} s ago")
        if not command.issued_at <= now + self.clock_skew_s:
            raise CommandRejected("not_yet_valid", f"command {command.id!r} is issued "
                                  f"{command.issued_at - now:.1f} s in the future")
        self._remember(command, now)

    def _remember(self, command: Command, now: float) -> None:
        if command.id in self._seen:
            raise CommandRejected("replayed", f"command id {command.id!r} was already accepted")
        if len(self._seen) >= self.max_cached_ids:
            horizon = now - self.clock_skew_s
            self._seen = {cid: exp for cid, exp in self._seen.items() if exp >= horizon}
            if len(self._seen) >= self.max_cached_ids:
                raise CommandRejected("replay_cache_full", f"{len(self._seen)} unexpired "
                                      "command ids are cached; refusing rather than forgetting")
        self._seen[command.id] = command.expires_at
