"""Binding: several modalities trained against the frozen anchor in one run, one space.

A task on the shared loop (``imagebind_lite/training/loop.py``), the way ImageBind trains: each
step takes ONE modality's pairs with the anchor (drawn from (seed, step) by the configured
weights, or round-robin, so every process picks the same modality and a resume is exact), with
that modality's own batch size, augmentation, encoder, temperature, loss (``loss.kind``: InfoNCE
or SigLIP, whose scale and bias are the modality's own) and learning rate; one AdamW over all
the encoders; the loss over that modality's global batch across processes.

It reuses alignment's pieces (``imagebind_lite/train.py``): each modality is a TrainConfig
(its shipped config under the bind config's entry), checked by ``validate_config``, its data
built by the registered dataset builder, its step taken by ``AlignmentObjective``, its zero-shot
score by ``evaluate``, its saved config by ``model_config``. What is new: ``StepBatches``, the
batch-level dataset whose item ``i`` is step ``i``'s batch on this process (the loop's
``TaskParts.step_batches``), the emergent evaluation (retrieval between two non-anchor
modalities that never met, both held out) and the bound folder ``RUN/model/``
(``BoundModel.save_pretrained``) that embeds every modality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from .anchor import Anchor, validate_anchor_config
from .bound import BoundModel
from .config import (
    BindConfig,
    ConfigError,
    TrainConfig,
    check_resumed_config,
    config_to_dict,
    load_config,
    resolve_config_arg,
    save_config,
    shipped_config,
)
from .data.datasets import DatasetBundle, collate, dataset_modalities, get_dataset_builder
from .evaluation.metrics import class_retrieval
from .evaluation.zero_shot import embed_dataset
from .models.anchor_init import init_architecture, setup_encoder
from .models.build import build_encoder
from .registry import get_modality
from .train import (
    AlignmentModule,
    AlignmentObjective,
    evaluate,
    loss_head,
    loss_scalars,
    model_config,
    resolve_run_folder,
    templates_for,
    validate_config,
)
from .training.loop import (
    LoopSettings,
    Objective,
    Run,
    StepContext,
    Task,
    TaskParts,
    fit,
    log_scalars,
    param_groups,
    sum_counters,
)

ENTRY_KEYS = ("config", "weight")  # a modality entry's own fields; the rest is its TrainConfig


# ------------------------------------------------------------------------- config


def modality_config(bind: BindConfig, name: str, entry: dict) -> TrainConfig:
    """The TrainConfig of one bound modality: its config file (default: the shipped
    ``<name>.yaml`` where there is one), the entry's fields, then what the run shares."""
    if not isinstance(entry, dict):
        raise ConfigError(f"modalities.{name}: expected a mapping of fields, got {entry!r}")
    base = entry.get("config")
    if base is None:
        try:
            base = str(shipped_config(name))
        except ConfigError:
            base = None
    path = resolve_config_arg(base, None) if base else None
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    shared = {
        "modality": name,
        "anchor": config_to_dict(bind.anchor),
        "seed": bind.seed,
        "output_dir": bind.output_dir,
        "tracker": None,
        "mixed_precision": bind.mixed_precision,
    }
    try:
        return load_config(path, extra={**fields, **shared})
    except ConfigError as err:
        raise ConfigError(f"modalities.{name}: {err}") from None


def validate_bind(bind: BindConfig) -> dict[str, TrainConfig]:
    """Every check that needs no data; the TrainConfig of each modality. Raises ConfigError."""
    if not bind.modalities:
        raise ConfigError("modalities: name at least one modality to bind, e.g. audio: {}")
    if bind.sampling not in ("random", "round_robin"):
        raise ConfigError(f"sampling: expected random or round_robin, got {bind.sampling!r}")
    if bind.threads is not None and bind.threads < 1:
        raise ConfigError(f"threads: must be at least 1 (or null: automatic), got {bind.threads}")
    validate_anchor_config(bind.anchor)
    cfgs = {}
    for name, entry in bind.modalities.items():
        cfg = modality_config(bind, name, entry or {})
        try:
            validate_config(cfg)
        except ConfigError as err:
            raise ConfigError(f"modalities.{name}: {err}") from None
        allowed = dataset_modalities(cfg.data.dataset)
        if allowed is not None and name not in allowed:
            raise ConfigError(
                f"modalities.{name}: no dataset: {cfg.data.dataset!r} pairs images with "
                f"{', '.join(allowed)}; set modalities.{name}.data.dataset"
            )
        if cfg.optim.grad_accum != 1:
            raise ConfigError(f"modalities.{name}.optim.grad_accum: a bind run takes 1")
        weight = (entry or {}).get("weight")
        if weight is not None and (not isinstance(weight, (int, float)) or weight <= 0):
            raise ConfigError(f"modalities.{name}.weight: expected a positive number")
        cfgs[name] = cfg
    for pair in emergent_pairs(bind, list(cfgs)):
        if len(pair) != 2 or not set(pair) <= set(cfgs) or pair[0] == pair[1]:
            raise ConfigError(f"emergent: {pair!r} is not two of the bound modalities")
    return cfgs


def emergent_pairs(bind: BindConfig, names: list[str]) -> list[list[str]]:
    if bind.emergent:
        return [list(p) if isinstance(p, (list, tuple)) else [p] for p in bind.emergent]
    return [list(p) for p in itertools.combinations(names, 2)]


# ------------------------------------------------------------------------- the step schedule


def _unit(seed: int, *keys) -> float:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def schedule(weights: list[float], steps: int, seed: int, sampling: str) -> list[int]:
    """The modality (index) of every step: a weighted draw from (seed, step), or the smooth
    weighted round-robin (each step the modality furthest behind its share)."""
    total = sum(weights)
    if sampling == "round_robin":
        credit, out = [0.0] * len(weights), []
        for _ in range(steps):
            credit = [c + w for c, w in zip(credit, weights)]
            pick = max(range(len(weights)), key=lambda i: credit[i])
            credit[pick] -= total
            out.append(pick)
        return out
    bounds = list(itertools.accumulate(w / total for w in weights))
    return [
        next((i for i, b in enumerate(bounds) if _unit(seed, "bind", s) < b), len(bounds) - 1)
        for s in range(steps)
    ]


class StepBatches(Dataset):
    """Item ``i``: step ``i``'s batch on this process. The step's modality comes from the
    schedule; its k-th batch is rows ``k`` of that modality's permutation for its own epoch
    ``k // batches_per_epoch`` (seeded by (seed, modality, epoch)), this process's slice of the
    modality's global batch. The sets' per-sample randomness is seeded by that epoch."""

    def __init__(self, sets: dict, batch_sizes: dict, order: list[int], seed, rank, world):
        self.names, self.sets, self.order = list(sets), sets, order
        self.batch_sizes, self.seed, self.rank, self.world = batch_sizes, seed, rank, world
        seen = dict.fromkeys(range(len(self.names)), 0)
        self.nth = []
        for m in order:
            self.nth.append(seen[m])
            seen[m] += 1

    def __len__(self) -> int:
        return len(self.order)

    def batches_per_epoch(self, name: str) -> int:
        return len(self.sets[name]) // (self.batch_sizes[name] * self.world)

    def __getitem__(self, step: int) -> dict:
        name = self.names[self.order[step]]
        data, size = self.sets[name], self.batch_sizes[name]
        epoch, j = divmod(self.nth[step], self.batches_per_epoch(name))
        digest = hashlib.sha256(repr((self.seed, name, epoch)).encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        perm = torch.randperm(len(data), generator=generator)
        start = j * size * self.world + self.rank * size
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        batch = collate([data[int(i)] for i in perm[start : start + size]])
        batch["modality"] = name
        return batch


# ------------------------------------------------------------------------- model, objective


class BindModule(torch.nn.Module):
    """What Accelerate wraps: one ``AlignmentModule`` per modality (its encoder and its loss
    head, if its loss has one); ``forward(x, modality, ...)`` is that modality's forward."""

    def __init__(self, encoders: dict[str, torch.nn.Module], heads: dict | None = None):
        super().__init__()
        heads = heads or {}
        self.encoders = torch.nn.ModuleDict(
            {name: AlignmentModule(e, heads.get(name)) for name, e in encoders.items()}
        )

    def forward(self, x: torch.Tensor, modality: str, **kwargs) -> torch.Tensor:
        return self.encoders[modality](x, **kwargs)


@dataclasses.dataclass
class BindObjective(Objective):
    """The step's modality's ``AlignmentObjective``; records its loss, samples and seconds."""

    objectives: dict[str, AlignmentObjective]
    global_batch: dict[str, int]

    def __post_init__(self):
        self.losses = {m: [] for m in self.objectives}
        self.samples = dict.fromkeys(self.objectives, 0)
        self.seconds = dict.fromkeys(self.objectives, 0.0)
        self.current, self.last_end = None, None

    def backward(self, ctx: StepContext, batch: dict) -> float:
        m = batch["modality"]
        self.current, start = m, time.perf_counter()
        if self.last_end is None:
            self.last_end = start
        routed = dataclasses.replace(ctx, model=partial(ctx.model, modality=m))
        loss = self.objectives[m].backward(routed, batch)
        self.losses[m].append(loss)
        return loss

    def after_step(self, ctx: StepContext) -> None:
        # A step's time runs from the end of the previous one: its batch's loading included.
        now, m = time.perf_counter(), self.current
        self.seconds[m] += now - self.last_end
        self.samples[m] += self.global_batch[m]
        self.last_end = now

    def scalars(self) -> dict:
        return {f"loss.{m}": v[-1] for m, v in self.losses.items() if v}

    def step_samples(self, global_batch: int) -> int:
        return self.global_batch[self.current]

    def state(self) -> dict:
        # A resumed run's losses.json and per-modality throughput then cover every step.
        return {"losses": self.losses, "samples": self.samples, "seconds": self.seconds}

    def load_state(self, state: dict) -> None:
        for name in ("losses", "samples", "seconds"):
            getattr(self, name).update(state.get(name, {}))


# ------------------------------------------------------------------------- the task


class BindTask(Task):
    def __init__(self, bind: BindConfig, cfgs: dict[str, TrainConfig], run_dir: Path, quiet):
        self.bind, self.cfgs, self.run_dir = bind, cfgs, run_dir
        self.settings = LoopSettings(
            seed=bind.seed,
            epochs=1,  # one pass over the step schedule
            max_steps=bind.max_steps,
            betas=tuple(bind.betas),
            grad_clip=bind.grad_clip,
            num_workers=bind.num_workers,
            threads=bind.threads,
            mixed_precision=bind.mixed_precision,
            tracker=bind.tracker,
            hparams={"sampling": bind.sampling, "modalities": ",".join(cfgs)},
            run_dir=run_dir,
            checkpoint_every=bind.checkpoint_every,
            keep_checkpoints=bind.keep_checkpoints,
            log_every=bind.log_every,
            desc=f"bind {'+'.join(cfgs)}",
            quiet=quiet,
            find_unused_parameters=True,  # one encoder of several is used per step
        )

    def build(self, accelerator: Accelerator) -> TaskParts:
        bind, world = self.bind, accelerator.num_processes
        self.anchor = Anchor(bind.anchor, device=accelerator.device)
        self.bundles: dict[str, DatasetBundle] = {}
        for name, cfg in self.cfgs.items():
            self.bundles[name] = get_dataset_builder(cfg.data.dataset)(
                cfg, self.anchor, get_modality(name)
            )
        sizes = {m: cfg.data.batch_size for m, cfg in self.cfgs.items()}
        natural, warmup = self._natural_steps(sizes, world)
        weights = [bind.modalities[m].get("weight") or natural[m] for m in self.cfgs]
        steps = bind.steps or sum(natural.values())
        order = schedule(weights, steps, bind.seed, bind.sampling)
        sets = {m: b.train for m, b in self.bundles.items()}
        step_set = StepBatches(sets, sizes, order, bind.seed, accelerator.process_index, world)
        self.settings.warmup_epochs = (bind.warmup_steps or warmup) / steps
        saved = self.run_dir / "config.yaml"
        if saved.is_file():  # resumed: a new run never reuses a folder
            check_resumed_config(bind, saved)
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(bind, saved)
        return self._parts(step_set, {m: s * world for m, s in sizes.items()})

    def _natural_steps(self, sizes: dict, world: int) -> tuple[dict, float]:
        natural, warmup = {}, 0.0
        for m, cfg in self.cfgs.items():
            per_epoch = len(self.bundles[m].train) // (sizes[m] * world)
            if per_epoch == 0:
                raise ConfigError(
                    f"modalities.{m}.data.batch_size: {sizes[m]} per process x {world} "
                    f"processes is larger than the {len(self.bundles[m].train)} training samples"
                )
            natural[m] = per_epoch * cfg.optim.epochs
            warmup += per_epoch * cfg.optim.warmup_epochs
        return natural, warmup

    def _parts(self, step_set: StepBatches, global_batch: dict) -> TaskParts:
        encoders, objectives, groups = {}, {}, []
        self.temperatures = {}
        for m, cfg in self.cfgs.items():
            spec = get_modality(m)
            self.temperatures[m] = cfg.encoder.temperature or spec.temperature
            encoders[m] = build_encoder(
                m,
                self.anchor.embed_dim,
                cfg.encoder.size,
                cfg.encoder.overrides,
                {**spec.preprocess, **cfg.data.preprocess},
                self.temperatures[m],
                cfg.encoder.grad_checkpointing,
                architecture=init_architecture(cfg, self.anchor),
                patch_dropout=cfg.encoder.patch_dropout,
            )
            setup_encoder(encoders[m], cfg, self.anchor)
            objectives[m] = AlignmentObjective(
                self.anchor, m, self.temperatures[m], 1, cfg.loss.local, cfg.loss.kind
            )
        model = BindModule(encoders, {m: loss_head(cfg) for m, cfg in self.cfgs.items()})
        for m, cfg in self.cfgs.items():
            # Each encoder its own learning rate and weight decay, in one AdamW.
            for group in param_groups(model.encoders[m], cfg.optim.weight_decay):
                groups.append({**group, "lr": cfg.optim.lr})
        objective = BindObjective(objectives, global_batch)
        return TaskParts(model, groups, step_set, objective, step_batches=True)

    def encoders(self, run: Run) -> dict[str, torch.nn.Module]:
        module = run.accelerator.unwrap_model(run.model)
        return {m: module.encoders[m].encoder for m in self.cfgs}

    def evaluate(self, run: Run) -> dict:
        if not run.accelerator.is_main_process:
            return {}
        return evaluate_space(
            self.encoders(run),
            self.anchor,
            self.bundles,
            self.cfgs,
            emergent_pairs(self.bind, list(self.cfgs)),
            self.bind.eval.batch_size,
            run.accelerator.device,
        )

    def finish(self, run: Run) -> dict:
        skipped = sum_counters(run.accelerator, run.skipped)
        if not run.accelerator.is_main_process:
            return {}
        configs = {
            m: {**model_config(cfg, self.anchor, self.temperatures[m]), "data": _data(cfg)}
            for m, cfg in self.cfgs.items()
        }
        bound = BoundModel(self.anchor, self.encoders(run), configs, run.accelerator.device)
        bound.save_pretrained(self.run_dir / "model")
        metrics = self.evaluate(run)
        metrics.update(self.summary(run, skipped))
        if self.bind.tracker:
            log_scalars(run.accelerator, "eval", metrics, run.step)
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        losses = run.ctx.objective.losses
        (self.run_dir / "losses.json").write_text(json.dumps(losses))
        metrics["run_dir"] = str(self.run_dir)
        return metrics

    def summary(self, run: Run, skipped) -> dict:
        objective: BindObjective = run.ctx.objective
        out = {
            "steps": run.step,
            "world_size": run.accelerator.num_processes,
            "train_seconds": run.seconds,
            "skipped_total": sum(skipped.values()),
            **(run.threads.metrics() if run.threads else {}),
        }
        for m in self.cfgs:
            out[f"steps.{m}"] = len(objective.losses[m])
            out[f"global_batch.{m}"] = objective.global_batch[m]
            seconds = objective.seconds[m]
            out[f"samples_per_second.{m}"] = objective.samples[m] / seconds if seconds else 0.0
            losses = objective.losses[m]
            out[f"final_loss.{m}"] = losses[-1] if losses else float("nan")
            out[f"loss_kind.{m}"] = self.cfgs[m].loss.kind
            module = run.accelerator.unwrap_model(run.model).encoders[m]
            out.update({f"{k}.{m}": v for k, v in loss_scalars(module).items()})
        return out


def _data(cfg: TrainConfig) -> dict:
    """What rebuilds the modality's held-out set (``heldout``): its data section and seed."""
    return {**config_to_dict(cfg.data), "seed": cfg.seed}


# ------------------------------------------------------------------------- evaluation


@torch.no_grad()
def emergent_retrieval(a: str, b: str, emb: dict, labels: dict) -> dict:
    """Top-1 same-class match and mAP between two modalities' embeddings, both directions."""
    out = {}
    for q, g in ((a, b), (b, a)):
        r = class_retrieval(emb[q], labels[q], emb[g], labels[g])
        out[f"emergent_top1.{q}->{g}"] = r["top1"]
        out[f"emergent_map.{q}->{g}"] = r["mAP"]
    return out


def evaluate_space(encoders, anchor, bundles, cfgs, pairs, batch_size, device) -> dict:
    """Each modality's zero-shot score on its held-out set (as ``zero_shot_top1.<m>``...), and
    emergent retrieval between each pair of held-out sets."""
    metrics, emb, labels = {}, {}, {}
    for m, encoder in encoders.items():
        templates = templates_for(cfgs[m], bundles[m])
        result = evaluate(encoder, anchor, bundles[m], m, batch_size, device, templates=templates)
        metrics.update({f"{k}.{m}": v for k, v in result.items()})
    for m in {x for pair in pairs for x in pair}:
        was = encoders[m].training
        encoders[m].eval()
        emb[m], labels[m] = embed_dataset(encoders[m], bundles[m].eval, m, batch_size, device)
        encoders[m].train(was)
    for a, b in pairs:
        found = emergent_retrieval(a, b, emb, labels)
        metrics.update(found)
        print(format_emergent(a, b, found))
    return metrics


def format_emergent(a: str, b: str, found: dict) -> str:
    return " ".join(
        f"{q}->{g}: top1 {found[f'emergent_top1.{q}->{g}']:.3f} "
        f"mAP {found[f'emergent_map.{q}->{g}']:.3f}"
        for q, g in ((a, b), (b, a))
    ).join(("emergent (held out on both sides) ", ""))


def heldout(space, modality: str) -> DatasetBundle:
    """The held-out data of ``modality`` of a bound model: rebuilt from the data section its
    config records (a bind run's, or a combined run's ``config.yaml``), else from the shipped
    ``<modality>.yaml``."""
    config = space.configs.get(modality, {})
    data = dict(config.get("data") or {})
    seed = data.pop("seed", 0)
    if not data:
        path = shipped_config(modality)
        data = config_to_dict(load_config(path).data)
    cfg = load_config(None, extra={"modality": modality, "seed": seed, "data": data})
    cfg.anchor.cache = None
    return get_dataset_builder(cfg.data.dataset)(cfg, space.anchor, get_modality(modality))


def pair_retrieval(space, a: str, b: str, batch_size: int = 256) -> dict:
    """Emergent retrieval between modalities ``a`` and ``b`` of a bound model, on their
    held-out sets (``heldout``)."""
    emb, labels = {}, {}
    for m in (a, b):
        space._require(m)
        bundle = heldout(space, m)
        if bundle.eval is None or not bundle.classnames:
            raise ValueError(f"{m}: its dataset has no labelled held-out set")
        emb[m], labels[m] = embed_dataset(
            space.encoder_fn(m), bundle.eval, m, batch_size, space.device
        )
    return emergent_retrieval(a, b, emb, labels)


# ------------------------------------------------------------------------- entry points


def bind(bind_cfg: BindConfig, resume: str | bool | None = None, quiet: bool = False) -> dict:
    """Train every modality of ``bind_cfg`` in one run; the metrics with ``run_dir``."""
    cfgs = validate_bind(bind_cfg)
    base = Path(bind_cfg.output_dir) / (bind_cfg.run_name or "-".join(["bind", *cfgs]))
    run_dir, resume_from = resolve_run_folder(base, resume)
    if resume and resume_from is None and run_dir.exists():
        print(f"no complete checkpoint in {run_dir}; starting it from step 0")
    return fit(BindTask(bind_cfg, cfgs, run_dir, quiet), resume_from)


def combine(runs: list[str], out: str | Path) -> Path:
    """Single-modality runs that share an anchor -> one bound folder (SpaceError otherwise)."""
    bound = BoundModel.from_runs(runs)
    for m, folder in bound.runs.items():
        saved = Path(folder) / "config.yaml"
        if saved.is_file():
            cfg = load_config(saved)
            bound.configs[m] = {**bound.configs[m], "data": _data(cfg)}
    return bound.save_pretrained(out)


__all__ = [
    "BindModule",
    "BindObjective",
    "BindTask",
    "StepBatches",
    "bind",
    "combine",
    "emergent_retrieval",
    "pair_retrieval",
    "schedule",
    "validate_bind",
]
