"""Alignment: train an encoder for any registered modality against the frozen anchor.

A task on the shared loop (``imagebind_lite/training/loop.py``, which owns the Accelerator,
AdamW, the warm-up/cosine schedule, checkpoint/resume and the epochs). This module supplies what
is particular to alignment: the config checks and the run folder (config.yaml, checkpoints/,
logs/, model/, metrics.json), the build (anchor -> data -> encoder), the objective (anchor
embeddings without gradients, encoder embeddings with, InfoNCE or SigLIP over the global batch,
with accumulation that keeps the whole effective batch as negatives), and the zero-shot
evaluation.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from .anchor import Anchor, validate_anchor_config
from .cache import attach_anchor_cache, cached_class_text_embeddings
from .checkpoint import save_model
from .config import (
    ConfigError,
    TrainConfig,
    check_resumed_config,
    config_to_dict,
    save_config,
)
from .data.datasets import DatasetBundle, collate, get_dataset_builder
from .evaluation import prompts
from .evaluation.uncertainty import bootstrap_ci
from .evaluation.uncertainty import method as ci_method
from .evaluation.zero_shot import embed_dataset, retrieval_ranks, zero_shot_classification
from .loss import SigLIPHead, info_nce
from .models.anchor_init import check_encoder_options, init_architecture, setup_encoder
from .models.build import build_encoder, resolve_size, stem_tokens
from .registry import get_modality, import_modality_file
from .training.loop import (
    CHECKPOINT_RE,
    LoopSettings,
    Objective,
    Run,
    StepContext,
    Task,
    TaskParts,
    adamw,
    cosine_with_warmup,
    fit,
    latest_checkpoint,
    log_scalars,
    param_groups,
    save_checkpoint,
    sum_counters,
    train_step,
)

# The loop's names that scripts, benches and tests import from here.
__all__ = [
    "CHECKPOINT_RE",
    "AlignmentModule",
    "AlignmentObjective",
    "AlignmentTask",
    "LOSS_KINDS",
    "StepContext",
    "adamw",
    "cosine_with_warmup",
    "evaluate",
    "latest_checkpoint",
    "loss_head",
    "loss_scalars",
    "param_groups",
    "resolve_run_dir",
    "save_checkpoint",
    "train",
    "train_step",
    "validate_config",
]


def validate_config(cfg: TrainConfig) -> None:
    """Everything that can be checked without reading data; raises ConfigError (one line)."""
    if cfg.modality_file:
        try:
            import_modality_file(cfg.modality_file)
        except FileNotFoundError as err:
            raise ConfigError(f"modality_file: {err}") from None
    try:
        spec = get_modality(cfg.modality)
        if spec.is_anchor:
            raise ConfigError(f"modality: {cfg.modality!r} is an anchor tower, not trainable")
        resolve_size(cfg.modality, cfg.encoder.size, cfg.encoder.overrides)
        get_dataset_builder(cfg.data.dataset)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    if cfg.data.bad_input not in ("skip", "raise"):
        raise ConfigError(f"data.bad_input: expected skip or raise, got {cfg.data.bad_input!r}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(
            f"mixed_precision: expected no, fp16 or bf16, got {cfg.mixed_precision!r}"
        )
    for name, value in (
        ("data.batch_size", cfg.data.batch_size),
        ("optim.epochs", cfg.optim.epochs),
        ("optim.grad_accum", cfg.optim.grad_accum),
    ):
        if value < 1:
            raise ConfigError(f"{name}: must be at least 1, got {value}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads: must be at least 1 (or null: automatic), got {cfg.threads}")
    if cfg.eval.every_epochs < 0:
        raise ConfigError(
            f"eval.every_epochs: must be 0 (only at the end) or more, got {cfg.eval.every_epochs}"
        )
    if cfg.data.root is not None and not Path(cfg.data.root).exists():
        raise ConfigError(f"data.root: folder not found: {cfg.data.root}")
    validate_loss(cfg)
    validate_patch_dropout(cfg)
    validate_anchor_config(cfg.anchor)
    check_encoder_options(cfg)


LOSS_KINDS = ("infonce", "siglip")


def validate_loss(cfg: TrainConfig) -> None:
    """``loss.*``: a known kind, ``local`` for InfoNCE only, a positive SigLIP scale."""
    kind = cfg.loss.kind
    if kind not in LOSS_KINDS:
        raise ConfigError(f"loss.kind: expected {' or '.join(LOSS_KINDS)}, got {kind!r}")
    if kind == "siglip" and cfg.loss.local:
        raise ConfigError(
            "loss.local: siglip always scores each process's own rows against the global "
            "batch (it is local already); leave loss.local false"
        )
    if cfg.loss.init_scale <= 0:
        raise ConfigError(f"loss.init_scale: must be positive, got {cfg.loss.init_scale}")


def validate_patch_dropout(cfg: TrainConfig) -> None:
    """``encoder.patch_dropout``: a probability in [0, 1) and a stem with tokens to drop."""
    p = cfg.encoder.patch_dropout
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"encoder.patch_dropout: expected a probability in [0, 1), got {p}")
    if not p:
        return
    spec = get_modality(cfg.modality)
    preprocess = {**spec.preprocess, **cfg.data.preprocess}
    try:
        tokens = stem_tokens(cfg.modality, cfg.encoder.size, cfg.encoder.overrides, preprocess)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"encoder: the {cfg.modality} stem cannot be built: {err}") from None
    if tokens < 2:
        raise ConfigError(
            f"encoder.patch_dropout: the {cfg.modality} encoder at this size makes {tokens} "
            "token; there are none to drop"
        )


def resolve_run_dir(cfg: TrainConfig, resume: str | bool | None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from). A new run never overwrites an old one."""
    base = Path(cfg.output_dir) / (cfg.run_name or f"{cfg.modality}-{cfg.data.dataset}")
    return resolve_run_folder(base, resume)


RESUME_AUTO = "auto"  # --resume auto: the latest run if there is one, else a new run


def resolve_run_folder(base: Path, resume: str | bool | None) -> tuple[Path, Path | None]:
    """``base`` (or ``base-N`` when taken) for a new run; the run and its checkpoint to resume.
    ``resume="auto"`` resumes the latest run of ``base`` if there is one and starts a new run
    if not: one command for a job that a scheduler may requeue."""
    if resume == RESUME_AUTO and not Path(RESUME_AUTO).exists():
        resume = True if _latest_run(base) is not None else None
    if resume:
        run_dir = Path(resume) if isinstance(resume, str) else _latest_run(base)
        if run_dir is None or not run_dir.is_dir():
            raise ConfigError(
                f"--resume: no run folder found at {resume if isinstance(resume, str) else base}"
            )
        if CHECKPOINT_RE.match(run_dir.name):  # a checkpoint folder was named directly
            return run_dir.parent.parent, run_dir
        return run_dir, latest_checkpoint(run_dir)
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    return run_dir, None


def _latest_run(base: Path) -> Path | None:
    candidates = [
        p
        for p in base.parent.glob(f"{base.name}*")
        if p.is_dir() and (p == base or re.fullmatch(re.escape(base.name) + r"-\d+", p.name))
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def model_config(cfg: TrainConfig, anchor: Anchor, temperature: float) -> dict:
    return {
        "modality": cfg.modality,
        "modality_file": cfg.modality_file,
        "size": cfg.encoder.size,
        "overrides": cfg.encoder.overrides,
        "init": cfg.encoder.init,
        "trainable": cfg.encoder.trainable,
        # features_on says where training made its inputs; a saved model's are the same.
        "preprocess": {
            k: v
            for k, v in {**get_modality(cfg.modality).preprocess, **cfg.data.preprocess}.items()
            if k != "features_on"
        },
        "temperature": temperature,
        "embed_dim": anchor.embed_dim,
        "anchor": {**anchor.identity(), "config": config_to_dict(cfg.anchor)},
    }


class AlignmentModule(torch.nn.Module):
    """What Accelerate wraps: the trainable encoder and the loss's own parameters, if any
    (``loss_head``: SigLIP's scale and bias); the frozen anchor stays outside.

    ``forward(x)``: the embeddings. ``forward(x, anchor_emb, rows)``: the loss head's loss of
    these rows against the anchor embeddings, computed inside the forward so that the
    data-parallel wrapper sees the head's parameters used and averages their gradients.
    """

    def __init__(self, encoder: torch.nn.Module, loss_head: torch.nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.loss_head = loss_head

    def forward(self, x: torch.Tensor, anchor_emb=None, rows=None) -> torch.Tensor:
        emb = self.encoder(x)
        if anchor_emb is None:
            return emb
        if self.loss_head is None:
            raise ValueError("this AlignmentModule has no loss head to score anchor embeddings")
        return self.loss_head(emb, anchor_emb, rows)


def loss_head(cfg: TrainConfig) -> torch.nn.Module | None:
    """The trainable part of ``cfg``'s loss: SigLIP's scale and bias, none for InfoNCE."""
    if cfg.loss.kind == "siglip":
        return SigLIPHead(cfg.loss.init_scale, cfg.loss.init_bias)
    return None


def loss_scalars(module: AlignmentModule) -> dict:
    """The loss head's learnt values (``siglip_scale``, ``siglip_bias``), none for InfoNCE."""
    head = getattr(module, "loss_head", None)
    return head.scalars() if head is not None else {}


# ------------------------------------------------------------------------- the objective


@dataclass
class AlignmentObjective(Objective):
    """InfoNCE (or SigLIP) of the encoder's embeddings against the anchor's, over ``accum``
    micro-batches with the negatives of all of them.

    With accumulation, the embeddings of every micro-batch are first computed without gradients;
    then each micro-batch is re-encoded with gradients and the loss is taken against all the
    others (open_clip's ``--accum-freq`` scheme), so the contrastive batch is the full effective
    batch and the summed gradients equal those of one big batch. SigLIP needs no cache: a row's
    pairs involve only its own embedding and the anchors', so each micro-batch's rows are scored
    against every anchor embedding of the step and the shares add up (``loss.siglip``).
    """

    anchor: Anchor | None  # None: batches carry cached "anchor_embedding"
    modality: str
    temperature: float
    accum: int = 1
    local: bool = False  # loss.local: this process's rows against the global batch
    kind: str = "infonce"  # loss.kind; siglip: the model holds the loss head (AlignmentModule)
    # data.preprocess.features_on=device: batch input -> model input, on the device.
    prepare: Callable | None = None

    def backward(self, ctx: StepContext, batch: dict) -> float:
        accelerator, model, accum = ctx.accelerator, ctx.model, self.accum
        inputs = batch[self.modality]
        if self.prepare is not None:
            with torch.no_grad():
                inputs = self.prepare(inputs)
        with torch.no_grad():
            anchor_emb = anchor_embeddings(self.anchor, batch)
        if self.kind == "siglip":
            return self.siglip_backward(ctx, inputs, anchor_emb)
        if accum == 1:
            with accelerator.autocast():
                loss = info_nce(model(inputs), anchor_emb, self.temperature, local=self.local)
            accelerator.backward(loss)
            return float(loss.detach())
        chunks = inputs.chunk(accum)
        with torch.no_grad(), accelerator.autocast():
            cached = [model(c).float() for c in chunks]
        for i, chunk in enumerate(chunks):
            # Gradients are synchronised once, on the last micro-batch.
            sync = accelerator.no_sync(model) if i < accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                emb = torch.cat(cached[:i] + [model(chunk).float()] + cached[i + 1 :])
                loss = info_nce(emb, anchor_emb, self.temperature, local=self.local)
                accelerator.backward(loss)
        return float(loss.detach())

    def siglip_backward(self, ctx: StepContext, inputs, anchor_emb: torch.Tensor) -> float:
        """Each micro-batch's rows with gradients against all the step's anchor embeddings,
        through the model's loss head; returns their summed shares, the batch's loss."""
        accelerator, model = ctx.accelerator, ctx.model
        chunks, start, total = inputs.chunk(self.accum), 0, 0.0
        for i, chunk in enumerate(chunks):
            rows = (start, start + chunk.shape[0])
            # Gradients are synchronised once, on the last micro-batch.
            sync = accelerator.no_sync(model) if i < len(chunks) - 1 else nullcontext()
            with sync, accelerator.autocast():
                loss = model(chunk, anchor_emb=anchor_emb, rows=rows)
                accelerator.backward(loss)
            total, start = total + float(loss.detach()), rows[1]
        return total


def device_feature_step(spec, cfg: TrainConfig, accelerator: Accelerator) -> Callable | None:
    """``data.preprocess.features_on: device``: the step's feature computation, else None."""
    options = {**spec.preprocess, **cfg.data.preprocess}
    where = options.get("features_on") or "worker"
    if where not in ("worker", "device"):
        raise ConfigError(f"data.preprocess.features_on: expected worker or device, got {where!r}")
    if where == "worker":
        return None
    if spec.device_features is None:
        raise ConfigError(
            f"data.preprocess.features_on=device: modality {spec.name!r} has no device features"
        )
    # Masks are drawn on the device from a generator of its own, one stream per process.
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed(cfg.seed * 1_000_003 + accelerator.process_index)
    return functools.partial(spec.device_features, options=options, train=True, generator=generator)


def anchor_embeddings(anchor: Anchor, batch: dict) -> torch.Tensor:
    """The anchor side of a batch: cached embeddings when the dataset provides them."""
    if "anchor_embedding" in batch:
        return batch["anchor_embedding"].float()
    return anchor.encode_image(batch["vision"])


# ------------------------------------------------------------------------- the task


def loop_settings(cfg: TrainConfig, run_dir: Path, quiet: bool) -> LoopSettings:
    return LoopSettings(
        seed=cfg.seed,
        epochs=cfg.optim.epochs,
        max_steps=cfg.optim.max_steps,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        warmup_epochs=cfg.optim.warmup_epochs,
        grad_clip=cfg.optim.grad_clip,
        batch_size=cfg.data.batch_size * cfg.optim.grad_accum,  # split into micro-batches
        num_workers=cfg.data.num_workers,
        threads=cfg.threads,
        mixed_precision=cfg.mixed_precision,
        tracker=cfg.tracker,
        hparams=_flat_hparams(cfg) if cfg.tracker else {},
        run_dir=run_dir,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        log_every=cfg.log_every,
        eval_every_epochs=cfg.eval.every_epochs,
        desc=f"align {cfg.modality}",
        quiet=quiet,
    )


class AlignmentTask(Task):
    """The encoder of ``cfg.modality`` against the frozen anchor, on ``cfg.data.dataset``."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, quiet: bool = False):
        self.cfg, self.run_dir = cfg, run_dir
        self.settings = loop_settings(cfg, run_dir, quiet)
        self.spec = get_modality(cfg.modality)

    def build(self, accelerator: Accelerator) -> TaskParts:
        cfg, spec = self.cfg, self.spec
        self.anchor = Anchor(cfg.anchor, device=accelerator.device)
        architecture = init_architecture(cfg, self.anchor)  # refused before any data is read
        self.bundle: DatasetBundle = get_dataset_builder(cfg.data.dataset)(cfg, self.anchor, spec)
        if cfg.anchor.cache:
            # Batches then carry "anchor_embedding" (no "vision"): no images, no anchor forward.
            self.bundle.train = attach_anchor_cache(
                self.bundle.train, cfg.anchor.cache, self.anchor, cfg.data.dataset
            )
        step_batch = cfg.data.batch_size * cfg.optim.grad_accum * accelerator.num_processes
        if len(self.bundle.train) < step_batch:
            raise ConfigError(
                self.batch_too_large(accelerator.num_processes, len(self.bundle.train))
            )
        # Only now, with the data open and a step's batch in it, does the run folder appear.
        saved = self.run_dir / "config.yaml"
        if saved.is_file():  # resumed: a new run never reuses a folder
            check_resumed_config(cfg, saved)
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, saved)
        self.temperature = cfg.encoder.temperature or spec.temperature
        encoder = build_encoder(
            cfg.modality,
            self.anchor.embed_dim,
            cfg.encoder.size,
            cfg.encoder.overrides,
            {**spec.preprocess, **cfg.data.preprocess},
            self.temperature,
            cfg.encoder.grad_checkpointing,
            architecture=architecture,
            patch_dropout=cfg.encoder.patch_dropout,
        )
        setup_encoder(encoder, cfg, self.anchor)
        model = AlignmentModule(encoder, loss_head(cfg))
        if cfg.encoder.compile:
            model = torch.compile(model)
        objective = AlignmentObjective(
            self.anchor,
            cfg.modality,
            self.temperature,
            cfg.optim.grad_accum,
            cfg.loss.local,
            cfg.loss.kind,
            device_feature_step(spec, cfg, accelerator),
        )
        groups = param_groups(model, cfg.optim.weight_decay)
        return TaskParts(model, groups, self.bundle.train, objective, collate)

    def batch_too_large(self, processes: int, samples: int) -> str:
        return (
            f"data.batch_size: {self.cfg.data.batch_size}x{self.cfg.optim.grad_accum} per "
            f"process x {processes} processes is larger than the {samples} training samples"
        )

    def encoder(self, run: Run) -> torch.nn.Module:
        encoder = run.accelerator.unwrap_model(run.model).encoder
        return getattr(encoder, "_orig_mod", encoder)

    def evaluate(self, run: Run) -> dict:
        if not run.accelerator.is_main_process:
            return {}
        cfg, templates = self.cfg, templates_for(self.cfg, self.bundle)
        device = run.accelerator.device
        return evaluate(
            self.encoder(run),
            self.anchor,
            self.bundle,
            cfg.modality,
            cfg.eval.batch_size,
            device,
            templates=templates,
        )

    def finish(self, run: Run) -> dict:
        """Save the model, evaluate it, write metrics.json; the metrics (main process only)."""
        skipped = sum_counters(run.accelerator, run.skipped)
        if not run.accelerator.is_main_process:
            return {}
        config = model_config(self.cfg, self.anchor, self.temperature)
        save_model(self.encoder(run), config, self.run_dir / "model")
        metrics = self.evaluate(run)
        metrics.update(self.summary(run, skipped))
        metrics.update(loss_scalars(run.accelerator.unwrap_model(run.model)))
        if self.cfg.tracker:
            log_scalars(run.accelerator, "eval", metrics, run.step)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        metrics["run_dir"] = str(self.run_dir)
        return metrics

    def summary(self, run: Run, skipped) -> dict:
        return dict(
            modality=self.cfg.modality,
            dataset=self.cfg.data.dataset,
            loss_kind=self.cfg.loss.kind,
            steps=run.step,
            epochs=run.step / run.steps_per_epoch,
            global_batch=run.global_batch,
            world_size=run.accelerator.num_processes,
            final_loss=run.loss,
            train_seconds=run.seconds,
            samples_per_second=run.trained_samples / run.seconds if run.trained_samples else 0.0,
            skipped=dict(skipped),
            skipped_total=sum(skipped.values()),
            **(run.threads.metrics() if run.threads else {}),
            **{f"data_{k}": v for k, v in self.bundle.info.items()},
        )


def train(cfg: TrainConfig, resume: str | bool | None = None, quiet: bool = False) -> dict:
    """Align ``cfg.modality``; returns the metrics (also in RUN/metrics.json) with ``run_dir``."""
    validate_config(cfg)
    run_dir, resume_from = resolve_run_dir(cfg, resume)
    if resume and resume_from is None and run_dir.exists():
        print(f"no complete checkpoint in {run_dir}; starting it from step 0")
    return fit(AlignmentTask(cfg, run_dir, quiet), resume_from)


# ------------------------------------------------------------------------- evaluation


def templates_for(cfg: TrainConfig, bundle: DatasetBundle):
    """The prompt templates of ``cfg.eval.templates`` (``default``: the dataset's own)."""
    if cfg.eval.templates == "default":
        return bundle.templates
    return prompts.get_templates(cfg.eval.templates)


@torch.no_grad()
def evaluate(
    encoder,
    anchor,
    bundle: DatasetBundle,
    modality: str,
    batch_size: int = 256,
    device="cpu",
    templates=None,
) -> dict:
    """Zero-shot top-1/top-5 against class prompts, or retrieval R@K for unlabelled data."""
    if bundle.eval is None:
        return {}
    was_training = encoder.training
    encoder.eval()
    emb, labels = embed_dataset(encoder, bundle.eval, modality, batch_size, device)
    encoder.train(was_training)
    if bundle.classnames:
        text = cached_class_text_embeddings(anchor, bundle.classnames, templates or ["{}"])
        result = zero_shot_classification(emb, labels, text.cpu())
        result.pop("predictions")
        hits = result.pop("hits")
        for k in (1, 5):
            result[f"zero_shot_top{k}_ci"] = bootstrap_ci(hits[f"top{k}"])
        result["num_eval"] = len(labels)
        result["num_classes"] = len(bundle.classnames)
        return {**result, "ci_method": ci_method()}
    images, _ = embed_dataset(anchor.encode_image, bundle.eval, "vision", batch_size, device)
    ranks = retrieval_ranks(emb @ images.T)
    out: dict = {"num_eval": len(labels), "ci_method": ci_method()}
    for k in (1, 5, 10):
        out[f"retrieval_r{k}"] = float((ranks <= k).float().mean())
        out[f"retrieval_r{k}_ci"] = bootstrap_ci(ranks <= k)
    return out


def _flat_hparams(cfg: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = str(value)

    walk("", config_to_dict(cfg))
    return flat
