"""Training throughput of a shipped config at one CPU thread and at the count the run chooses.

    python bench/threads.py [--config audio] [--steps 10] [--repeats 3] [field=value ...]

Builds the run as training does (``AlignmentTask.build``: the anchor, the dataset with its
augmentation, the encoder, AdamW) and times ``train_step`` over the config's own batches, at 1
thread and at the count of ``imagebind_lite/threads.py`` (what ``accelerate launch`` now gets),
alternating the two per repeat so that other load hits both alike. Both settings train the same
model from the same state, so they time the same work. The last stdout line is a JSON object:
samples per second per setting (median over repeats, and each repeat), the ratio, the chosen
count and why, and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.cli import OneLineArgumentParser, positive_int, run_script
from imagebind_lite.config import load_config, resolve_config_arg
from imagebind_lite.threads import choose_threads
from imagebind_lite.train import AlignmentTask, StepContext, adamw, train_step
from imagebind_lite.training.loop import build_accelerator, build_loader


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="audio", help="a shipped config or a YAML file")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("overrides", nargs="*", help="config field=value")
    return parser.parse_args(argv)


class Stepper:
    """The config's model, AdamW and batches; ``steps(n)`` trains n steps and times them."""

    def __init__(self, args, run_dir: Path):
        cfg = load_config(resolve_config_arg(args.config, None), args.overrides)
        cfg.tracker = None
        task = AlignmentTask(cfg, run_dir, quiet=True)
        self.accelerator = build_accelerator(task.settings)
        parts = task.build(self.accelerator)
        optimizer = adamw(parts.param_groups, cfg.optim.lr, cfg.optim.betas, "cpu")
        model, optimizer = self.accelerator.prepare(parts.model, optimizer)
        clip = cfg.optim.grad_clip
        self.ctx = StepContext(self.accelerator, model, optimizer, parts.objective, clip)
        self.loader = build_loader(parts.train_set, task.settings, parts.collate_fn)
        self.batch = task.settings.batch_size
        self.batches = iter(())

    def next_batch(self) -> dict:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def steps(self, n: int) -> float:
        """Samples per second over ``n`` steps (data loading included, as in training)."""
        start = time.perf_counter()
        for _ in range(n):
            train_step(self.ctx, self.next_batch())
        return n * self.batch / (time.perf_counter() - start)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.cuda.is_available():
        raise ValueError("bench/threads.py measures CPU threads; this machine has a CUDA GPU")
    chosen = choose_threads()
    settings = {"one_thread": 1, "chosen": chosen.threads}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as folder:
        stepper = Stepper(args, Path(folder) / "run")
        rates: dict[str, list[float]] = {name: [] for name in settings}
        for threads in settings.values():
            torch.set_num_threads(threads)
            for _ in range(args.warmup):
                stepper.steps(1)
        for repeat in range(args.repeats):
            for name, threads in settings.items():
                torch.set_num_threads(threads)
                rates[name].append(stepper.steps(args.steps))
            print(f"repeat {repeat}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "batch": stepper.batch,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "samples_per_second_1_thread": medians["one_thread"],
        "samples_per_second_chosen": medians["chosen"],
        "speedup": medians["chosen"] / medians["one_thread"],
        "per_repeat": rates,
        **chosen.metrics(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
