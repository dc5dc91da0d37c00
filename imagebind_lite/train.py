"""The one training loop: align any registered modality to the frozen anchor with Accelerate.

Read top to bottom: build (config -> anchor -> data -> encoder -> optimizer), then the step
(anchor embeddings without gradients, encoder embeddings with, InfoNCE over the global batch),
then evaluation and the run folder (config.yaml, checkpoints/, logs/, model/, metrics.json).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .anchor import Anchor, validate_anchor_config
from .cache import attach_anchor_cache, cached_class_text_embeddings
from .checkpoint import atomic_dir, save_model
from .config import ConfigError, TrainConfig, config_to_dict, save_config
from .data.datasets import DatasetBundle, collate, get_dataset_builder
from .evaluation import prompts
from .evaluation.zero_shot import embed_dataset, retrieval_metrics, zero_shot_classification
from .loss import info_nce
from .models.build import build_encoder, resolve_size
from .registry import get_modality, import_modality_file

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


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
    if cfg.data.root is not None and not Path(cfg.data.root).exists():
        raise ConfigError(f"data.root: folder not found: {cfg.data.root}")
    validate_anchor_config(cfg.anchor)


def resolve_run_dir(cfg: TrainConfig, resume: str | bool | None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from). A new run never overwrites an old one."""
    base = Path(cfg.output_dir) / (cfg.run_name or f"{cfg.modality}-{cfg.data.dataset}")
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


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    steps = [
        (int(m.group(1)), p)
        for p in folder.glob("step_*")
        if (m := CHECKPOINT_RE.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def model_config(cfg: TrainConfig, anchor: Anchor, temperature: float) -> dict:
    return {
        "modality": cfg.modality,
        "modality_file": cfg.modality_file,
        "size": cfg.encoder.size,
        "overrides": cfg.encoder.overrides,
        "preprocess": {**get_modality(cfg.modality).preprocess, **cfg.data.preprocess},
        "temperature": temperature,
        "embed_dim": anchor.embed_dim,
        "anchor": {**anchor.identity(), "config": config_to_dict(cfg.anchor)},
    }


class AlignmentModule(torch.nn.Module):
    """What Accelerate wraps: the trainable encoder only (the frozen anchor stays outside)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def train(cfg: TrainConfig, resume: str | bool | None = None, quiet: bool = False) -> dict:
    validate_config(cfg)
    run_dir, resume_from = resolve_run_dir(cfg, resume)
    if resume and resume_from is None:
        print(f"no complete checkpoint in {run_dir}; starting it from step 0")

    accelerator = Accelerator(
        # Without this a CPU-only multi-process launch trains each rank alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        log_with=cfg.tracker,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed, device_specific=False)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    spec = get_modality(cfg.modality)
    anchor = Anchor(cfg.anchor, device=accelerator.device)
    bundle: DatasetBundle = get_dataset_builder(cfg.data.dataset)(cfg, anchor, spec)
    if cfg.anchor.cache:
        # Batches then carry "anchor_embedding" (no "vision"): no images, no anchor forward.
        bundle.train = attach_anchor_cache(bundle.train, cfg.anchor.cache, anchor, cfg.data.dataset)
    temperature = cfg.encoder.temperature or spec.temperature
    encoder = build_encoder(
        cfg.modality,
        anchor.embed_dim,
        cfg.encoder.size,
        cfg.encoder.overrides,
        {**spec.preprocess, **cfg.data.preprocess},
        temperature,
        cfg.encoder.grad_checkpointing,
    )
    model = AlignmentModule(encoder)
    if cfg.encoder.compile:
        model = torch.compile(model)

    accum = cfg.optim.grad_accum
    loader = DataLoader(
        bundle.train,
        batch_size=cfg.data.batch_size * accum,  # one optimizer step; split into micro-batches
        shuffle=True,
        drop_last=True,  # equal batches on every rank: the global InfoNCE needs them
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        # Workers are re-forked each epoch so they see the dataset's set_epoch (per-sample
        # randomness is seeded by epoch); persistent workers would keep epoch 0 forever.
        persistent_workers=False,
    )
    if len(loader) // accelerator.num_processes == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size}x{accum} per process x "
            f"{accelerator.num_processes} processes is larger than the {len(bundle.train)} "
            "training samples"
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    scheduler = cosine_with_warmup(
        optimizer, int(cfg.optim.warmup_epochs * steps_per_epoch), total_steps
    )
    accelerator.register_for_checkpointing(scheduler)

    step, skipped = 0, Counter()
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "state.json").read_text())
        step, skipped = state["step"], Counter(state.get("skipped", {}))
        accelerator.print(f"resumed {run_dir} from step {step}")
    if cfg.tracker:
        accelerator.init_trackers("train", config=_flat_hparams(cfg))

    global_batch = cfg.data.batch_size * accum * accelerator.num_processes
    bar = tqdm(
        total=total_steps, initial=step, disable=not main or quiet, desc=f"align {cfg.modality}"
    )
    start, trained_samples, loss_value = time.perf_counter(), 0, float("nan")
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        if hasattr(bundle.train, "set_epoch"):
            bundle.train.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, offset) if offset else loader
        for batch in batches:
            loss_value = train_step(
                model,
                anchor,
                batch,
                cfg.modality,
                temperature,
                accum,
                accelerator,
                optimizer,
                cfg.optim.grad_clip,
            )
            scheduler.step()
            step += 1
            trained_samples += global_batch
            skipped.update(batch["skipped"])
            rate = trained_samples / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", samples_per_s=f"{rate:.0f}")
            if step % cfg.log_every == 0 and cfg.tracker:
                accelerator.log(
                    {
                        "train/loss": loss_value,
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/samples_per_second": rate,
                        "train/epoch": epoch,
                    },
                    step=step,
                )
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                save_checkpoint(accelerator, run_dir, step, skipped, cfg.keep_checkpoints)
            if step >= total_steps:
                break
    bar.close()
    train_seconds = time.perf_counter() - start

    metrics = {}
    skipped_all = _sum_counters(accelerator, skipped)
    if main:
        encoder = accelerator.unwrap_model(model).encoder
        if hasattr(encoder, "_orig_mod"):
            encoder = encoder._orig_mod
        save_model(encoder, model_config(cfg, anchor, temperature), run_dir / "model")
        metrics = evaluate(
            encoder,
            anchor,
            bundle,
            cfg.modality,
            cfg.eval.batch_size,
            accelerator.device,
            templates=_templates(cfg, bundle),
        )
        metrics.update(
            modality=cfg.modality,
            dataset=cfg.data.dataset,
            steps=step,
            epochs=step / steps_per_epoch,
            global_batch=global_batch,
            world_size=accelerator.num_processes,
            final_loss=loss_value,
            train_seconds=train_seconds,
            samples_per_second=trained_samples / train_seconds if trained_samples else 0.0,
            skipped=dict(skipped_all),
            skipped_total=sum(skipped_all.values()),
            **{f"data_{k}": v for k, v in bundle.info.items()},
        )
        if cfg.tracker:
            accelerator.log(
                {
                    f"eval/{k}": v
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                },
                step=step,
            )
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        metrics["run_dir"] = str(run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def train_step(
    model, anchor, batch, modality, temperature, accum, accelerator, optimizer, grad_clip
):
    """One optimizer step over ``accum`` micro-batches with the negatives of all of them.

    With accumulation, the embeddings of every micro-batch are first computed without gradients;
    then each micro-batch is re-encoded with gradients and the loss is taken against all the
    others (open_clip's ``--accum-freq`` scheme), so the contrastive batch is the full effective
    batch and the summed gradients equal those of one big batch.
    """
    inputs = batch[modality]
    with torch.no_grad():
        anchor_emb = anchor_embeddings(anchor, batch)
    if accum == 1:
        with accelerator.autocast():
            loss = info_nce(model(inputs), anchor_emb, temperature)
        accelerator.backward(loss)
    else:
        chunks = inputs.chunk(accum)
        with torch.no_grad(), accelerator.autocast():
            cached = [model(c).float() for c in chunks]
        for i, chunk in enumerate(chunks):
            # Gradients are synchronised once, on the last micro-batch.
            ctx = accelerator.no_sync(model) if i < accum - 1 else nullcontext()
            with ctx, accelerator.autocast():
                emb = torch.cat(cached[:i] + [model(chunk).float()] + cached[i + 1 :])
                loss = info_nce(emb, anchor_emb, temperature)
                accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def anchor_embeddings(anchor: Anchor, batch: dict) -> torch.Tensor:
    """The anchor side of a batch: cached embeddings when the dataset provides them."""
    if "anchor_embedding" in batch:
        return batch["anchor_embedding"].float()
    return anchor.encode_image(batch["vision"])


def save_checkpoint(accelerator, run_dir: Path, step: int, skipped: Counter, keep: int) -> None:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    tmp = folder.with_name(folder.name + ".tmp")
    # Every process writes its own RNG state into the same folder; the main one finalises it.
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step, "skipped": dict(skipped)}))
        with atomic_dir(folder) as final_tmp:
            final_tmp.rmdir()
            os.replace(tmp, final_tmp)
        done = sorted(p for p in folder.parent.glob("step_*") if CHECKPOINT_RE.match(p.name))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _sum_counters(accelerator, counter: Counter) -> Counter:
    if accelerator.num_processes == 1:
        return counter
    total = Counter()
    for part in gather_object([dict(counter)]):
        total.update(part)
    return total


def _templates(cfg: TrainConfig, bundle: DatasetBundle):
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
        result["num_eval"] = len(labels)
        result["num_classes"] = len(bundle.classnames)
        return result
    images, _ = embed_dataset(anchor.encode_image, bundle.eval, "vision", batch_size, device)
    r = retrieval_metrics(emb @ images.T)
    return {
        "retrieval_r1": r["R@1"],
        "retrieval_r5": r["R@5"],
        "retrieval_r10": r["R@10"],
        "num_eval": len(labels),
    }


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
