"""The gateway tests' event loops: test_upstream.py runs on asyncio's and on uvloop's (the
gateway's own); the other tests on asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops = getattr(getattr(item, "module", None), "LOOPS", None)
    return loops if loops is not None else {"asyncio": asyncio.new_event_loop}
