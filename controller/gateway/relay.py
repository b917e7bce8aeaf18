"""Rewriting an OpenAI answer on its way through: redaction and usage, streamed or whole.

A stream is relayed event by event as it arrives (no buffering beyond one SSE event). Each
``data:`` event's JSON has its choices' text passed through a :class:`Redactor` per choice
(text a redactor holds back, because a match may continue in the next chunk, is let out with
the choice's last chunk or before ``[DONE]``), and its usage noted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()


class Redactor(Protocol):
    def feed(self, text: str) -> str: ...
    def flush(self) -> str: ...


@dataclass(slots=True)
class Usage:
    prompt: int | None = None
    completion: int | None = None
    chunks: int = 0  # chunks with text: the completion's tokens when no usage came


def sse(data: Any) -> bytes:
    return b"data: " + _encode.encode(data) + b"\n\n"


@dataclass(slots=True)
class StreamRewriter:
    """One streamed answer's state: a redactor per choice, the usage seen, a template chunk."""

    chat: bool
    new_redactor: Callable[[], Redactor] | None
    drop_usage_chunk: bool  # the client did not ask for usage; the gateway did, for metering
    usage: Usage = field(default_factory=Usage)
    done: bool = False
    _redactors: dict[int, Redactor] = field(default_factory=dict)
    _head: dict[str, Any] | None = None

    def _redactor(self, index: int) -> Redactor | None:
        if self.new_redactor is None:
            return None
        if (r := self._redactors.get(index)) is None:
            r = self._redactors[index] = self.new_redactor()
        return r

    def line(self, line: bytes) -> bytes | None:
        """The line to send for one received line (None: drop it)."""
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return self.flush() + line
        try:
            chunk = _decode.decode(payload)
        except msgspec.DecodeError:
            return line
        if not isinstance(chunk, dict):
            return line
        changed = False
        if isinstance(usage := chunk.get("usage"), dict):
            self.usage.prompt = usage.get("prompt_tokens", self.usage.prompt)
            self.usage.completion = usage.get("completion_tokens", self.usage.completion)
        choices = chunk.get("choices")
        if not choices and self.drop_usage_chunk and chunk.get("usage") is not None:
            return None
        if isinstance(choices, list):
            self._head = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
            for choice in choices:
                if isinstance(choice, dict):
                    changed |= self._choice(choice)
        if not changed:
            return line
        return b"data: " + _encode.encode(chunk) + b"\n"

    def _choice(self, choice: dict[str, Any]) -> bool:
        holder = choice.get("delta") if self.chat else choice
        if not isinstance(holder, dict):
            return False
        text = holder.get("content" if self.chat else "text")
        if isinstance(text, str) and text:
            self.usage.chunks += 1
        index = choice.get("index", 0)
        redactor = self._redactor(index if isinstance(index, int) else 0)
        if redactor is None:
            return False
        out = redactor.feed(text) if isinstance(text, str) else ""
        if choice.get("finish_reason") is not None:
            out += redactor.flush()
            self._redactors.pop(index if isinstance(index, int) else 0, None)
        if out == (text or ""):
            return False
        if out or isinstance(text, str):
            holder["content" if self.chat else "text"] = out
        return True

    def flush(self) -> bytes:
        """Chunks carrying the text still held back (before ``[DONE]`` or an error)."""
        out = b""
        for index, redactor in sorted(self._redactors.items()):
            text = redactor.flush()
            if text:
                choice: dict[str, Any] = {"index": index, "finish_reason": None}
                if self.chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                out += sse({**(self._head or {}), "choices": [choice]})
        self._redactors.clear()
        return out


def redact_whole(answer: Any, chat: bool, redact: Callable[[str], str] | None) -> bool:
    """Redact a whole (non-streamed) answer in place; True if anything changed."""
    if redact is None or not isinstance(answer, dict):
        return False
    changed = False
    for choice in answer.get("choices") or []:
        holder = choice.get("message") if chat and isinstance(choice, dict) else choice
        key = "content" if chat else "text"
        if isinstance(holder, dict) and isinstance(text := holder.get(key), str):
            out = redact(text)
            if out != text:
                holder[key] = out
                changed = True
    return changed
