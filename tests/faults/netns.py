"""A network namespace joined to the host by a veth pair, for partition tests (iproute2, root).

:class:`NetNamespace` creates a namespace and a veth pair with a /30 of its own (names and
subnet unique to this run), plus a ``service_address`` on a host-only veth pair (no dummy module needed) that
the namespace reaches through the veth (its default route) and the host reaches always: the
address to bind the broker and the controller to, so that cutting the link cuts off only the
namespace. It starts processes inside the namespace (``ip netns exec``), cuts the link
(``ip link set <host end> down``: the namespace's packets go nowhere, silently, as in a real
partition) and heals it, and deletes everything on :meth:`delete` (a ``with`` block calls it),
killing any process still inside the namespace first.

Needs iproute2 and CAP_NET_ADMIN; without either, :meth:`create` raises
:class:`NetnsUnavailable` saying which and how to get it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

INSTALL_HINT = "install it with: sudo apt-get install -y iproute2"
# Where the /30s are drawn from (private, unlikely to collide with anything real).
POOL = ipaddress.IPv4Network("10.213.0.0/16")


class NetnsUnavailable(RuntimeError):
    pass


def ip_binary() -> str:
    found = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None)
    if found is None:
        raise NetnsUnavailable(f"iproute2 (the ip command) is not installed; {INSTALL_HINT}")
    return found


def _addresses_in_use() -> set[ipaddress.IPv4Network]:
    done = subprocess.run([ip_binary(), "-4", "-o", "addr", "show"], capture_output=True,
                          text=True, timeout=10, check=False)
    found: set[ipaddress.IPv4Network] = set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.add(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return found


class NetNamespace:
    """A namespace ``name`` with veth ``inner`` (``inner_address``) inside and its peer
    ``outer`` (``outer_address``) on the host."""

    def __init__(self) -> None:
        tag = secrets.token_hex(4)  # interface names are at most 15 characters
        self.name = f"llmops-part-{os.getpid()}-{tag}"
        self.outer = f"lpo{tag}"
        self.inner = f"lpi{tag}"
        self.dummy = f"lpd{tag}"  # a veth pair with both ends on the host: always up
        self.dummy_peer = f"lpe{tag}"
        in_use = _addresses_in_use()
        subnets = list(POOL.subnets(new_prefix=30))
        while True:
            subnet, service = (subnets[secrets.randbelow(len(subnets))] for _ in range(2))
            if subnet != service and not any(subnet.overlaps(n) or service.overlaps(n)
                                              for n in in_use):
                break
        outer, inner = list(subnet.hosts())
        self.service_address = str(next(service.hosts()))
        self.outer_address, self.inner_address = str(outer), str(inner)
        self.prefix = subnet.prefixlen
        self.created = False
        self.processes: list[subprocess.Popen[bytes]] = []

    def _ip(self, *args: str, netns: bool = False) -> None:
        command = [ip_binary(), *(("netns", "exec", self.name, ip_binary()) if netns else ()),
                   *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            error = done.stderr.strip()
            if "Operation not permitted" in error or "Permission denied" in error:
                raise NetnsUnavailable(
                    f"{' '.join(command)}: {error}: network namespaces need CAP_NET_ADMIN "
                    "(run the test as root, or with: sudo setcap cap_net_admin,cap_sys_admin+ep "
                    "on the interpreter)")
            raise NetnsUnavailable(f"{' '.join(command)} failed: {error}")

    def create(self) -> NetNamespace:
        self._ip("netns", "add", self.name)
        self.created = True
        self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self._ip("link", "set", self.inner, "netns", self.name)
        self._ip("addr", "add", f"{self.outer_address}/{self.prefix}", "dev", self.outer)
        self._ip("link", "set", self.outer, "up")
        self._ip("addr", "add", f"{self.inner_address}/{self.prefix}", "dev", self.inner,
                 netns=True)
        self._ip("link", "set", self.inner, "up", netns=True)
        self._ip("link", "set", "lo", "up", netns=True)  # its replicas listen on 127.0.0.1
        self._ip("route", "add", "default", "via", self.outer_address, netns=True)
        self._ip("link", "add", self.dummy, "type", "veth", "peer", "name", self.dummy_peer)
        self._ip("addr", "add", f"{self.service_address}/32", "dev", self.dummy)
        self._ip("link", "set", self.dummy_peer, "up")
        self._ip("link", "set", self.dummy, "up")
        return self

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """``argv`` inside the namespace, in a session of its own (``ip netns exec`` execs it:
        the pid is the command's own)."""
        process = subprocess.Popen(
            [ip_binary(), "netns", "exec", self.name, *argv],
            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else None,
            env={**os.environ, **env} if env else None, start_new_session=True)
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Take the host end of the link down: neither side hears the other until :meth:`heal`."""
        self._ip("link", "set", self.outer, "down")

    def heal(self, timeout_s: float = 10.0) -> None:
        """Bring the host end back up; returns once the kernel says it is up."""
        self._ip("link", "set", self.outer, "up")
        state = Path("/sys/class/net", self.outer, "operstate")
        deadline = time.monotonic() + timeout_s
        while state.read_text().strip() != "up":
            if time.monotonic() > deadline:
                raise NetnsUnavailable(f"{self.outer} not up {timeout_s} s after ip link set up")
            time.sleep(0.02)

    def pids(self) -> list[int]:
        done = subprocess.run([ip_binary(), "netns", "pids", self.name], capture_output=True,
                              text=True, timeout=10, check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def delete(self) -> None:
        """Kill what still runs inside, delete the namespace and the veth pair. Idempotent."""
        if not self.created:
            return
        for _ in range(50):  # processes this test started there, and their children
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        for link in (self.outer, self.dummy):
            with contextlib.suppress(NetnsUnavailable):
                self._ip("link", "del", link)  # the veth goes with the namespace, as a rule
        with contextlib.suppress(NetnsUnavailable):
            self._ip("netns", "del", self.name)
        self.created = False

    def exists(self) -> bool:
        """The namespace or either host-side link still there."""
        return Path("/run/netns", self.name).exists() or any(
            Path("/sys/class/net", link).exists() for link in (self.outer, self.dummy))

    def __enter__(self) -> NetNamespace:
        try:
            return self.create()
        except BaseException:
            self.delete()
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.delete()
