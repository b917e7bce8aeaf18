"""A private Mosquitto on a free loopback port, for the demo and the tests.

Never the system broker: each instance has its own port, config, persistence directory and
log, so a test can stop, kill and restart it at will.
"""

from __future__ import annotations

import asyncio
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto"


class BrokerUnavailable(RuntimeError):
    pass


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the thread that
    started it dies (``prctl(PR_SET_PDEATHSIG)``; Linux): a killed demo takes its daemons with
    it. Start children from the main thread, or the signal comes when the starting thread ends."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise BrokerUnavailable(f"mosquitto is not installed; {INSTALL_HINT}")
    return found


def password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file for ``users`` (name -> password), made by mosquitto_passwd."""
    tool = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd",) if os.access(p, os.X_OK)), None)
    if tool is None:
        raise BrokerUnavailable(f"mosquitto_passwd is not installed; {INSTALL_HINT}")
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        done = subprocess.run([tool, "-b", str(path), user, password], capture_output=True,
                              text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise BrokerUnavailable(f"mosquitto_passwd failed for {user!r}: {done.stderr.strip()}")
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(root: Path, client: str = "gpu-a") -> Pki:
    """A throwaway CA (valid two days), a server certificate for 127.0.0.1 and localhost, and a
    client certificate for ``client``, made with the openssl CLI. For tests and demos only."""
    tool = shutil.which("openssl")
    if tool is None:
        raise BrokerUnavailable("openssl is not installed; install it with: "
                                "sudo apt-get install -y openssl")

    def openssl(*args: str) -> None:
        done = subprocess.run([tool, *args], cwd=root, capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode != 0:
            raise BrokerUnavailable(f"openssl {args[0]} failed: {done.stderr.strip()}")

    root.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=llmops test CA")
    for name, cn, ext in (
            ("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                    "extendedKeyUsage=serverAuth\n"),
            ("client", client, "extendedKeyUsage=clientAuth\n")):
        (root / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return Pki(root / "ca.crt", root / "server.crt", root / "server.key",
               root / "client.crt", root / "client.key")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config_text(port: int, data_dir: Path, security: BrokerSecurity | None = None,
                also_listen: Sequence[str] = ()) -> str:
    """The shipped systemd/mosquitto.conf (or mosquitto-tls.conf with ``security``), so tests
    run the broker settings users get, on a loopback port with its own persistence directory,
    credentials and log. ``also_listen``: more addresses (plain MQTT only) to listen on, on the
    same port (``per_listener_settings false``: the shipped settings hold on each)."""
    if security is not None and also_listen:
        raise BrokerUnavailable("also_listen is for the plain listener only")
    name = "mosquitto-tls.conf" if security else "mosquitto.conf"
    shipped = (resources.files("llm_ops_helper.systemd") / name).read_text()
    replacements = [("persistence_location /var/lib/mosquitto/",
                     f"persistence_location {data_dir}/")]
    if security is None:
        replacements.append(("listener 1883", f"listener {port} 127.0.0.1"))
    else:
        etc = "/etc/mosquitto/llmops"
        replacements += [
            ("listener 8883", f"listener {port} 127.0.0.1"),
            (f"cafile {etc}/ca.crt", f"cafile {security.ca_file}"),
            (f"certfile {etc}/server.crt", f"certfile {security.cert_file}"),
            (f"keyfile {etc}/server.key", f"keyfile {security.key_file}"),
            (f"password_file {etc}/passwd", f"password_file {security.password_file}"),
            (f"acl_file {etc}/acl", f"acl_file {data_dir}/mosquitto.acl"),
            ("require_certificate false",
             f"require_certificate {str(security.require_certificate).lower()}"),
        ]
    for production, local in replacements:
        if production not in shipped:
            raise BrokerUnavailable(f"systemd/{name} no longer has {production!r}")
        shipped = shipped.replace(production, local)
    for address in also_listen:
        shipped += f"\nlistener {port} {address}\n"
    return shipped + f"\nlog_dest file {data_dir}/mosquitto.log\nuser {getpass.getuser()}\n"


@dataclass(frozen=True)
class BrokerSecurity:
    """TLS files and a password file (made with ``mosquitto_passwd``) for a LocalMosquitto that
    runs the shipped mosquitto-tls.conf and mosquitto.acl."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    password_file: Path
    require_certificate: bool = False


class LocalMosquitto:
    def __init__(self, data_dir: Path, port: int | None = None,
                 security: BrokerSecurity | None = None, env: Mapping[str, str] | None = None,
                 parent_death: bool = False, also_listen: Sequence[str] = ()) -> None:
        """``env``: added to the broker's environment; ``parent_death``: SIGTERM when its
        starter dies (see :func:`die_with_parent`); ``also_listen``: addresses to listen on
        besides 127.0.0.1, on the same port (a network namespace's veth peer, say), read at
        each :meth:`start`."""
        self.also_listen = tuple(also_listen)
        self.binary = mosquitto_binary()
        self.env = dict(env or {})
        self.parent_death = parent_death
        self.security = security
        self.data_dir = data_dir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.config_path = data_dir / "mosquitto.conf"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    async def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text(self.port, self.data_dir, self.security,
                                                 self.also_listen))
        if self.security:
            acl = resources.files("llm_ops_helper.systemd") / "mosquitto.acl"
            (self.data_dir / "mosquitto.acl").write_text(acl.read_text())
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **self.env} if self.env else None,
            preexec_fn=die_with_parent() if self.parent_death else None,
            # A terminal's Ctrl-C reaches only its owner, which stops the broker last, in order.
            start_new_session=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr
                err = stderr.read().decode(errors="replace").strip() if stderr else ""
                raise BrokerUnavailable(
                    f"mosquitto exited with {self._process.returncode}: {err}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise BrokerUnavailable(f"mosquitto did not listen on {self.host}:{self.port} "
                                f"within {timeout_s} s; see {self.log_path}")

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the broker (SIGTERM saves its persistence; SIGKILL does not)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while process.poll() is None:
            if loop.time() > deadline:
                process.kill()
            await asyncio.sleep(0.02)
        if process.stderr:
            process.stderr.close()
        self._process = None

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    @property
    def persistence_path(self) -> Path:
        return self.data_dir / "mosquitto.db"

    async def save(self, timeout_s: float = 10.0) -> None:
        """Have the broker write its persistence file now (SIGUSR1), as its own
        ``autosave_interval`` does: what a broker that has run a while has on disk when it is
        killed. Returns once the file has been rewritten."""
        process = self._process
        if process is None or process.poll() is not None:
            raise BrokerUnavailable("mosquitto is not running")
        path = self.persistence_path

        def written() -> tuple[int, int] | None:
            # Mosquitto writes a new file and renames it over the old: a new inode each save.
            try:
                stat = path.stat()
            except FileNotFoundError:
                return None
            return stat.st_ino, stat.st_mtime_ns

        before = written()
        process.send_signal(signal.SIGUSR1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (now := written()) is None or now == before:
            if loop.time() > deadline:
                raise BrokerUnavailable(f"mosquitto did not write {path} within {timeout_s} s")
            await asyncio.sleep(0.02)
