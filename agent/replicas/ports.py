"""Free TCP ports for replicas, from the configured range."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Collection


class NoFreePort(Exception):
    """Every port of the range is taken."""


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (no SO_REUSEADDR: a port in TIME_WAIT counts as
    taken, since the server we start might not set it either). An OSError from creating the
    socket (EMFILE) is raised: it says nothing about the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, low: int, high: int, taken: Collection[int],
              preferred: int | None = None,
              is_free: Callable[[str, int], bool] = port_is_free) -> int:
    """A free port in ``[low, high]`` not in ``taken`` (ports given to replicas still starting);
    ``preferred`` (the port a replica had before a restart) first when it is free."""
    if preferred is not None and low <= preferred <= high and preferred not in taken \
            and is_free(host, preferred):
        return preferred
    span = high - low + 1
    # A random start: two agents (or a restart racing a stale server) rarely probe the same
    # ports in the same order.
    start = random.randrange(span)
    for i in range(span):
        port = low + (start + i) % span
        if port not in taken and is_free(host, port):
            return port
    raise NoFreePort(f"no free port in {low}-{high} on {host} "
                     "(key 'supervisor.port_range')")
