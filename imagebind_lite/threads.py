"""How many CPU threads torch uses in a process: the cores it may run on, shared among the
processes of this machine, unless the user chose a count.

Why this exists: ``accelerate launch`` without a config file sets ``OMP_NUM_THREADS=1`` in its
child, so every run it starts trained on one core, whatever the machine. The child cannot tell
that value from one a user exported, so under a launcher ``OMP_NUM_THREADS`` is not read as a
choice; ``IMAGEBIND_LITE_THREADS`` (or the config field ``threads``) pins the count under every
launcher. The rule, first match wins:

1. a CUDA device: torch's own setting, unchanged (the GPU does the work);
2. ``threads`` in the config (a positive count);
3. ``IMAGEBIND_LITE_THREADS=N`` in the environment;
4. ``OMP_NUM_THREADS=N`` when no launcher started the process (plain ``python``);
5. otherwise the CPUs in this process's affinity divided by the processes on this machine
   (the launcher's local world size), less one per DataLoader worker (each worker runs torch
   on one thread), at least 1.

Audio preprocessing threads (``imagebind_lite.data.audio.default_num_workers``) are bounded by
torch's count, so they stay within the same budget.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

THREADS_ENV = "IMAGEBIND_LITE_THREADS"
# Set by accelerate launch (every launcher mode) and by torchrun in the processes they start.
LAUNCHER_MARKERS = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
LOCAL_SIZE_VARS = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def line(self) -> str:
        return f"threads: {self.threads} ({self.reason})"

    def metrics(self) -> dict:
        return {"threads": self.threads, "threads_reason": self.reason}


def _positive(text: str | None, where: str) -> int | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{where}: expected a whole number of threads, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{where}: must be at least 1, got {value}")
    return value


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes(environ: Mapping[str, str]) -> int:
    """Processes of this run on this machine, as the launcher reports them (1 when none does)."""
    for name in LOCAL_SIZE_VARS:
        value = _positive(environ.get(name), name)
        if value:
            return value
    return 1


def choose_threads(
    requested: int | None = None,
    workers: int = 0,
    environ: Mapping[str, str] | None = None,
    cpus: int | None = None,
) -> ThreadChoice:
    """The CPU thread count for this process and why (the rule in the module docstring, less
    the CUDA case, which :func:`use_threads` handles)."""
    env = os.environ if environ is None else environ
    if requested is not None:
        return ThreadChoice(_positive(str(requested), "threads"), "threads in the config")
    pinned = _positive(env.get(THREADS_ENV), THREADS_ENV)
    if pinned:
        return ThreadChoice(pinned, f"{THREADS_ENV}={pinned}")
    launched = any(name in env for name in LAUNCHER_MARKERS)
    omp = env.get("OMP_NUM_THREADS")
    if not launched and _positive(omp, "OMP_NUM_THREADS"):
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={int(omp)}")
    cpus = available_cpus() if cpus is None else cpus
    local = local_processes(env)
    threads = max(1, cpus // local - max(0, int(workers)))
    reason = f"{cpus} CPUs available / {local} process{'es' if local > 1 else ''} on this machine"
    if workers:
        reason += f", less {workers} DataLoader worker{'s' if workers > 1 else ''}"
    if launched and omp is not None:
        reason += f"; the launcher's OMP_NUM_THREADS={omp} ignored, pin with {THREADS_ENV}"
    return ThreadChoice(threads, reason)


def use_threads(requested: int | None = None, workers: int = 0) -> ThreadChoice:
    """Set torch's intra-op thread count by :func:`choose_threads` (CPU runs only) and return
    the choice. A bad count (``threads: 0``, ``IMAGEBIND_LITE_THREADS=x``) is a ValueError."""
    if torch.cuda.is_available():
        return ThreadChoice(torch.get_num_threads(), "a GPU run: torch's default, unchanged")
    choice = choose_threads(requested, workers)
    torch.set_num_threads(choice.threads)
    return choice
