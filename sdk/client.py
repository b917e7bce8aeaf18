"""`LLMOpsHelper`: the Python client of the controller's HTTP API.

    from llm_ops_helper import LLMOpsHelper
    LLMOpsHelper().deploy_model("path/to/model.gguf")

Synchronous and built on the standard library's ``http.client``: a script, a notebook or the
``llmops`` command line calls it without an event loop. Uploads stream from disk in 1 MiB
chunks after a first pass computes their sha256, which the controller checks.
"""

from __future__ import annotations

import getpass
import hashlib
import http.client
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import quote, urlencode, urlsplit

import msgspec

from llm_ops_helper.client_types import (
    AliasChange,
    ApiError,
    Artifact,
    ArtifactDiff,
    Conflict,
    ControllerUnreachable,
    Deployment,
    DeploymentFailed,
    DeployTimeout,
    Endpoint,
    LLMOpsError,
    Model,
    ModelDiff,
    ModelFileError,
    ModelSummary,
    ModelVersion,
    NotFound,
    Progress,
    Replica,
)

__all__ = [
    "DEFAULT_URL", "AliasChange", "ApiError", "Artifact", "ArtifactDiff", "Conflict",
    "ControllerUnreachable", "DeployTimeout", "Deployment", "DeploymentFailed", "Endpoint",
    "LLMOpsError", "LLMOpsHelper", "Model", "ModelDiff", "ModelFileError", "ModelSummary",
    "ModelVersion", "NotFound", "Progress", "Replica", "deployment_name",
]

DEFAULT_URL = "http://127.0.0.1:8470"
CHUNK_BYTES = 1 << 20
# What makes deploy_model's argument a file path rather than a registry ref ("name@N").
_MODEL_SUFFIXES = {".gguf", ".bin", ".safetensors", ".toml", ".pt", ".pth", ".onnx", ".ggml"}

T = TypeVar("T")


def deployment_name(text: str) -> str:
    """A deployment or model name from a file stem: ``Llama-3.1 8B.Q4`` -> ``llama-3-1-8b-q4``."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return name or "model"


def _looks_like_path(text: str) -> bool:
    return ("/" in text or os.sep in text or text.startswith(("~", "."))
            or Path(text).suffix.lower() in _MODEL_SUFFIXES)


def _is_file_argument(text: str) -> bool:
    """Whether ``deploy_model``'s argument names a file (else a ref such as ``chat@2``). A path
    whose existence cannot even be checked (a directory the user may not enter) is a file
    argument too, so that reading it reports the cause."""
    try:
        return Path(text).exists() or _looks_like_path(text)
    except OSError:
        return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return "anonymous"


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    try:
        return float(text) if text else default
    except ValueError:
        raise LLMOpsError(f"{name}={text!r}: expected a number of seconds") from None


def _token_from_env() -> str | None:
    token = os.environ.get("LLMOPS_TOKEN")
    if token:
        return token
    token_file = os.environ.get("LLMOPS_TOKEN_FILE")
    if not token_file:
        return None
    try:
        return Path(token_file).read_text().strip() or None
    except OSError as exc:
        raise LLMOpsError(f"{token_file}: cannot read the token file (LLMOPS_TOKEN_FILE): "
                          f"{exc.strerror}") from None


class LLMOpsHelper:
    """Client of one controller. Arguments win over ``LLMOPS_URL``, ``LLMOPS_TOKEN`` (else the
    file named by ``LLMOPS_TOKEN_FILE``) and ``LLMOPS_USER`` (else the login name).

    ``timeout`` bounds each HTTP call; ``poll_interval`` (else ``LLMOPS_POLL_INTERVAL``, else
    1 s) is how often a wait asks again.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 user: str | None = None, timeout: float = 30.0,
                 poll_interval: float | None = None) -> None:
        url = (url or os.environ.get("LLMOPS_URL") or DEFAULT_URL).rstrip("/")
        self.url = url if "://" in url else f"http://{url}"
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LLMOpsError(f"bad controller URL {self.url!r}: expected http://HOST:PORT")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.token = token if token is not None else _token_from_env()
        self.user = user or os.environ.get("LLMOPS_USER") or _user()
        self.timeout = timeout
        self.poll_interval = (poll_interval if poll_interval is not None
                              else _env_seconds("LLMOPS_POLL_INTERVAL", 1.0))

    def __repr__(self) -> str:
        return f"LLMOpsHelper(url={self.url!r}, user={self.user!r})"

    # -- models ----------------------------------------------------------------------------

    def push_model(self, path: str | os.PathLike[str] | None, name: str | None = None, *,
                   runtime: str | None = None, tags: Mapping[str, str] | None = None,
                   description: str = "", source_uri: str | None = None,
                   parameters: int | str | None = None, quantization: str | None = None,
                   progress: Progress | None = None) -> ModelVersion:
        """Upload a model file as the next version of model ``name`` (default: from the stem).

        With ``path`` None nothing is uploaded: the version names weights that the runtime
        fetches itself (``source_uri``, e.g. ``hf://org/model`` for vLLM), and ``name`` is needed.
        ``parameters`` is a count (``7000000000``) or a short form (``7B``).
        """
        query: list[tuple[str, str]] = [("description", description)]
        for key, value in (("runtime", runtime), ("source_uri", source_uri),
                           ("parameters", parameters), ("quantization", quantization)):
            if value is not None and value != "":
                query.append((key, str(value)))
        query += [("tag", f"{k}={v}") for k, v in (tags or {}).items()]
        if path is None:
            if not name or not source_uri:
                raise LLMOpsError("a version without a file needs a model name and a source_uri")
            target = self._path(f"/api/v1/models/{_seg(name)}/versions", query)
            return self._call("POST", target, ModelVersion)
        file = Path(path)
        size, sha256 = _hash_file(file, progress)
        query += [("filename", file.name), ("sha256", sha256)]
        model = name or deployment_name(file.stem)
        target = self._path(f"/api/v1/models/{_seg(model)}/versions", query)
        return self._decode(self._upload(target, file, size, progress), ModelVersion)

    def pull_model(self, name: str, ref: int | str = "production", dest: str | os.PathLike[str]
                   | None = None, *, progress: Progress | None = None) -> Path:
        """Download a version's artifact to ``dest`` (default: its file name here).

        What arrived before an interruption is kept in ``dest.part`` and the next call resumes
        from it with a Range request; the file is renamed into place only once its size and
        sha256 match the registry's.
        """
        version = self.get_version(name, ref)
        if version.artifact is None:
            raise LLMOpsError(f"{version.ref} has no artifact (its weights are at "
                              f"{version.source_uri or 'an unknown place'})")
        artifact = version.artifact
        target = Path(dest) if dest is not None else Path(artifact.filename or version.ref)
        partial = target.with_name(target.name + ".part")
        self._download(f"/api/v1/artifacts/{artifact.sha256}", partial, artifact.size_bytes,
                       progress)
        try:
            size, digest = _hash_file(partial, None)
        except ModelFileError as exc:
            raise LLMOpsError(f"download of {version.ref}: {exc}") from None
        if (size, digest) != (artifact.size_bytes, artifact.sha256):
            partial.unlink(missing_ok=True)
            raise LLMOpsError(f"download of {version.ref} does not match the registry: "
                              f"{size} bytes, sha256 {digest} (expected {artifact.size_bytes}, "
                              f"{artifact.sha256}); removed, try again")
        partial.replace(target)
        return target

    def list_models(self) -> list[ModelSummary]:
        return list(self._call("GET", "/api/v1/models", _ModelList).models)

    def get_model(self, name: str) -> Model:
        return self._call("GET", f"/api/v1/models/{_seg(name)}", Model)

    def get_version(self, name: str, ref: int | str) -> ModelVersion:
        """One version by number or alias."""
        return self._call("GET", f"/api/v1/models/{_seg(name)}/versions/{_seg(ref)}",
                          ModelVersion)

    def promote(self, name: str, version: int, stage: str = "production", *,
                archive_previous: bool = True) -> ModelVersion:
        """Move a version to ``stage``; production also moves the alias and archives the old one."""
        return self._call("POST", f"/api/v1/models/{_seg(name)}/versions/{_seg(version)}/stage",
                          ModelVersion, {"stage": stage, "archive_previous": archive_previous})

    def retire(self, name: str, version: int) -> ModelVersion:
        return self.promote(name, version, "retired", archive_previous=False)

    def set_alias(self, name: str, alias: str, version: int) -> AliasChange:
        return self._call("PUT", f"/api/v1/models/{_seg(name)}/aliases/{_seg(alias)}",
                          AliasChange, {"version": version})

    def delete_alias(self, name: str, alias: str) -> AliasChange:
        return self._call("DELETE", f"/api/v1/models/{_seg(name)}/aliases/{_seg(alias)}",
                          AliasChange)

    def diff(self, name: str, a: int | str, b: int | str) -> ModelDiff:
        return self._call("GET", self._path(f"/api/v1/models/{_seg(name)}/diff",
                                            [("from", str(a)), ("to", str(b))]), ModelDiff)

    # -- deployments -----------------------------------------------------------------------

    def deploy_model(self, path_or_ref: str | os.PathLike[str], name: str | None = None,
                     runtime: str | None = None, replicas: int = 1, wait: bool = True, *,
                     timeout: float = 600.0, progress: Progress | None = None,
                     on_update: Callable[[Deployment], None] | None = None,
                     **spec: Any) -> Deployment:
        """Deploy a model file (pushed first as a new version) or a registry ref.

        A path that exists, or that looks like one (a ``/``, a model file suffix), is a file:
        it becomes the next version of model ``name`` (default: the file's stem, sanitized),
        served by deployment ``name``. Anything else is a ref: ``name@N``, ``name@alias`` or
        ``name`` (its production alias, else its latest version). ``spec`` adds DeploymentSpec
        fields (``gpus_per_replica``, ``gpu_memory_bytes``, ``args``, ``env``, ...).

        With ``wait`` it returns once every replica is ready on the new version; it raises
        `DeploymentFailed` if the rollout fails or is rolled back, `DeployTimeout` after
        ``timeout`` seconds. ``on_update`` sees every state polled.
        """
        text = os.fspath(path_or_ref)
        pushed: ModelVersion | None = None
        if not isinstance(path_or_ref, str) or _is_file_argument(text):
            model = name or deployment_name(Path(text).stem)
            pushed = self.push_model(text, model, runtime=runtime, progress=progress)
            ref = pushed.ref
            deployment = deployment_name(model)
        else:
            ref = text
            deployment = name or deployment_name(text.partition("@")[0])
        body = {"model": ref, "runtime": runtime, "replicas": replicas, **spec}
        try:
            started = self._call("PUT", f"/api/v1/deployments/{_seg(deployment)}", Deployment,
                                 body)
        except ApiError as exc:
            if pushed is None:
                raise
            # The deployment was refused (it fits no host, say): the version uploaded for it
            # alone is retired, so that its artifact does not stay behind.
            try:
                self.retire(pushed.model, pushed.version)
                note = f"{pushed.ref}, uploaded for this deployment, was retired"
            except LLMOpsError as cleanup:
                note = f"{pushed.ref} was uploaded and stays registered ({cleanup})"
            raise type(exc)(exc.status, f"{exc.message}; {note}") from None
        if on_update is not None:
            on_update(started)
        if not wait:
            return started
        target = next((v for v in (started.version, ref) if v and _concrete(v)), None)
        return self.wait(deployment, target, revision=started.revision, timeout=timeout,
                         on_update=on_update)

    def wait(self, deployment: str, version: str | None = None, *, replicas: int | None = None,
             revision: int | None = None, timeout: float = 600.0, rolling_back: bool = False,
             on_update: Callable[[Deployment], None] | None = None) -> Deployment:
        """Poll until ``deployment`` is available with every replica ready on ``version``
        (``name@N``; None: any) and, if given, ``replicas`` desired.

        Failure is phase ``failed``, or leaving ``version``: phase ``rolling_back``, or another
        version under a revision other than ``revision`` (the one being awaited) or settled
        ``available``. ``rolling_back`` says a rollback is what is awaited.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.status(deployment)
            if on_update is not None:
                on_update(state)
            if _arrived(state, version, replicas):
                return state
            _check_failed(state, version, revision, rolling_back)
            if time.monotonic() >= deadline:
                raise DeployTimeout(_not_ready(state, version, timeout), state)
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def rollback(self, deployment: str, version: int | str | None = None, wait: bool = True, *,
                 timeout: float = 600.0,
                 on_update: Callable[[Deployment], None] | None = None) -> Deployment:
        """Go back to ``version`` (``name@N`` or N), by default the one before the current."""
        before = self.status(deployment)
        body: dict[str, Any] = {}
        if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
            model = (before.version or before.spec.get("model") or deployment).partition("@")[0]
            version = f"{model}@{version}"
        if version is not None:
            body["version"] = version
        started = self._call("POST", f"/api/v1/deployments/{_seg(deployment)}/rollback",
                             Deployment, body)
        if not wait:
            return started
        if version is not None and _concrete(version):
            target: str | None = version
        elif started.version != before.version:
            target = started.version
        else:
            target = before.previous_version
        return self.wait(deployment, target, timeout=timeout, rolling_back=True,
                         on_update=on_update)

    def scale(self, deployment: str, replicas: int, wait: bool = False, *,
              timeout: float = 600.0) -> Deployment:
        started = self._call("POST", f"/api/v1/deployments/{_seg(deployment)}/scale",
                             Deployment, {"replicas": replicas})
        if not wait:
            return started
        return self.wait(deployment, started.version, replicas=replicas,
                         revision=started.revision, timeout=timeout)

    @overload
    def status(self, deployment: str) -> Deployment: ...
    @overload
    def status(self, deployment: None = None) -> list[Deployment]: ...

    def status(self, deployment: str | None = None) -> Deployment | list[Deployment]:
        """One deployment, or all of them."""
        if deployment is None:
            return list(self._call("GET", "/api/v1/deployments", _DeploymentList).deployments)
        return self._call("GET", f"/api/v1/deployments/{_seg(deployment)}", Deployment)

    def endpoints(self, deployment: str) -> list[Endpoint]:
        """Base URLs of the replicas ready to serve (not draining)."""
        return list(self._call("GET", f"/api/v1/deployments/{_seg(deployment)}/endpoints",
                               _EndpointList).endpoints)

    def overview(self) -> dict[str, Any]:
        """``GET /api/v1/overview``: hosts with their GPUs, deployments with their replicas
        and the firing alerts, as the controller's JSON (what the dashboard and ``llmops top``
        show)."""
        path = "/api/v1/overview"
        data = self._decode(self._request("GET", path), dict)
        if not isinstance(data.get("hosts"), list):
            raise LLMOpsError(f"unexpected answer from {self.url}{path}: no \"hosts\" list")
        return data

    def delete_deployment(self, name: str) -> None:
        """Ask the controller to stop every replica and forget the deployment."""
        self._request("DELETE", f"/api/v1/deployments/{_seg(name)}")

    # -- HTTP ------------------------------------------------------------------------------

    def _path(self, path: str, query: Iterable[tuple[str, str]] = ()) -> str:
        qs = urlencode(list(query))
        return f"{path}?{qs}" if qs else path

    def _headers(self) -> dict[str, str]:
        headers = {"X-LLMOps-User": self.user, "Accept": "application/json",
                   "User-Agent": "llm-ops-helper-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _call(self, method: str, path: str, kind: type[T], body: Any = None) -> T:
        return self._decode(self._request(method, path, body), kind)

    def _decode(self, raw: bytes, kind: type[T]) -> T:
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.DecodeError as exc:
            raise LLMOpsError(f"unexpected answer from the controller at {self.url}: "
                              f"{kind.__name__}: {exc}") from None

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        data = None if body is None else msgspec.json.encode(body)
        headers = self._headers()
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn = self._connect()
        try:
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise ControllerUnreachable(self.url, _reason(exc)) from None
            return _checked(response.status, payload)
        finally:
            conn.close()

    def _upload(self, path: str, file: Path, size: int, progress: Progress | None) -> bytes:
        headers = self._headers()
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = str(size)
        conn = self._connect()
        try:
            try:
                conn.putrequest("POST", self._prefix + path, skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
            except (OSError, http.client.HTTPException) as exc:
                raise ControllerUnreachable(self.url, _reason(exc)) from None
            sent_error = _send_file(conn, file, size, progress)
            try:
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                reason = _reason(sent_error or exc)
                raise LLMOpsError(f"upload of {file} to {self.url} broke off: {reason}") from None
            return _checked(response.status, payload)
        finally:
            conn.close()


    def _download(self, path: str, partial: Path, size: int, progress: Progress | None) -> None:
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # not a prefix of this artifact
            partial.unlink()
            have = 0
        if have == size:
            return
        headers = self._headers()
        headers["Range"] = f"bytes={have}-"
        conn = self._connect()
        try:
            try:
                conn.request("GET", self._prefix + path, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ControllerUnreachable(self.url, _reason(exc)) from None
            if response.status >= 400:
                _checked(response.status, response.read())
            if response.status != 206:  # the whole file: start over
                have = 0
            elif not (response.getheader("Content-Range") or "").startswith(f"bytes {have}-"):
                # Not the bytes asked for: appending them would corrupt the partial.
                partial.unlink(missing_ok=True)
                raise LLMOpsError(f"download to {partial}: asked for bytes={have}- and got "
                                  f"Content-Range {response.getheader('Content-Range')!r}; "
                                  "removed, try again")
            try:
                with partial.open("ab" if have else "wb") as f:
                    while chunk := response.read(CHUNK_BYTES):
                        f.write(chunk)
                        have += len(chunk)
                        if progress is not None:
                            progress("download", have, size)
            except (OSError, http.client.HTTPException) as exc:
                raise LLMOpsError(f"download to {partial} broke off at {have} of {size} bytes: "
                                  f"{_reason(exc)}; run it again to resume") from None
            if have < size:
                # read(n) answers b"" when the connection closes early (no IncompleteRead):
                # a cut, not a corrupt file; the bytes kept are where the next pull resumes.
                raise LLMOpsError(f"download to {partial} broke off at {have} of {size} bytes: "
                                  "the connection closed early; run it again to resume")
        finally:
            conn.close()


class _ModelList(msgspec.Struct, frozen=True):
    models: tuple[ModelSummary, ...] = ()


class _DeploymentList(msgspec.Struct, frozen=True):
    deployments: tuple[Deployment, ...] = ()


class _EndpointList(msgspec.Struct, frozen=True):
    endpoints: tuple[Endpoint, ...] = ()


class _ErrorBody(msgspec.Struct):
    error: str


def _seg(value: object) -> str:
    return quote(str(value), safe="")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _checked(status: int, payload: bytes) -> bytes:
    if status < 400:
        return payload
    try:
        message = msgspec.json.decode(payload, type=_ErrorBody).error
    except msgspec.DecodeError:
        message = payload.decode("utf-8", "replace").strip()[:500] or http.client.responses.get(
            status, "error")
    if status == 404:
        raise NotFound(status, message)
    if status == 409:
        raise Conflict(status, message)
    raise ApiError(status, message)


def _hash_file(file: Path, progress: Progress | None) -> tuple[int, str]:
    """Size and sha256 of a file, read in chunks; `ModelFileError` when it cannot be read."""
    try:
        if not file.is_file():
            raise ModelFileError(str(file), "no such file" if not file.exists()
                                 else "not a regular file")
        size = file.stat().st_size
        digest = hashlib.sha256()
        done = 0
        with file.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress("hash", done, size)
    except OSError as exc:
        raise ModelFileError(str(file), f"cannot read: {exc.strerror or exc}") from None
    if done != size:
        raise ModelFileError(str(file), f"changed while being read ({size} -> {done} bytes)")
    return size, digest.hexdigest()


def _send_file(conn: http.client.HTTPConnection, file: Path, size: int,
               progress: Progress | None) -> OSError | None:
    """Stream the file as the request body. A broken connection is returned, not raised: the
    controller may have answered early (a bad runtime, say) and its answer says more."""
    sent = 0
    try:
        with file.open("rb") as f:
            while sent < size and (chunk := f.read(min(CHUNK_BYTES, size - sent))):
                try:
                    conn.send(chunk)
                except OSError as exc:
                    return exc
                sent += len(chunk)
                if progress is not None:
                    progress("upload", sent, size)
    except OSError as exc:
        raise ModelFileError(str(file), f"cannot read: {exc.strerror or exc}") from None
    if sent != size:
        raise ModelFileError(str(file), f"shrank while uploading ({size} -> {sent} bytes)")
    return None


def _arrived(state: Deployment, version: str | None, replicas: int | None) -> bool:
    return (state.phase == "available" and (version is None or state.version == version)
            and state.ready == state.desired
            and (replicas is None or state.desired == replicas))


def _concrete(ref: str) -> bool:
    """``name@N``, as opposed to an alias or a bare name that the controller resolves."""
    return ref.rpartition("@")[2].isdigit()


def _check_failed(state: Deployment, version: str | None, revision: int | None,
                  rolling_back: bool) -> None:
    if state.phase == "failed":
        raise DeploymentFailed(f"deployment {state.name} failed: "
                               f"{state.message or 'no reason given'}", state)
    if state.phase == "deleting":
        raise DeploymentFailed(f"deployment {state.name} is being deleted", state)
    if rolling_back:
        return
    moved = version is not None and state.version != version and (
        state.phase == "available" or (revision is not None and state.revision != revision))
    if state.phase == "rolling_back" or moved:
        raise DeploymentFailed(
            f"deployment {state.name} rolled back from {version} to "
            f"{state.version or state.previous_version}: {state.message or 'no reason given'}",
            state)


def _not_ready(state: Deployment, version: str | None, timeout: float) -> str:
    waiting = [f"{r.name} ({r.state}{': ' + r.reason if r.reason else ''})"
               for r in state.replicas if r.state != "ready" or r.version != state.version]
    text = (f"deployment {state.name} not available after {timeout:g} s: phase {state.phase}, "
            f"{state.ready}/{state.desired} replicas ready on {state.version or version}")
    if waiting:
        text += "; not ready: " + ", ".join(waiting)
    if state.message:
        text += f"; {state.message}"
    return text + " (the rollout goes on; `llmops status` follows it)"
