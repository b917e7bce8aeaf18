"""Progress bars for long transfers, on stderr and only when stderr is a terminal."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

_LABELS = {"hash": "sha256", "upload": "upload", "download": "download"}


class TransferBars:
    """A `Progress` callback drawing one tqdm bar per stage; silent when stderr is no TTY.

        with TransferBars() as bars:
            helper.push_model(path, progress=bars)
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._stage: str | None = None
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self._stage:
            self.close()
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

            self._stage = stage
            self._bar = tqdm(total=total, desc=_LABELS.get(stage, stage), unit="B",
                             unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._stage = None

    def __enter__(self) -> TransferBars:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
