"""llama.cpp's own HTTP server, run in this process through the ``xllamacpp`` wheel (CPU).

For hosts without a ``llama-server`` binary. ``xllamacpp.Server`` is llama.cpp's server
(``tools/server``) compiled into the wheel: constructing it loads the model and starts the HTTP
listener on llama.cpp's own threads; it serves the same ``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions`` and ``/metrics`` (``llamacpp:*`` names) as the
binary. Dropping it stops the server. This process only waits for SIGTERM or SIGINT.

    python -m llm_ops_helper.agent.runtimes.llamacpp_server --model PATH --host H --port P
        [--alias NAME] [--ctx-size N] [--parallel N] [--threads N] [--n-gpu-layers N]

Exit codes: 0 after a signal; 1 when the model cannot be loaded (one line on stderr naming
the file, after llama.cpp's own log of why) or the port is taken; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path
from typing import Final

GGUF_MAGIC: Final = b"GGUF"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llm_ops_helper.agent.runtimes.llamacpp_server",
        description="serve a GGUF model with llama.cpp's server (xllamacpp, CPU)")
    parser.add_argument("--model", "-m", required=True, type=Path, help="the GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--alias", "-a", default="",
                        help="the model name in /v1/models and responses (default: file name)")
    parser.add_argument("--ctx-size", "-c", type=int, default=0,
                        help="context size in tokens (0: the model's own)")
    parser.add_argument("--parallel", "-np", type=int, default=1, help="slots (sequences)")
    parser.add_argument("--threads", "-t", type=int, default=-1,
                        help="CPU threads (-1: llama.cpp's choice)")
    parser.add_argument("--n-gpu-layers", "-ngl", type=int, default=0,
                        help="layers to offload (a GPU build of xllamacpp only)")
    return parser


def _unreadable(path: Path) -> str | None:
    """Why llama.cpp will not even open ``path``; its own errors only go to the log."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if magic != GGUF_MAGIC:
        return f"not a GGUF file (starts with {magic!r})"
    return None


def _cannot_listen(host: str, port: int) -> str | None:
    """Why binding host:port fails, if it does: tells a taken port from a bad model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model: Path = args.model
    why = _unreadable(model)
    if why is not None:
        print(f"llamacpp_server: cannot load model {model}: {why}", file=sys.stderr, flush=True)
        return 1
    # After the cheap checks: the module is ~100 MB of native code.
    import xllamacpp  # type: ignore[import-untyped]

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_metrics = True
    params.hostnames = [args.host]
    params.port = args.port
    params.n_gpu_layers = args.n_gpu_layers
    params.warmup = False
    if args.alias:
        params.model_alias = {args.alias}  # a set of names; a bare str would be its letters

    # Block the signals before llama.cpp starts its threads, so they inherit the mask and the
    # signal is left for sigwait below instead of landing on a native thread.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = xllamacpp.Server(params)
    except RuntimeError:  # "Failed to init server, ...": the reason is in llama.cpp's log
        taken = _cannot_listen(args.host, args.port)
        what = (f"cannot listen on {args.host}:{args.port} ({taken})" if taken
                else f"cannot load model {model} (llama.cpp's log above says why)")
        print(f"llamacpp_server: {what}", file=sys.stderr, flush=True)
        return 1
    print(f"llamacpp_server: serving {model} on {server.listening_address}",
          file=sys.stderr, flush=True)
    received = signal.sigwait(stop_signals)
    print(f"llamacpp_server: {signal.Signals(received).name}, stopping", file=sys.stderr,
          flush=True)
    del server  # joins llama.cpp's loop and closes the listener
    return 0


if __name__ == "__main__":
    sys.exit(main())
