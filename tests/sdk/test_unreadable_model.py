"""A model file that exists but cannot be read is refused before anything is sent.

Root reads any file whatever its mode, and the tests may run as root. So the client runs in a
child process that, when it is root, imports what it needs, then gives up its privileges
(``nobody``) before it touches the file; as any other user the file's mode alone denies it.
The child checks that it really cannot open the file before it calls the client, so a run
where the file is readable fails loudly instead of passing for the wrong reason.

The controller is its test double (tests/sdk/fake_controller), serving on the test's loop;
every request it gets is recorded, and there must be none.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.sdk.conftest import model_file
from tests.sdk.fake_controller import FakeController

DENIED = os.strerror(errno.EACCES)  # "Permission denied"
PREMISE_BROKEN = 3

# Run as: python -c CHILD_CODE MODE URL PATH [CLI ARGS...], in the directory holding PATH.
# MODE "deploy_model" / "push_model" calls that method and prints the error as JSON;
# MODE "cli" runs ``llmops --url URL CLI ARGS...`` and exits with its code.
CHILD_CODE = r"""
import json, os, pwd, sys
from llm_ops_helper.cli import build_parser, main
from llm_ops_helper.client import LLMOpsHelper, ModelFileError

mode, url, path, *cli_args = sys.argv[1:]
# argparse imports parts of the standard library when it first builds a parser, and the
# interpreter may live where nobody cannot read (/root/.pyenv): build one while still able to.
build_parser().parse_args(["--url", url, "models", "push", path])

if os.geteuid() == 0:
    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)

try:
    open(path, "rb").close()
except OSError:
    pass
else:
    print(f"premise broken: uid {os.getuid()} can open {path}", file=sys.stderr)
    sys.exit(3)

if mode == "cli":
    sys.exit(main(["--url", url, *cli_args]))
helper = LLMOpsHelper(url, user="tester")
try:
    getattr(helper, mode)(path)
except ModelFileError as exc:
    print(json.dumps({"error": type(exc).__name__, "path": exc.path, "reason": exc.reason,
                      "text": str(exc)}))
else:
    print(json.dumps({"error": None}))
"""


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def error(self) -> dict[str, str | None]:
        """The JSON line a client-mode child printed."""
        assert self.code == 0, f"child exited {self.code}: {self.err}"
        parsed: dict[str, str | None] = json.loads(self.out)
        return parsed


async def unprivileged(workdir: Path, mode: str, url: str, path: str, *cli: str) -> Outcome:
    """Run the client in a child that cannot read ``path`` (relative to ``workdir``)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_CODE, mode, url, path, *cli, cwd=workdir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    outcome = Outcome(child.returncode or 0, out.decode(), err.decode())
    assert outcome.code != PREMISE_BROKEN, outcome.err
    return outcome


@contextmanager
def workdir_with_an_unreadable_model(tmp_path: Path) -> Iterator[Path]:
    """``models/`` that anyone may enter (not list) holding ``model.gguf`` with mode 000, and
    ``models/locked/model.gguf``, a readable file in a directory that nobody may enter."""
    workdir = tmp_path / "models"
    locked = workdir / "locked"
    locked.mkdir(parents=True)
    model_file(workdir / "model.gguf").chmod(0o000)
    model_file(locked / "model.gguf")
    workdir.chmod(0o711)
    locked.chmod(0o600)  # no search bit, not even for its owner
    try:
        yield workdir
    finally:
        locked.chmod(0o700)
        (workdir / "model.gguf").chmod(0o600)


async def test_the_client_names_the_file_and_the_cause_and_sends_nothing(
        fake: FakeController, tmp_path: Path) -> None:
    with workdir_with_an_unreadable_model(tmp_path) as workdir:
        for method in ("deploy_model", "push_model"):
            error = (await unprivileged(workdir, method, fake.url, "model.gguf")).error()
            assert error == {"error": "ModelFileError", "path": "model.gguf",
                             "reason": f"cannot read: {DENIED}",
                             "text": f"model.gguf: cannot read: {DENIED}"}, method
    assert fake.requests == [] and fake.uploads == [] and fake.versions == {}


async def test_the_cli_prints_one_line_and_exits_1_sending_nothing(
        fake: FakeController, tmp_path: Path) -> None:
    with workdir_with_an_unreadable_model(tmp_path) as workdir:
        for command in (["models", "push", "model.gguf"], ["deploy", "model.gguf"]):
            outcome = await unprivileged(workdir, "cli", fake.url, "model.gguf", *command)
            assert (outcome.code, outcome.out) == (1, ""), command
            assert outcome.err == f"llmops: error: model.gguf: cannot read: {DENIED}\n", command
    assert fake.requests == []


async def test_a_model_in_a_directory_that_cannot_be_entered_is_a_model_file_error_too(
        fake: FakeController, tmp_path: Path) -> None:
    """The file itself is readable, but its directory may not be searched: stat() fails with
    EACCES before open() is tried. Same error, same one line."""
    path = "locked/model.gguf"
    expected = {"error": "ModelFileError", "path": path, "reason": f"cannot read: {DENIED}",
                "text": f"{path}: cannot read: {DENIED}"}
    with workdir_with_an_unreadable_model(tmp_path) as workdir:
        for method in ("push_model", "deploy_model"):
            error = (await unprivileged(workdir, method, fake.url, path)).error()
            assert error == expected, method
        for command in (["models", "push", path], ["deploy", path]):
            outcome = await unprivileged(workdir, "cli", fake.url, path, *command)
            assert (outcome.code, outcome.err) == (
                1, f"llmops: error: {path}: cannot read: {DENIED}\n"), command
    assert fake.requests == []
