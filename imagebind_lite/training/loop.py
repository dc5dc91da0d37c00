"""One training loop for every task: build -> step -> checkpoint/resume -> evaluate.

A *task* (alignment in ``imagebind_lite/train.py``, anchor fine-tuning in
``imagebind_lite/anchor_finetune.py``) supplies what differs; the loop owns the rest:

- ``LoopSettings``: what the loop reads from a task's config (seed, optimizer, batch, schedule,
  checkpoints, evaluation cadence, tracker).
- ``Task.build(accelerator) -> TaskParts``: the trainable module, its AdamW param groups, the
  training set and its collate function, and the ``Objective`` (``batch -> loss``, with the
  forward and backward passes its accumulation scheme needs).
- ``Task.evaluate(run)``: the metrics logged every ``eval_every_epochs``;
  ``Task.finish(run)``: the final evaluation and what is saved, returned as the run's result.

A task whose steps are not a shuffled split of one set (binding: one modality per step, each
with its own batch) sets ``TaskParts.step_batches``: its training set is then batch-level, item
``i`` being step ``i``'s batch on this process, read in order and not sharded by Accelerate.

Read top to bottom: build (one Accelerator construction, AdamW over the task's param groups,
linear warm-up then cosine, a DataLoader whose batch is one optimizer step on one process), the
step (``train_step``: the objective's backward, grad clip, AdamW), checkpoint/resume (Accelerate
state plus ``state.json``, renamed into place when complete), then the epochs and ``fit``. A
SIGTERM or Ctrl-C ends the epochs after the step in progress, with that step's checkpoint
(``training/stopping.py``).

Randomness. A resumed run reproduces the uninterrupted one bit for bit: torch's global RNG is
reseeded from (seed, epoch) before each epoch's DataLoader iterator is created (its base seed,
hence the workers' seeds) and from (seed, step, process index) before each step (drop path,
dropout, anything a model draws), so no draw depends on how much of the stream earlier code
consumed, before or after a restart. The shuffle order is Accelerate's seedable sampler's
(seed + epoch). Datasets draw per-sample randomness from generators seeded by (seed, epoch,
index) (``imagebind_lite.data.datasets.EpochRandom``), not from the global RNG.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    gather_object,
    send_to_device,
    set_seed,
)
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..config import ConfigError
from ..files import atomic_dir, load_error_line
from ..threads import ThreadChoice, use_threads
from .stopping import TrainingStopped, absorb_stop_signals, requested_stop, stop_signals

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------- what a task supplies


@dataclass
class LoopSettings:
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None  # stop early (tests, smoke runs)
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    batch_size: int = 1  # samples per process per optimizer step (micro-batches included)
    num_workers: int = 0
    threads: int | None = None  # CPU threads for torch; None: by the rule of threads.py
    mixed_precision: str = "no"  # no, fp16, bf16 (Accelerate)
    tracker: str | None = None  # any Accelerate tracker, or None
    hparams: dict = field(default_factory=dict)  # the tracker's run config
    run_dir: Path | None = None  # checkpoints/ and logs/ go here; None: no checkpoints
    checkpoint_every: int = 0  # steps; 0: never
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every_epochs: int = 0  # 0: only the task's final evaluation
    desc: str = "train"  # progress bar label
    quiet: bool = False
    # DDP: parameters a step may leave unused (several encoders, one of them used per step).
    find_unused_parameters: bool = False


@dataclass
class StepContext:
    """What one optimizer step needs: the prepared model and optimizer, the objective."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    grad_clip: float | None = None


class Objective:
    """``batch -> loss``: ``backward`` runs the forward passes and ``accelerator.backward`` (as
    many as its accumulation scheme needs) and returns the loss as a float."""

    def backward(self, ctx: StepContext, batch) -> float:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimizer step (e.g. to clamp a parameter)."""

    def scalars(self) -> dict:
        """More ``train/*`` scalars for the tracker (e.g. a loss per modality)."""
        return {}

    def step_samples(self, global_batch: int) -> int:
        """Samples the last step trained on, over all processes (default: the loop's batch)."""
        return global_batch

    def state(self) -> dict:
        """What the objective records across steps (JSON), saved with each checkpoint."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` on resume."""


@dataclass
class TaskParts:
    model: torch.nn.Module  # the trainable module (what Accelerate wraps)
    param_groups: list[dict]  # AdamW groups over its parameters, each with its weight_decay
    train_set: Dataset
    objective: Objective
    collate_fn: Callable | None = None
    # True: ``train_set[i]`` is already step ``i`` of the epoch on this process (a batch-level
    # dataset: the task batches, orders and shards it, e.g. one modality per step); the loop
    # iterates it in order and neither batches, shuffles nor shards it.
    step_batches: bool = False


@dataclass
class Run:
    """The prepared objects and the progress of one run."""

    accelerator: Accelerator
    ctx: StepContext
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    train_set: Dataset
    steps_per_epoch: int
    total_steps: int
    global_batch: int  # samples per optimizer step over all processes
    step_batches: bool = False  # TaskParts.step_batches
    step: int = 0
    loss: float = float("nan")
    skipped: Counter = field(default_factory=Counter)  # bad inputs replaced, by reason
    trained_samples: int = 0  # in this process's session (not before a resume)
    seconds: float = 0.0
    threads: ThreadChoice | None = None  # torch's CPU threads in this process, and why

    @property
    def model(self) -> torch.nn.Module:
        return self.ctx.model


class Task:
    """Subclass and fill in; ``settings`` is read by the loop."""

    settings: LoopSettings

    def build(self, accelerator: Accelerator) -> TaskParts:
        raise NotImplementedError

    def batch_too_large(self, processes: int, samples: int) -> str:
        """The ConfigError message when one step's batch exceeds the training set."""
        return (
            f"batch_size: {self.settings.batch_size} per process x {processes} processes is "
            f"larger than the {samples} training samples"
        )

    def evaluate(self, run: Run) -> dict:
        """Metrics during training (main process; others may return {})."""
        return {}

    def finish(self, run: Run) -> dict:
        """The final evaluation and saving; every process calls it."""
        return {}


# ------------------------------------------------------------------------- build


def build_accelerator(s: LoopSettings) -> Accelerator:
    project = None
    if s.run_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(s.run_dir), logging_dir=str(Path(s.run_dir) / "logs")
        )
    handlers = []
    if s.find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        # Without this a CPU-only multi-process launch trains each rank alone.
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=handlers,
        mixed_precision=s.mixed_precision,
        log_with=s.tracker,
        project_config=project,
        # The shuffle order is seeded by (seed, epoch): the same on every rank and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on norms, biases, tokens and positional embeddings (CLIP/ViT practice).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(
            param
        )
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(param_groups: list[dict], lr: float, betas, device: torch.device) -> torch.optim.AdamW:
    """AdamW, with the fused kernel on CUDA: one launch updates every parameter, where the
    multi-tensor path makes several passes over parameters, gradients and moments."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=fused)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loader(train_set: Dataset, s: LoopSettings, collate_fn=None) -> DataLoader:
    return DataLoader(
        train_set,
        batch_size=s.batch_size,  # one optimizer step; a task may split it into micro-batches
        shuffle=True,
        drop_last=True,  # equal batches on every rank: a global contrastive loss needs them
        num_workers=s.num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        # Workers are re-forked each epoch so they see the dataset's set_epoch (per-sample
        # randomness is seeded by epoch); persistent workers would keep epoch 0 forever.
        persistent_workers=False,
        worker_init_fn=absorb_stop_signals,
    )


def _identity(batch):
    return batch


def step_loader(train_set: Dataset, s: LoopSettings, offset: int = 0) -> DataLoader:
    """A batch-level dataset's steps from ``offset`` on, in order, one item per step."""
    steps = Subset(train_set, range(offset, len(train_set))) if offset else train_set
    return DataLoader(
        steps,
        batch_size=None,
        num_workers=s.num_workers,
        collate_fn=_identity,
        worker_init_fn=absorb_stop_signals,
    )


def prepare_run(task: Task, accelerator: Accelerator) -> Run:
    """The task's parts -> prepared model, AdamW, loader and the warm-up/cosine schedule."""
    s = task.settings
    parts = task.build(accelerator)
    optimizer = adamw(parts.param_groups, s.lr, s.betas, accelerator.device)
    if parts.step_batches:
        loader = step_loader(parts.train_set, s)
        model, optimizer = accelerator.prepare(parts.model, optimizer)
    else:
        loader = build_loader(parts.train_set, s, parts.collate_fn)
        if len(loader) // accelerator.num_processes == 0:
            raise ConfigError(task.batch_too_large(accelerator.num_processes, len(parts.train_set)))
        model, optimizer, loader = accelerator.prepare(parts.model, optimizer, loader)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * s.epochs
    if s.max_steps:
        total_steps = min(total_steps, s.max_steps)
    warmup = int(s.warmup_epochs * steps_per_epoch)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    ctx = StepContext(accelerator, model, optimizer, parts.objective, s.grad_clip)
    global_batch = s.batch_size * accelerator.num_processes
    return Run(
        accelerator,
        ctx,
        scheduler,
        loader,
        parts.train_set,
        steps_per_epoch,
        total_steps,
        global_batch,
        parts.step_batches,
    )


# ------------------------------------------------------------------------- the step


def reseed(seed: int, *keys) -> None:
    """Seed torch's global RNG (CPU and every GPU) from ``(seed, *keys)``."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def train_step(ctx: StepContext, batch) -> float:
    """One optimizer step: the objective's backward pass(es), grad clip, AdamW."""
    loss = ctx.objective.backward(ctx, batch)
    if ctx.grad_clip:
        ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.grad_clip)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.objective.after_step(ctx)
    return loss


def advance(run: Run, seed: int, batch) -> None:
    """``train_step`` with the RNG seeded by the step, then the schedule and the counters."""
    reseed(seed, "step", run.step, run.accelerator.process_index)
    run.loss = train_step(run.ctx, batch)
    run.scheduler.step()
    run.step += 1
    run.trained_samples += run.ctx.objective.step_samples(run.global_batch)
    if isinstance(batch, dict):
        run.skipped.update(batch.get("skipped", {}))


# ------------------------------------------------------------------------- checkpoints


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    steps = [
        (int(m.group(1)), p)
        for p in folder.glob("step_*")
        if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    skipped: Counter,
    keep: int,
    objective: dict,
    global_batch: int,
) -> None:
    folder = checkpoint_folder(run_dir, step)
    tmp = folder.with_name(folder.name + ".tmp")
    # Every process writes its own RNG state into the same folder; the main one finalises it.
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "skipped": dict(skipped),
            "objective": objective,
            "global_batch": global_batch,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        with atomic_dir(folder) as final_tmp:
            final_tmp.rmdir()
            os.replace(tmp, final_tmp)
        done = sorted(p for p in folder.parent.glob("step_*") if CHECKPOINT_RE.match(p.name))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(run: Run, folder: Path) -> None:
    """Model, optimizer, scheduler and RNG state, then the step and skip counters. A checkpoint
    of another global batch, or one whose tensors do not fit the model, is refused in one line."""
    state = json.loads((Path(folder) / "state.json").read_text())
    trained = state.get("global_batch", run.global_batch)
    if trained != run.global_batch:
        processes = run.accelerator.num_processes
        raise ConfigError(
            f"--resume: {folder} was trained at a global batch of {trained}; this run's is "
            f"{run.global_batch} ({run.global_batch // processes} per process x {processes}): "
            "keep data.batch_size x optim.grad_accum x processes as it was"
        )
    try:
        run.accelerator.load_state(str(folder))
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(
            f"--resume: {folder} does not fit this run: {load_error_line(err)}"
        ) from err
    run.step, run.skipped = state["step"], Counter(state.get("skipped", {}))
    run.ctx.objective.load_state(state.get("objective", {}))


def maybe_checkpoint(s: LoopSettings, run: Run, force: bool = False) -> None:
    """Save this step's checkpoint when it is due (or ``force``: a stop signal came)."""
    if s.run_dir is None:
        return
    every = s.checkpoint_every
    if force or (every and (run.step % every == 0 or run.step == run.total_steps)):
        objective = run.ctx.objective.state()
        save_checkpoint(
            run.accelerator,
            s.run_dir,
            run.step,
            run.skipped,
            s.keep_checkpoints,
            objective,
            run.global_batch,
        )


# ------------------------------------------------------------------------- logging


def log_scalars(accelerator, prefix: str, metrics: dict, step: int) -> None:
    """Log the numeric entries of ``metrics`` as ``prefix/name`` (booleans left out)."""
    accelerator.log(
        {
            f"{prefix}/{k}": v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        step=step,
    )


def log_progress(s: LoopSettings, run: Run, bar, epoch: int, rate: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{run.loss:.3f}", samples_per_s=f"{rate:.0f}")
    if run.step % s.log_every == 0 and s.tracker:
        train = {
            "loss": run.loss,
            "lr": run.scheduler.get_last_lr()[0],
            "samples_per_second": rate,
            "epoch": epoch,
            **run.ctx.objective.scalars(),
        }
        log_scalars(run.accelerator, "train", train, run.step)


def sum_counters(accelerator, counter: Counter) -> Counter:
    """The counters of every process added up (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return counter
    total = Counter()
    for part in gather_object([dict(counter)]):
        total.update(part)
    return total


# ------------------------------------------------------------------------- epochs and the run


def epoch_batches(run: Run, s: LoopSettings, epoch: int, offset: int):
    """The batches of ``epoch`` from batch ``offset`` on (a resume mid-epoch). The iterator is
    created right after this returns, with the RNG seeded by the epoch."""
    if hasattr(run.train_set, "set_epoch"):
        run.train_set.set_epoch(epoch)
    if run.step_batches:
        reseed(s.seed, "epoch", epoch)
        device = run.accelerator.device
        return (send_to_device(b, device) for b in step_loader(run.train_set, s, offset))
    run.loader.set_epoch(epoch)
    reseed(s.seed, "epoch", epoch)
    return run.accelerator.skip_first_batches(run.loader, offset) if offset else run.loader


def maybe_evaluate(task: Task, run: Run) -> float:
    """After every ``eval_every_epochs``-th epoch (but not the last step, which ``finish``
    evaluates): the task's metrics to the tracker as ``eval/*`` and one printed line. Returns
    the seconds it took, which do not count as training time."""
    every, spe = task.settings.eval_every_epochs, run.steps_per_epoch
    if not every or run.step % spe or run.step >= run.total_steps or (run.step // spe) % every:
        return 0.0
    start = time.perf_counter()
    metrics = task.evaluate(run)
    if run.accelerator.is_main_process and metrics:
        if task.settings.tracker:
            log_scalars(run.accelerator, "eval", metrics, run.step)
        shown = [
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        tqdm.write(f"eval epoch {run.step // spe} step {run.step}: {' '.join(shown)}")
    return time.perf_counter() - start


def train_epochs(task: Task, run: Run) -> None:
    s = task.settings
    main = run.accelerator.is_main_process
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not main or s.quiet, desc=s.desc)
    start = time.perf_counter()
    run.model.train()
    with stop_signals() as received:
        while run.step < run.total_steps:
            epoch, offset = divmod(run.step, run.steps_per_epoch)
            for batch in epoch_batches(run, s, epoch, offset):
                advance(run, s.seed, batch)
                rate = run.trained_samples / (time.perf_counter() - start)
                log_progress(s, run, bar, epoch, rate)
                start += maybe_evaluate(task, run)
                # A signal at the last step stops nothing: training is done.
                done = run.step >= run.total_steps
                signum = 0 if done else requested_stop(run.accelerator, received)
                maybe_checkpoint(s, run, force=bool(signum))
                if signum:
                    bar.close()
                    raise stopped(s, run, signum)
                if done:
                    break
    bar.close()
    run.seconds = time.perf_counter() - start


def stopped(s: LoopSettings, run: Run, signum: int) -> TrainingStopped:
    folder = checkpoint_folder(s.run_dir, run.step) if s.run_dir else None
    main = run.accelerator.is_main_process
    return TrainingStopped(signum, run.step, run.total_steps, folder, main)


def fit(task: Task, resume_from: Path | None = None) -> dict:
    """Build, resume if asked, train, then the task's ``finish``; returns its result."""
    s = task.settings
    accelerator = build_accelerator(s)
    # After the Accelerator: its multi-CPU set-up may set torch's threads itself.
    threads = use_threads(s.threads, s.num_workers)
    set_seed(s.seed, device_specific=False)
    run = prepare_run(task, accelerator)
    # Said once the data is read, so a bad input is still the run's only line.
    if accelerator.is_main_process and not s.quiet:
        print(threads.line(), file=sys.stderr, flush=True)
    run.threads = threads
    if resume_from is not None:
        load_checkpoint(run, resume_from)
        accelerator.print(f"resumed {s.run_dir} from step {run.step}")
    if s.tracker:
        accelerator.init_trackers("train", config=s.hparams)
    try:
        train_epochs(task, run)
    except TrainingStopped:
        accelerator.end_training()
        raise
    result = task.finish(run)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
