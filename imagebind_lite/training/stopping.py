"""Stopping on a signal: a scheduler's SIGTERM (preemption, the end of a time limit) or a Ctrl-C
ends the run after the current step with a checkpoint of that step, instead of losing every step
since the last periodic one.

- ``stop_signals()``: while the loop trains, the first SIGTERM or SIGINT is recorded, not acted
  on at once; a second Ctrl-C interrupts as usual.
- ``requested_stop(accelerator, received)``: after each step, the signal any process received
  (gathered over processes, so every rank stops after the same step and saves one checkpoint).
- ``absorb_stop_signals``: DataLoader workers' ``worker_init_fn``. A signal sent to the whole
  process group (SLURM, a terminal's Ctrl-C) reaches the workers too; each ignores its first one,
  so the training process is not failed by a dead worker before it has saved.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped on a signal after ``step``, with that step's checkpoint saved (None
    when the run has no folder to save into)."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Path | None, main=True):
        self.signum, self.step, self.checkpoint, self.main_process = signum, step, checkpoint, main
        saved = f"saved {checkpoint}; --resume continues it" if checkpoint else "nothing saved"
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step} of {total}: {saved}")


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Record SIGTERM and SIGINT in the yielded list while the block runs (handlers restored on
    leaving it). Off the main thread, where Python cannot set handlers, nothing is recorded."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        received.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: now

    previous = {sig: signal.signal(sig, record) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def requested_stop(accelerator, received: list[int]) -> int:
    """The stop signal any process has received, or 0. With several processes this is a
    collective (a one-number gather), so every process must call it after every step."""
    signum = received[0] if received else 0
    if accelerator.num_processes == 1:
        return signum
    flags = accelerator.gather(torch.tensor([signum], device=accelerator.device))
    return int(flags.max())


def absorb_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: ignore the first SIGTERM and SIGINT; a second one acts
    as usual, so DataLoader can still terminate a stuck worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _absorb_once)


def _absorb_once(signum, frame) -> None:
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    signal.signal(signum, default)
