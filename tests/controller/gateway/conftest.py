"""The gateway tests' event loops (test_upstream.py runs on asyncio's and on uvloop's, the
gateway's own; the other tests on asyncio's) and the controller stand-in most of them use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import pytest

from tests.controller.gateway.harness import FakeController, serve


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops = getattr(getattr(item, "module", None), "LOOPS", None)
    return loops if loops is not None else {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def controller() -> AsyncIterator[tuple[FakeController, str]]:
    """A controller stand-in serving the deployments' endpoints, and its URL."""
    fake = FakeController()
    runner, url = await serve(fake.app())
    yield fake, url
    await runner.cleanup()
