"""HTTP probes of a replica: health (readiness and liveness) and in-flight requests (drain)."""

from __future__ import annotations

import asyncio
import errno

import aiohttp

from llm_ops_helper.agent.collectors.metric_map import mappings
from llm_ops_helper.agent.collectors.runtime import MetricsParseError, MetricsParser

PROBE_TIMEOUT_S = 2.0


async def probe_health(session: aiohttp.ClientSession, url: str,
                       timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers 200; otherwise what went wrong, in a few words."""
    try:
        async with asyncio.timeout(timeout_s), session.get(url) as resp:
            if resp.status == 200:
                return None
            return f"HTTP {resp.status} from {url}"
    except TimeoutError:
        return f"no answer from {url} within {timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        if exc.os_error.errno == errno.ECONNREFUSED:
            return f"connection refused to {url}"
        return f"cannot connect to {url}: {exc.os_error.strerror or exc.os_error}"
    except aiohttp.ClientError as exc:
        return f"{type(exc).__name__} from {url}: {exc}"


class InFlight:
    """Requests running or queued on one replica, from its /metrics page."""

    def __init__(self, metrics_url: str | None, metrics_format: str | None) -> None:
        self.url = metrics_url
        self.parser = (MetricsParser(metrics_format)
                       if metrics_url and metrics_format in mappings() else None)

    async def read(self, session: aiohttp.ClientSession) -> float | None:
        """In-flight requests; 0 for a replica with no readable metrics (nothing to wait for
        but the drain delay); None when the page cannot be read now."""
        if self.url is None or self.parser is None:
            return 0.0
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), session.get(self.url) as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
            metrics, _ = self.parser.parse(text)
        except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError, MetricsParseError):
            return None
        return metrics.get("requests_running", 0.0) + metrics.get("requests_waiting", 0.0)
