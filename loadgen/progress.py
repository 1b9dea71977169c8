"""A progress bar over finished requests: tqdm when installed, else a line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import Protocol


class Progress(Protocol):
    def advance(self, ok: bool) -> None: ...

    def close(self) -> None: ...


class _NoProgress:
    def advance(self, ok: bool) -> None:
        pass

    def close(self) -> None:
        pass


class _TqdmProgress:
    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)
        self._failed = 0

    def advance(self, ok: bool) -> None:
        self._failed += 0 if ok else 1
        if self._failed:
            self._bar.set_postfix(failed=self._failed, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class _LineProgress:
    """For terminals without tqdm: one status line at most every ``every_s`` seconds."""

    def __init__(self, total: int, label: str, every_s: float = 5.0) -> None:
        self._total, self._label, self._every_s = total, label, every_s
        self._done = self._failed = 0
        self._last = time.monotonic()

    def advance(self, ok: bool) -> None:
        self._done += 1
        self._failed += 0 if ok else 1
        now = time.monotonic()
        if now - self._last >= self._every_s or self._done == self._total:
            self._last = now
            print(
                f"{self._label}: {self._done}/{self._total} done, {self._failed} failed",
                file=sys.stderr,
            )

    def close(self) -> None:
        pass


def make_progress(total: int, label: str, enabled: bool = True) -> Progress:
    """A progress display for ``total`` requests (none when ``enabled`` is False)."""
    if not enabled:
        return _NoProgress()
    try:
        return _TqdmProgress(total, label)
    except ImportError:
        return _LineProgress(total, label)
