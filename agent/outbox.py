"""What the agent has to send, kept while the broker is away and sent oldest first.

Two lanes: ``urgent`` (events and command results, small and rare) is always drained before
``telemetry`` (one snapshot per interval). Each lane is bounded; when a lane is full the oldest
message is dropped and counted, so a long outage costs the oldest data, never memory.

A message being published when its lane overflows leaves the lane but is counted as dropped only
if that publish then fails: a counted drop is always a ``seq`` the controller never sees.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1


class Lane:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.items: deque[Outgoing] = deque()
        self.dropped = 0
        self.in_flight: list[Outgoing] = []
        self.evicted_in_flight: list[Outgoing] = []

    def append(self, item: Outgoing) -> None:
        if len(self.items) >= self.capacity:
            oldest = self.items.popleft()
            if any(oldest is sent for sent in self.in_flight):
                self.evicted_in_flight.append(oldest)
            else:
                self.dropped += 1
        self.items.append(item)

    def settle(self, succeeded: bool) -> None:
        if not succeeded:
            self.dropped += len(self.evicted_in_flight)
        self.in_flight.clear()
        self.evicted_in_flight.clear()


class Outbox:
    def __init__(self, telemetry_capacity: int, urgent_capacity: int = 10_000) -> None:
        self.urgent = Lane(urgent_capacity)
        self.telemetry = Lane(telemetry_capacity)
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return len(self.urgent.items) + len(self.telemetry.items)

    @property
    def dropped(self) -> int:
        return self.urgent.dropped + self.telemetry.dropped

    def put_urgent(self, item: Outgoing) -> None:
        self.urgent.append(item)
        self._nonempty.set()

    def put_telemetry(self, item: Outgoing) -> None:
        self.telemetry.append(item)
        self._nonempty.set()

    async def wait(self) -> None:
        while not len(self):
            self._nonempty.clear()
            await self._nonempty.wait()

    def head(self, limit: int) -> list[Outgoing]:
        """Up to ``limit`` of the oldest messages, urgent first; they stay until :meth:`done`."""
        lane = self.urgent if self.urgent.items else self.telemetry
        batch = [lane.items[i] for i in range(min(limit, len(lane.items)))]
        lane.in_flight = list(batch)
        return batch

    def done(self, sent: list[Outgoing]) -> None:
        """Forget acknowledged messages (any a full lane dropped meanwhile are gone already)."""
        for item in sent:
            for lane in (self.urgent, self.telemetry):
                if lane.items and lane.items[0] is item:
                    lane.items.popleft()
                    break
        for lane in (self.urgent, self.telemetry):
            lane.settle(succeeded=True)

    def failed(self) -> None:
        """The batch from :meth:`head` was not acknowledged: what a full lane evicted is lost."""
        for lane in (self.urgent, self.telemetry):
            lane.settle(succeeded=False)
