"""How a prefill waits for the device at a checkpoint: `sync` or `bounded` run-ahead.

On CUDA, kernel launches return before the GPU finishes. A checkpoint that only checks a flag
on the CPU would let the CPU queue many blocks ahead; a pause would then take effect only after
the GPU drains all of them, so preemption latency would be unbounded.

- `sync`: synchronise the stream at every checkpoint (what the FlowPrefill release does). The
  pause takes effect at once, but the GPU idles while the CPU launches the next block.
- `bounded`: record an event at each checkpoint and wait only on the event from
  `max_run_ahead` checkpoints ago. The CPU stays at most that many blocks ahead, so a pause
  takes effect within `max_run_ahead` blocks, and the launch queue never runs empty.

On CPU every operator has finished when it returns, so both modes do nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch

SyncMode = Literal["sync", "bounded"]


class CheckpointSync:
    """Waits for device work at checkpoints according to `mode` (see module docstring)."""

    def __init__(self, mode: SyncMode, device: torch.device, max_run_ahead: int = 2) -> None:
        if mode not in ("sync", "bounded"):
            raise ValueError(f"checkpoint_sync must be 'sync' or 'bounded', got {mode!r}")
        if max_run_ahead < 1:
            raise ValueError(f"max_run_ahead must be >= 1 checkpoint, got {max_run_ahead}")
        self.mode = mode
        self.max_run_ahead = max_run_ahead
        self._device = device
        self._on_cuda = device.type == "cuda"
        self._pending: deque[torch.cuda.Event] = deque()

    def checkpoint(self) -> None:
        """Called at each checkpoint before the scheduler's pause flag is read."""
        if not self._on_cuda:
            return
        if self.mode == "sync":
            torch.cuda.current_stream(self._device).synchronize()
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        self._pending.append(event)
        while len(self._pending) > self.max_run_ahead:
            self._pending.popleft().synchronize()

    def drain(self) -> None:
        """Wait for all launched work: on pause (so the device is free for the next request
        and `executed_s` counts device time) and when the prefill is done."""
        if not self._on_cuda:
            return
        torch.cuda.current_stream(self._device).synchronize()
        self._pending.clear()
