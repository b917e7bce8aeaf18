"""Redaction of secrets and personal data in responses, whole or streamed.

One scanner serves both: :func:`redact` scans a whole text, :class:`StreamRedactor` scans the
text it holds and emits only the part no later chunk can change, so its output equals
``redact`` of the concatenation for any split into chunks.

Why the held tail is enough: every pattern other than a private key consumes characters of
one of two classes (``_WORD``: keys, tokens, JWTs, e-mails; ``_DIGITS``: phones and cards) and
looks at most one character past them, or a few before. A match starting before the last run
of either class reaches no further than a character the redactor already has, so it is the
match the whole text would give. A private key block is held from its ``-----BEGIN`` while the
text after it can still belong to the block.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Literal

__all__ = ["KINDS", "RedactKind", "StreamRedactor", "luhn_ok", "redact"]

RedactKind = Literal["api_key", "private_key", "email", "phone", "card"]
KINDS: tuple[RedactKind, ...] = ("api_key", "private_key", "email", "phone", "card")

_KEY_BODY = r"[A-Za-z0-9+/=\s:,\-]"  # base64 lines, PEM headers, the END line
_PATTERN = re.compile(
    # private key blocks (PEM, OpenSSH)
    r"(?P<private_key>-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----" + _KEY_BODY
    + r"{0,16384}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)"
    r"|(?P<api_key>(?<![A-Za-z0-9_\-])(?:"
    r"sk-ant-[A-Za-z0-9_\-]{20,}"  # Anthropic
    r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"  # OpenAI
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|xox[abpros]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|llmops_[A-Za-z0-9_\-]{43}"  # this project's own API tokens
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/\-]{16,}=*"  # any bearer token
    r")(?![A-Za-z0-9_\-]))"
    r"|(?P<email>(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9\-]{1,63}\.)+"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9\-]|\.[A-Za-z0-9]))"
    # 13-19 digits in groups, starting like a card (2-6); kept only if the Luhn check passes
    r"|(?P<card>(?<![\d\-.])[2-6](?:[ \-]?\d){12,18}(?![\d]|[ \-.]\d))"
    r"|(?P<phone>(?<![\w+\-.])(?:"
    r"\+[1-9]\d{0,2}(?:[ .\-]?\(?\d{1,4}\)?){2,5}"  # E.164, with or without separators
    r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}|\d{3}[.\-]\d{3}[.\-]\d{4}"  # North American
    r"|0\d{2,4}[ \-]\d{3,4}[ \-]\d{3,4}"  # national trunk prefix 0, grouped
    r")(?![\d]|[ .\-]\d))"
)
# Something every match contains (or, for a bearer token, the word just before it): text without
# any of these has nothing to redact, found by a search far cheaper than _PATTERN's (whose
# look-behinds defeat the regex engine's first-character skip).
_GATE = re.compile(r"[@\d]|-----BEGIN|sk-|AKIA|ASIA|gh[pousr]_|github_pat_|xox[abpros]-|AIza"
                   r"|llmops_|eyJ|[Bb]earer ")
_GATE_BACK = len("Bearer ")
_LOOKBEHIND = 16  # characters of already-emitted text the patterns may look back at
_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-=+/~%@")
_DIGITS = frozenset("0123456789 ()+.-")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:,-"
                       " \t\r\n\f\v")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_ok(found: str) -> bool:
    return 7 <= sum(ch.isdigit() for ch in found) <= 15


def _scan(text: str, start: int,
          kinds: frozenset[RedactKind]) -> Iterator[tuple[int, int, RedactKind | None]]:
    """Spans the pattern consumes from ``start`` on; kind None: seen, but not a secret to redact."""
    if _GATE.search(text, max(0, start - _GATE_BACK)) is None:
        return
    for match in _PATTERN.finditer(text, start):
        kind: RedactKind | None = match.lastgroup  # type: ignore[assignment]
        found = match.group()
        if (kind == "card" and not luhn_ok(re.sub(r"[ \-]", "", found))) or (
                kind == "phone" and not _phone_ok(found)):
            kind = None
        yield match.start(), match.end(), kind if kind in kinds else None


def _apply(text: str, start: int, end: int, spans: Iterable[tuple[int, int, RedactKind | None]],
           counts: Counter[str]) -> str:
    out: list[str] = []
    pos = start
    for s, e, kind in spans:
        if kind is None:
            continue
        out.append(text[pos:s])
        out.append(f"[redacted:{kind}]")
        counts[kind] += 1
        pos = e
    out.append(text[pos:end])
    return "".join(out)


def redact(text: str, kinds: Iterable[RedactKind] = KINDS) -> tuple[str, Counter[str]]:
    """``text`` with every secret replaced by ``[redacted:KIND]``, and the count by kind."""
    counts: Counter[str] = Counter()
    return _apply(text, 0, len(text), _scan(text, 0, frozenset(kinds)), counts), counts


def _run_start(text: str, chars: frozenset[str]) -> int | None:
    """Where the run of ``chars`` that ends ``text`` starts; None: all of ``text`` is in it."""
    i = len(text)
    while i > 0 and text[i - 1] in chars:
        i -= 1
    return i if i > 0 else None


_BEGIN = "-----BEGIN"
_CLASSES = (_WORD, _DIGITS, _KEY_CHARS)


class StreamRedactor:
    """Redacts a streamed response chunk by chunk, holding back what a later chunk could change.

    ``feed`` returns the text that is safe to send now, ``flush`` the rest at the end of the
    stream; their concatenation equals ``redact`` of the whole text. ``redactions`` counts what
    was replaced, by kind.
    """

    def __init__(self, kinds: Iterable[RedactKind] = KINDS,
                 total: Counter[str] | None = None) -> None:
        self.kinds = frozenset(kinds)
        self.redactions: Counter[str] = Counter()
        self.total = total  # a counter shared by many streams (a guard profile's), if any
        # Positions ending in _at count characters from the start of the stream.
        self._text = ""  # a little emitted text for look-behind, then the held text
        self._text_at = 0  # where self._text starts
        self._pending: list[str] = []  # fed, not yet joined onto self._text
        self._end_at = 0
        self._held_at = 0  # where the held text starts
        self._runs_at = [0, 0, 0]  # where the trailing run of each of _CLASSES starts
        self._begin_at: int | None = None  # a "-----BEGIN" inside the trailing key-chars run
        self._last = ""  # the last few characters fed, to find "-----BEGIN" across chunks

    def feed(self, text: str) -> str:
        if not self.kinds:
            self._pending.append(text)
            return self.flush()
        # Only the new text is looked at until something can be sent, so a long run (a held
        # key, a wall of digits) costs time in proportion to its length, not its square.
        start_at = self._end_at
        self._end_at += len(text)
        self._pending.append(text)
        for i, chars in enumerate(_CLASSES):
            if (run := _run_start(text, chars)) is not None:
                self._runs_at[i] = start_at + run
        if self._begin_at is not None and self._begin_at < self._runs_at[2]:
            self._begin_at = None
        window_at = start_at - len(self._last)
        window = self._last + text
        if self._begin_at is None:
            found = window.find(_BEGIN, max(0, self._runs_at[2] - window_at))
            if found != -1:
                self._begin_at = window_at + found
        self._last = window[-(len(_BEGIN) - 1):]
        cut_at = min(self._runs_at[0], self._runs_at[1])
        if self._begin_at is not None:
            cut_at = min(cut_at, self._begin_at)
        if cut_at <= self._held_at:
            return ""
        self._join()
        held, cut = self._held_at - self._text_at, cut_at - self._text_at
        spans = []
        for s, e, kind in _scan(self._text, held, self.kinds):
            if s >= cut:
                break
            if e > cut:  # determined, but simpler to send it with what follows
                cut = s
                break
            spans.append((s, e, kind))
        return self._emit(cut, spans)

    def flush(self) -> str:
        self._join()
        held = self._held_at - self._text_at
        return self._emit(len(self._text), _scan(self._text, held, self.kinds))

    def _join(self) -> None:
        if self._pending:
            self._text += "".join(self._pending)
            self._pending.clear()

    def _emit(self, cut: int, spans: Iterable[tuple[int, int, RedactKind | None]]) -> str:
        held = self._held_at - self._text_at
        if cut <= held:
            return ""
        counts: Counter[str] = Counter()
        out = _apply(self._text, held, cut, spans, counts)
        self.redactions.update(counts)
        if self.total is not None:
            self.total.update(counts)
        keep = max(0, cut - _LOOKBEHIND)
        self._text = self._text[keep:]
        self._text_at += keep
        self._held_at = self._text_at + cut - keep
        return out
