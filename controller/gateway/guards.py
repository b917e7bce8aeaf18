"""Input and output guards of the gateway: checks that allow, redact or block, each counted.

A :class:`Guards` is built once per guard profile (``[guards.NAME]`` in the gateway TOML, read
into :class:`GuardConfig`) and shared by the keys and models that name it. Input checks run in
order on the request's messages (or completion prompt); the first ``block`` wins, a ``redact``
replaces the messages for the checks after it. Output redaction runs on whole responses with
:func:`redact` and on streams with :meth:`Guards.redactor`, which gives the same text for any
split into chunks. A request whose key and model both have guards gets a :class:`GuardChain`
of the two: security checks only add up.

A blocked request gets :func:`openai_error`'s body; what gets logged about the offending text
is :func:`fingerprint` (a hash and a length), never the text.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import msgspec

from llm_ops_helper.controller.gateway.injection import THRESHOLD as INJECTION_THRESHOLD
from llm_ops_helper.controller.gateway.injection import HeuristicClassifier, InjectionClassifier
from llm_ops_helper.controller.gateway.redact import KINDS, RedactKind, StreamRedactor, redact
from llm_ops_helper.tomlfile import ConfigError, describe

__all__ = [
    "KINDS",
    "DenyListCheck",
    "GuardChain",
    "GuardConfig",
    "Guards",
    "HeuristicClassifier",
    "InjectionCheck",
    "InjectionClassifier",
    "InputCheck",
    "Messages",
    "RedactKind",
    "RedactorChain",
    "SizeCheck",
    "StreamRedactor",
    "Verdict",
    "build_guards",
    "fingerprint",
    "openai_error",
    "parse_guard_config",
    "redact",
]

Messages = list[dict[str, Any]] | str  # the chat messages, or a completion prompt
Action = Literal["allow", "redact", "block"]


class Verdict(msgspec.Struct, frozen=True):
    """One check's decision. ``messages`` is the rewritten input when ``action == "redact"``."""

    action: Action
    check: str
    reason: str
    score: float | None = None
    messages: Messages | None = None


_ALLOWED = Verdict("allow", "", "")  # what a request no check acted on gets (shared: frozen)


class InputCheck(Protocol):
    """One input check; ``name`` is what the error code and the counters call it."""

    name: str

    def check(self, messages: Messages, *, prompt_tokens: int) -> Verdict: ...


class GuardConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One ``[guards.NAME]`` profile of the gateway TOML."""

    max_request_chars: int | None = 400_000  # of all message text together
    max_prompt_tokens: int | None = None
    injection: bool = True
    injection_threshold: float | None = None  # None: the heuristic's tuned threshold
    deny_words: list[str] = []  # whole words, case-insensitive
    deny_patterns: list[str] = []  # Python regular expressions, case-insensitive
    deny_action: Literal["block", "redact"] = "block"
    redact_output: bool = True
    redact_kinds: list[RedactKind] = msgspec.field(default_factory=lambda: list(KINDS))


def parse_guard_config(raw: dict[str, Any], where: str) -> GuardConfig:
    """``raw`` (a TOML table) as a :class:`GuardConfig`; :class:`ConfigError` names ``where``."""
    try:
        config = msgspec.convert(raw, GuardConfig)
    except msgspec.ValidationError as exc:
        key, expected = describe(exc, GuardConfig)
        raise ConfigError(f"{where}.{key}: {expected}") from None
    for pattern in config.deny_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}.deny_patterns: {pattern!r} is not a valid regular "
                              f"expression ({exc})") from None
    return config


def fingerprint(text: str) -> str:
    """What a log line may say about offending text: a short hash and the length."""
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]} len:{len(text)}"


def openai_error(check: str, message: str) -> dict[str, Any]:
    """The OpenAI-style error body of a request blocked by ``check``."""
    return {"error": {"message": f"Request blocked by the gateway's {check} guard: {message}",
                      "type": "invalid_request_error", "param": None,
                      "code": f"guard_blocked:{check}"}}


def texts(messages: Messages) -> list[tuple[str, str]]:
    """(role, text) of every text part of the input; a completion prompt has role "prompt"."""
    if isinstance(messages, str):
        return [("prompt", messages)]
    found: list[tuple[str, str]] = []
    for message in messages:
        role = str(message.get("role", ""))
        content = message.get("content")
        if isinstance(content, str):
            found.append((role, content))
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            found.extend((role, part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return found


def _rewrite(messages: Messages, change: Callable[[str], str]) -> Messages:
    """``messages`` with ``change`` applied to every text part (a copy; the input is kept)."""
    if isinstance(messages, str):
        return change(messages)
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message = {**message, "content": change(content)}
        elif isinstance(content, list):
            message = {**message, "content": [
                {**part, "text": change(part["text"])}
                if isinstance(part, dict) and isinstance(part.get("text"), str) else part
                for part in content]}
        out.append(message)
    return out


def _allow(check: str) -> Verdict:
    return Verdict("allow", check, "")


class SizeCheck:
    """Blocks a request whose text or prompt token count is over the profile's limits."""

    name = "size"

    def __init__(self, max_chars: int | None, max_prompt_tokens: int | None) -> None:
        self.max_chars = max_chars
        self.max_prompt_tokens = max_prompt_tokens

    def check(self, messages: Messages, *, prompt_tokens: int) -> Verdict:
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return Verdict("block", self.name, f"prompt has {prompt_tokens} tokens, over the "
                           f"limit of {self.max_prompt_tokens}")
        if self.max_chars is not None:
            size = sum(len(text) for _, text in texts(messages))
            if size > self.max_chars:
                return Verdict("block", self.name, f"prompt has {size} characters, over the "
                               f"limit of {self.max_chars}")
        return _allow(self.name)


class DenyListCheck:
    """Blocks (or redacts) words and patterns the operator listed."""

    name = "deny_list"

    def __init__(self, words: list[str], patterns: list[str],
                 action: Literal["block", "redact"] = "block") -> None:
        self.words = words
        self.patterns = patterns
        self.action = action
        parts = [rf"\b{re.escape(w)}\b" for w in words] + [f"(?:{p})" for p in patterns]
        self._pattern = re.compile("|".join(parts), re.IGNORECASE) if parts else None

    def check(self, messages: Messages, *, prompt_tokens: int) -> Verdict:
        pattern = self._pattern
        if pattern is None:
            return _allow(self.name)
        hits = sum(len(pattern.findall(text)) for _, text in texts(messages))
        if not hits:
            return _allow(self.name)
        if self.action == "block":
            return Verdict("block", self.name, f"prompt contains {hits} denied term(s)")
        return Verdict("redact", self.name, f"{hits} denied term(s) removed",
                       messages=_rewrite(messages, lambda t: pattern.sub("[removed]", t)))


class InjectionCheck:
    """Blocks prompt injection and jailbreaks scored at or above ``threshold``.

    Every text part is scored on its own (a retrieved document in a tool message is as
    suspect as the user's turn); the request's score is the highest.
    """

    name = "injection"

    def __init__(self, classifier: InjectionClassifier | None = None,
                 threshold: float | None = None) -> None:
        self.classifier: InjectionClassifier = classifier or HeuristicClassifier()
        self.threshold = INJECTION_THRESHOLD if threshold is None else threshold

    def check(self, messages: Messages, *, prompt_tokens: int) -> Verdict:
        worst, where = 0.0, ""
        for role, text in texts(messages):
            if role in ("system", "developer"):
                continue  # the operator's own instructions
            score = self.classifier.score(text)
            if score > worst:
                worst, where = score, role
        if worst >= self.threshold:
            return Verdict("block", self.name, f"the {where} text looks like prompt injection "
                           f"(score {worst:.2f}, threshold {self.threshold:.2f})", score=worst)
        return Verdict("allow", self.name, "", score=worst)


class Guards:
    """A profile's input checks and output redaction, with counts of every decision."""

    def __init__(self, input_checks: list[InputCheck], redact_output: bool,
                 redact_kinds: frozenset[RedactKind] = frozenset(KINDS)) -> None:
        self.input_checks = input_checks
        self.redact_output = redact_output
        self.redact_kinds = redact_kinds
        self.counts: Counter[tuple[str, str]] = Counter()  # (check, action)
        self.redactions: Counter[str] = Counter()  # by kind, over whole and streamed responses

    def check_input(self, messages: Messages, *, prompt_tokens: int) -> Verdict:
        """The first block, else the last redact (its ``messages`` to forward), else allow."""
        result = _ALLOWED
        for check in self.input_checks:
            verdict = check.check(messages, prompt_tokens=prompt_tokens)
            self.counts[check.name, verdict.action] += 1
            if verdict.action == "block":
                return verdict
            if verdict.action == "redact" and verdict.messages is not None:
                messages = verdict.messages
                result = verdict
        return result

    def redactor(self) -> StreamRedactor:
        """A stream redactor for one response (a pass-through when redaction is off)."""
        return StreamRedactor(self.redact_kinds if self.redact_output else (), self.redactions)

    def redact(self, text: str) -> str:
        """A whole response, redacted; counted in :attr:`redactions`."""
        if not self.redact_output:
            return text
        out, counts = redact(text, self.redact_kinds)
        self.redactions.update(counts)
        return out


class RedactorChain:
    """Stream redactors in turn: what one lets out is fed to the next, so the stream comes out
    as the redactors' whole-text redactions, one after the other, would leave it."""

    def __init__(self, redactors: Sequence[StreamRedactor]) -> None:
        self.redactors = redactors

    def feed(self, text: str) -> str:
        for redactor in self.redactors:
            text = redactor.feed(text)
        return text

    def flush(self) -> str:
        text = ""
        for redactor in self.redactors:  # what the one before held back goes through this one
            text = redactor.feed(text) + redactor.flush() if text else redactor.flush()
        return text


class GuardChain:
    """Several profiles' guards on one request (a key's, then its model's); each counts its own.

    Input: each profile checks what the one before let through, its redaction included; the
    first block wins, else the last redaction (its ``messages`` carry the earlier ones), else
    allow. Output: every profile that redacts does, in turn, on whole and streamed answers.
    """

    def __init__(self, parts: Sequence[Guards]) -> None:
        self.parts = tuple(parts)
        self.redacting = tuple(part for part in self.parts if part.redact_output)

    def check_input(self, messages: Messages, *, prompt_tokens: int) -> Verdict:
        result = _ALLOWED
        for part in self.parts:
            verdict = part.check_input(messages, prompt_tokens=prompt_tokens)
            if verdict.action == "block":
                return verdict
            if verdict.action == "redact" and verdict.messages is not None:
                messages = verdict.messages
                result = verdict
        return result

    def redactor(self) -> StreamRedactor | RedactorChain:
        if len(self.redacting) == 1:
            return self.redacting[0].redactor()
        if not self.redacting:
            return self.parts[0].redactor()  # a pass-through
        return RedactorChain([part.redactor() for part in self.redacting])

    def redact(self, text: str) -> str:
        for part in self.redacting:
            text = part.redact(text)
        return text


def build_guards(config: GuardConfig) -> Guards:
    """The checks of one profile, in order: size, deny list, injection."""
    checks: list[InputCheck] = [SizeCheck(config.max_request_chars, config.max_prompt_tokens)]
    if config.deny_words or config.deny_patterns:
        checks.append(DenyListCheck(config.deny_words, config.deny_patterns, config.deny_action))
    if config.injection:
        checks.append(InjectionCheck(threshold=config.injection_threshold))
    return Guards(checks, config.redact_output, frozenset(config.redact_kinds))
