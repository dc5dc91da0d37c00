"""The supervised ceiling of an alignment config (``eval/ceiling.py``).

The same encoder (size, data, augmentation, optimizer, steps) is trained on the class labels
with cross-entropy instead of against the anchor, and scored on the same held-out split. The
classifier is cosine, with the modality's temperature: ``normalize(emb) @ normalize(W).T / t``,
the zero-shot classifier's form with learned class vectors in place of the prompt embeddings.
An aligned run's zero-shot top-1 beside this figure says how much of what the encoder can learn
from the data the route through the anchor recovers (``emergence_gap``).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .checkpoint import load_run
from .config import ConfigError, TrainConfig
from .evaluation.metrics import topk_accuracy
from .evaluation.zero_shot import embed_dataset
from .registry import get_modality
from .train import AlignmentTask, evaluate, resolve_run_dir, templates_for, validate_config
from .training.loop import (
    Objective,
    Run,
    StepContext,
    TaskParts,
    fit,
    param_groups,
    sum_counters,
)


class CosineClassifier(torch.nn.Module):
    """The encoder, then cosine similarity to one learned vector per class over a temperature."""

    def __init__(self, encoder: torch.nn.Module, num_classes: int, dim: int, temperature: float):
        super().__init__()
        self.encoder, self.temperature = encoder, temperature
        self.classes = torch.nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(emb.float(), dim=-1)
        return emb @ F.normalize(self.classes, dim=-1).T / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x))


@dataclass
class SupervisedObjective(Objective):
    """Cross-entropy on the labels, over ``accum`` micro-batches (per-sample: plain splitting)."""

    modality: str
    accum: int = 1

    def backward(self, ctx: StepContext, batch: dict) -> float:
        accelerator, model = ctx.accelerator, ctx.model
        chunks = list(zip(batch[self.modality].chunk(self.accum), batch["label"].chunk(self.accum)))
        total = 0.0
        for i, (inputs, labels) in enumerate(chunks):
            sync = accelerator.no_sync(model) if i < len(chunks) - 1 else nullcontext()
            with sync, accelerator.autocast():
                loss = F.cross_entropy(model(inputs), labels) / len(chunks)
                accelerator.backward(loss)
            total += float(loss.detach())
        return total


class SupervisedTask(AlignmentTask):
    """Alignment's build (data, augmentation, encoder), trained on labels instead."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, quiet: bool = False):
        super().__init__(cfg, run_dir, quiet)
        self.settings.desc = f"ceiling {cfg.modality}"

    def build(self, accelerator: Accelerator) -> TaskParts:
        if self.cfg.anchor.cache:
            raise ConfigError("anchor.cache: the supervised ceiling uses no anchor; drop it")
        parts = super().build(accelerator)
        if not self.bundle.classnames or self.bundle.eval is None:
            raise ConfigError(
                f"data.dataset: {self.cfg.data.dataset} has no labelled held-out set, so it "
                "has no supervised ceiling"
            )
        encoder = getattr(parts.model, "_orig_mod", parts.model).encoder
        n, dim = len(self.bundle.classnames), self.anchor.embed_dim
        model = CosineClassifier(encoder, n, dim, self.temperature)
        objective = SupervisedObjective(self.cfg.modality, self.cfg.optim.grad_accum)
        groups = param_groups(model, self.cfg.optim.weight_decay)
        return TaskParts(model, groups, parts.train_set, objective, parts.collate_fn)

    def classifier(self, run: Run) -> CosineClassifier:
        return run.accelerator.unwrap_model(run.model)

    def encoder(self, run: Run) -> torch.nn.Module:
        return self.classifier(run).encoder

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict:
        if not run.accelerator.is_main_process:
            return {}
        model, device = self.classifier(run), run.accelerator.device
        was = model.training
        model.eval()
        emb, labels = embed_dataset(
            model.encoder, self.bundle.eval, self.cfg.modality, self.cfg.eval.batch_size, device
        )
        model.train(was)
        acc = topk_accuracy(model.logits(emb.to(device)).cpu(), labels, (1, 5))
        return {
            "supervised_top1": acc["top1"],
            "supervised_top5": acc["top5"],
            "num_eval": len(labels),
        }

    def finish(self, run: Run) -> dict:
        """Evaluate and write metrics.json (no model folder: the ceiling is a figure)."""
        skipped = sum_counters(run.accelerator, run.skipped)
        if not run.accelerator.is_main_process:
            return {}
        metrics = {**self.evaluate(run), **self.summary(run, skipped)}
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        metrics["run_dir"] = str(self.run_dir)
        return metrics


def ceiling(cfg: TrainConfig, checkpoint: str | None = None, trust_code: bool = False) -> dict:
    """Train and score the supervised ceiling of ``cfg``; with ``checkpoint`` (an aligned run
    of the same config) also that run's zero-shot top-1 on the same split and the gap."""
    if cfg.run_name is None:
        cfg = replace(cfg, run_name=f"ceiling-{cfg.modality}-{cfg.data.dataset}")
    validate_config(cfg)
    if checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint: run not found: {checkpoint}")
    if checkpoint is not None:  # refused before training, not after
        encoder, anchor, config = load_run(checkpoint, trust_code=trust_code)
        check_same_input(checkpoint, config, cfg)
    run_dir, _ = resolve_run_dir(cfg, None)
    task = SupervisedTask(cfg, run_dir)
    metrics = fit(task, None)
    if checkpoint is None or not metrics:
        return metrics
    templates = templates_for(cfg, task.bundle)
    batch = cfg.eval.batch_size
    found = evaluate(encoder, anchor, task.bundle, cfg.modality, batch, "cpu", templates)
    metrics["emergent_top1"] = found["zero_shot_top1"]
    metrics["emergence_gap"] = metrics["supervised_top1"] - found["zero_shot_top1"]
    metrics["checkpoint"] = str(checkpoint)
    return metrics


def check_same_input(checkpoint: str, config: dict, cfg: TrainConfig) -> None:
    """The run must read the held-out clips as this config does, or the two figures differ in
    more than the training signal."""
    if config["modality"] != cfg.modality:
        raise ValueError(f"{checkpoint}: a {config['modality']} run, not {cfg.modality}")
    wanted = {**get_modality(cfg.modality).preprocess, **cfg.data.preprocess}
    if config.get("preprocess") != wanted:
        raise ValueError(
            f"{checkpoint}: trained with other preprocessing than the config "
            f"({config.get('preprocess')} vs {wanted}); pass the run's own config"
        )
