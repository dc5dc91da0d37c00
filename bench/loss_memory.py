"""Peak memory of the contrastive loss against the global batch: full InfoNCE ([N, N] logits on
every process) vs the local loss (``loss.local=true``: [N / P, N] per process).

    python bench/loss_memory.py --processes 8 --global-batch 512,1024,2048,4096

P CPU processes (gloo) simulate P GPUs: each holds its N / P rows of D-dim embeddings, gathers
the global batch and runs the loss forward and backward. Peak memory is the rise of the
process's resident high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
over the loss call, the largest of the P processes. The last stdout line is JSON: per global
batch the full and local peaks in MiB and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout too

from imagebind_lite.cli import OneLineArgumentParser, positive_int, run_script  # noqa: E402
from imagebind_lite.loss import info_nce  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(rows: int, dim: int, local: bool, rank: int) -> float:
    g = torch.Generator().manual_seed(rank)
    modality = torch.randn(rows, dim, generator=g).requires_grad_()
    anchor = torch.randn(rows, dim, generator=g)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the RSS now
    before = _status_kib("VmRSS")
    info_nce(modality, anchor, 0.05, local=local).backward()
    return (_status_kib("VmHWM") - before) / 1024


def _worker(rank, world, port, cases, dim, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out[rank] = [_measure(n // world, dim, local, rank) for n, local in cases]
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mib(processes: int, cases: list[tuple[int, bool]], dim: int) -> list[float]:
    """Per (global batch, local) case, the largest rise over the processes. One launch runs
    every case: a fixed malloc mmap threshold returns each freed buffer to the system, so a
    case never reuses the pages of the one before it unseen."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # read by the spawned interpreters
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(processes, _free_port(), cases, dim, out), nprocs=processes)
    return [max(per_rank[i] for per_rank in out.values()) for i in range(len(cases))]


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=positive_int, default=8)
    parser.add_argument("--global-batch", default="512,1024,2048,4096")
    parser.add_argument(
        "--dim", type=positive_int, default=1024, help="embedding size (ImageBind: 1024)"
    )
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        raise ValueError("bench/loss_memory.py reads Linux's /proc/self peak-memory counters")
    try:
        sizes = [positive_int(n) for n in args.global_batch.split(",")]
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --global-batch: {err} (sizes separated by commas)")
    if any(n % args.processes for n in sizes):
        raise ValueError(f"--global-batch: every size must divide by --processes {args.processes}")
    cases = [(n, local) for n in sizes for local in (False, True)]
    peaks = dict(zip(cases, peak_mib(args.processes, cases, args.dim)))
    rows = {}
    for n in sizes:
        full, local = peaks[n, False], peaks[n, True]
        rows[str(n)] = {"full_mib": round(full, 1), "local_mib": round(local, 1)}
        rows[str(n)]["ratio"] = round(full / max(local, 1e-9), 2)
        print(f"global batch {n:6d}: full {full:8.1f} MiB  local {local:8.1f} MiB", flush=True)
    result = {"processes": args.processes, "dim": args.dim, "peak_loss_memory": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
