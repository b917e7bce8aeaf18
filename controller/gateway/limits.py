"""Per-key limits: token buckets for requests and tokens per minute, and size caps.

Plain functions of their inputs and a clock: no I/O. A request is charged its prompt estimate
plus its ``max_tokens`` up front; :meth:`KeyLimits.settle` gives back what it did not use
once the real usage is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llm_ops_helper.controller.gateway.config import KeyConfig

# Without a tokenizer: about four characters a token, the usual rule for English text.
CHARS_PER_TOKEN = 4


class TokenBucket:
    """``per_minute`` tokens a minute, at most ``per_minute`` held; a level below zero is a
    debt (a request that used more than it was charged), paid back before the next one."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.at = now

    def _fill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` can be taken (0: now). A cost above the capacity counts as
        the capacity, so one large request is slow, not impossible."""
        self._fill(now)
        short = min(cost, self.capacity) - self.level
        return 0.0 if short <= 0 else short / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 400 or 429
    message: str
    code: str
    retry_after_s: int | None = None


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat or completion body, from its characters."""
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.get("text", "")) for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) for p in prompt if isinstance(p, str))
    return math.ceil(chars / CHARS_PER_TOKEN)


def requested_completion_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class KeyLimits:
    """One key's buckets and caps."""

    def __init__(self, key: KeyConfig, now: float) -> None:
        self.key = key
        self.requests = TokenBucket(key.rpm, now) if key.rpm else None
        self.tokens = TokenBucket(key.tpm, now) if key.tpm else None

    def check_sizes(self, prompt_tokens: int, completion_tokens: int | None) -> Refusal | None:
        cap = self.key.max_prompt_tokens
        if cap is not None and prompt_tokens > cap:
            return Refusal(400, f"the prompt has about {prompt_tokens} tokens; this key allows "
                                f"at most {cap}", "context_length_exceeded")
        cap = self.key.max_completion_tokens
        if cap is not None and completion_tokens is not None and completion_tokens > cap:
            return Refusal(400, f"max_tokens is {completion_tokens}; this key allows at most "
                                f"{cap}", "max_tokens_exceeded")
        return None

    def admit(self, cost: int, now: float) -> Refusal | None:
        """Take one request and ``cost`` tokens, or say how long to wait (taking nothing)."""
        wait_r = self.requests.wait_s(1, now) if self.requests else 0.0
        wait_t = self.tokens.wait_s(cost, now) if self.tokens else 0.0
        if wait_r > 0 or wait_t > 0:
            which = "requests" if wait_r >= wait_t else "tokens"
            limit = self.key.rpm if which == "requests" else self.key.tpm
            return Refusal(429, f"rate limit reached for key {self.key.name!r}: {limit} "
                                f"{which} per minute", "rate_limit_exceeded",
                           max(1, math.ceil(max(wait_r, wait_t))))
        if self.requests:
            self.requests.take(1)
        if self.tokens:
            self.tokens.take(cost)
        return None

    def settle(self, charged: int, used: int) -> None:
        """The request used ``used`` tokens of the ``charged``: give back or take the rest."""
        if self.tokens is None or used == charged:
            return
        if used < charged:
            self.tokens.give(charged - used)
        else:
            self.tokens.take(used - charged)
