"""Domain fine-tuning of the CLIP anchor on image-caption pairs (``train/finetune_anchor.py``).

The anchor must already put a domain's images and its words close together before a new
modality can inherit zero-shot ability through it. No pretrained CLIP knows handwritten 8x8
digits, so the embedded default fits a small open_clip model on them (and on the synthetic scenes
used by the depth and thermal defaults). The result is frozen again and used as the anchor:
``anchor.pretrained=OUTPUT``.

Domains (``domains``, any number, trained together with one contrastive loss):

- ``digits``, ``scenes``: the built-in ones (UCI digit images, the synthetic scenes).
- a manifest of image-caption pairs, given as a path (``domains=[data/pairs.csv]``) or a mapping::

      domains:
        - name: xray                 # the key in the report (default: the manifest's stem)
          manifest: data/train.csv   # CSV header or JSONL keys: image (or vision), caption
          root: data                 # image paths are relative to it (default: manifest folder)
          eval_manifest: test.csv    # held-out pairs; or a ``split`` column (train / test)
          train_split: train         # split values, when rows carry a split
          eval_split: test
          classnames: [...]          # optional: with a ``label`` column, zero-shot classification
          templates: ["a photo of a {}."]
          augment: false             # small random affine warps of the training images

  Rows may carry several captions (``caption_1`` .. ``caption_N`` or a JSONL list); one is drawn
  per step. A row without a caption but with a label is captioned from the class templates.

``trainable``: ``full`` (every weight), ``last_n`` (the last ``last_n`` blocks of each tower,
the final norms, projections and temperature), or ``lora`` (rank-``lora_rank`` adapters on
``lora_targets`` in every block of both towers, ``imagebind_lite/lora.py``; nothing else moves).
LoRA adapters are merged into the weights before saving, so every output is a plain open_clip
state dict.

Evaluation, before and after, on each domain's held-out pairs: image -> text zero-shot top-1
over the class prompts when the classes are known, image -> caption retrieval R@1/R@5 when the
held-out pairs have captions (both when both). The report goes into ``OUTPUT.json`` and into the
checkpoint's metadata. The new weights have a new sha256, so ``Anchor.identity()`` changes and
anchor caches written for the old anchor are refused (``imagebind_lite/cache.py``).

Training is a task on the shared loop (``imagebind_lite/training/loop.py``: the Accelerator,
AdamW, the warm-up/cosine schedule and the epochs are alignment's); this module supplies the
domains, the trainable part of the model, the caption objective and the report.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .anchor import file_sha256, load_open_clip, validate_anchor_config
from .config import AnchorConfig, ConfigError
from .data import avmnist, scenes
from .data import bad_input as bi
from .data.manifest import image_to_tensor, read_manifest, split_records
from .evaluation.zero_shot import class_text_embeddings, retrieval_metrics, topk_accuracy
from .files import atomic_write
from .lora import DEFAULT_TARGETS, apply_lora, merge_lora
from .registry import DEFAULT_TEMPLATES
from .training.loop import LoopSettings, Objective, Run, StepContext, Task, TaskParts, fit

BUILTIN_DOMAINS = ("digits", "scenes")
TRAINABLE = ("full", "last_n", "lora")
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
MANIFEST_KEYS = (
    "name",
    "manifest",
    "root",
    "eval_manifest",
    "train_split",
    "eval_split",
    "classnames",
    "templates",
    "augment",
)
IMAGE_COLUMNS = ("image", "vision")


@dataclass
class FinetuneConfig:
    anchor: AnchorConfig = field(
        default_factory=lambda: AnchorConfig(
            pretrained=None, model_config="imagebind_lite:tiny-clip-32"
        )
    )
    # Built-in names (digits, scenes), manifest paths, or manifest mappings (module docstring).
    domains: list = field(default_factory=lambda: ["digits", "scenes"])
    trainable: str = "full"  # full, last_n or lora
    last_n: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    epochs: int = 30
    max_steps: int | None = None  # stop early (tests, smoke runs)
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0  # image loading workers (manifest domains read files)
    threads: int | None = None  # CPU threads for torch (TrainConfig.threads)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    output: str = "runs/anchor/tiny-clip-digits-scenes.safetensors"
    save_dtype: str = "fp16"  # the shipped file is half precision to stay small
    scene_train_size: int = 3000
    scene_test_size: int = 600
    scene_seed: int = 3  # not the seeds of the depth/thermal alignment scenes (1, 2)


@dataclass
class Domain:
    """Training images with a caption drawer, and held-out images with what they are scored
    against. Images are anything with ``len`` and ``[i] -> [3, S, S]`` pixels in [0, 1]."""

    name: str
    train_images: Any
    # (item index, generator) -> one caption of that training image.
    train_captions: Callable[[int, torch.Generator], str]
    eval_images: Any
    eval_labels: torch.Tensor | None = None  # classification when classnames are known
    classnames: list | None = None
    templates: list | None = None
    eval_captions: list | None = None  # per held-out image, its captions: retrieval
    augment: bool = False
    info: dict = field(default_factory=dict)


def class_captions(labels: torch.Tensor, classnames: list, templates: list) -> Callable:
    """A random template filled with the image's class name."""

    def caption(item: int, g: torch.Generator) -> str:
        template = templates[int(torch.randint(len(templates), (1,), generator=g))]
        return template.format(classnames[int(labels[item])])

    return caption


def load_builtin_domain(name: str, cfg: FinetuneConfig, image_size: int) -> Domain:
    if name == "digits":
        images, labels = avmnist.load_digit_images()
        train = avmnist.image_split(len(images))
        pixels = avmnist.digits_to_pixels(images, image_size)
        names, templates = avmnist.DIGIT_NAMES, avmnist.DIGIT_TEMPLATES
        return Domain(
            name,
            pixels[train],
            class_captions(labels[train], names, templates),
            pixels[~train],
            labels[~train],
            names,
            templates,
            augment=True,
        )
    if name == "scenes":
        tr = scenes.render_scenes(cfg.scene_train_size, image_size, seed=cfg.scene_seed)
        te = scenes.render_scenes(cfg.scene_test_size, image_size, seed=cfg.scene_seed + 100)
        names, templates = scenes.SHAPES, scenes.SHAPE_TEMPLATES
        return Domain(
            name,
            tr["rgb"],
            class_captions(tr["label"], names, templates),
            te["rgb"],
            te["label"],
            names,
            templates,
            augment=False,
        )
    raise ConfigError(
        f"domains: unknown domain {name!r} (built-in: {', '.join(BUILTIN_DOMAINS)}; or a "
        f"manifest path ending in {', '.join(MANIFEST_SUFFIXES)}, or a mapping with 'manifest')"
    )


# ------------------------------------------------------------------------- manifest domains


def square_pixels(image, size: int) -> torch.Tensor:
    """PIL image -> [3, size, size] in [0, 1]: shorter side resized to ``size`` (bicubic), then
    centre-cropped, as CLIP's evaluation transform does."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    width, height = (max(size, round(s * scale)) for s in image.size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image_to_tensor(image.crop((left, top, left + size, top + size)))


class ImageFiles:
    """Image files under a root, read and squared on access (never all held in memory)."""

    def __init__(self, root: Path, paths: list[Path], size: int):
        self.root, self.paths, self.size = Path(root), list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = bi.resolve_inside(self.root, self.paths[index])
        return square_pixels(bi.open_image(path), self.size)


def manifest_spec(entry) -> dict:
    """A ``domains`` entry that is not a built-in name -> a checked manifest mapping."""
    if isinstance(entry, str):
        if Path(entry).suffix.lower() not in MANIFEST_SUFFIXES:
            raise ConfigError(
                f"domains: {entry!r} is neither a built-in domain ({', '.join(BUILTIN_DOMAINS)}) "
                f"nor a manifest file ({', '.join(MANIFEST_SUFFIXES)})"
            )
        entry = {"manifest": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"domains: expected a name, a path or a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(MANIFEST_KEYS))
    if unknown:
        raise ConfigError(
            f"domains: unknown key {unknown[0]!r} in {entry!r}; known: {', '.join(MANIFEST_KEYS)}"
        )
    if not entry.get("manifest"):
        raise ConfigError(f"domains: {entry!r} has no 'manifest'")
    return dict(entry)


def _image_path(record, where: str) -> Path:
    for column in IMAGE_COLUMNS:
        if column in record.paths:
            return record.paths[column]
    raise ValueError(f"{where}: row {record.id} has no image (columns: {', '.join(IMAGE_COLUMNS)})")


def _check_files(root: Path, paths: list[Path], where: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(paths)} image files not found, e.g. {missing[0]}"
        )
    for path in paths:
        bi.resolve_inside(root, path)  # refuses ../ and links pointing out of the root


def load_manifest_domain(entry, image_size: int) -> Domain:
    spec = manifest_spec(entry)
    manifest = Path(spec["manifest"])
    root = Path(spec.get("root") or manifest.parent)
    name = spec.get("name") or manifest.stem
    records, classnames = read_manifest(manifest, root, spec.get("classnames"), IMAGE_COLUMNS)
    info = {"manifest": str(manifest), "root": str(root)}
    if spec.get("eval_manifest"):
        eval_path = Path(spec["eval_manifest"])
        if not eval_path.is_absolute() and not eval_path.exists():
            eval_path = manifest.parent / eval_path
        train_records = records
        eval_records, _ = read_manifest(eval_path, root, classnames, IMAGE_COLUMNS)
        info["eval_manifest"] = str(eval_path)
    else:
        if not any(r.split is not None for r in records):
            raise ValueError(
                f"{manifest}: no held-out pairs: give eval_manifest, or a split column "
                f"(train / test rows)"
            )
        options = {k: spec[k] for k in ("train_split", "eval_split") if k in spec}
        train_records, eval_records, rule = split_records(records, options)
        info.update(rule)
    if not train_records or not eval_records:
        raise ValueError(
            f"{manifest}: {len(train_records)} training and {len(eval_records)} held-out pairs; "
            "both must be non-empty"
        )
    templates = list(spec.get("templates") or DEFAULT_TEMPLATES)

    train_paths = [_image_path(r, str(manifest)) for r in train_records]
    eval_paths = [_image_path(r, str(manifest)) for r in eval_records]
    _check_files(root, train_paths, str(manifest))
    _check_files(root, eval_paths, str(info.get("eval_manifest", manifest)))

    for r in train_records:
        if not r.captions and not (classnames and isinstance(r.label, int)):
            raise ValueError(f"{manifest}: training row {r.id} has neither a caption nor a label")
    train_captions = [list(r.captions) for r in train_records]
    train_labels = [r.label if isinstance(r.label, int) else -1 for r in train_records]

    def caption(item: int, g: torch.Generator) -> str:
        options = train_captions[item]
        if options:
            return options[int(torch.randint(len(options), (1,), generator=g))]
        template = templates[int(torch.randint(len(templates), (1,), generator=g))]
        return template.format(classnames[train_labels[item]])

    labels = None
    if classnames and all(isinstance(r.label, int) for r in eval_records):
        labels = torch.tensor([r.label for r in eval_records])
    captions = None
    if all(r.captions for r in eval_records):
        captions = [list(r.captions) for r in eval_records]
    if labels is None and captions is None:
        raise ValueError(
            f"{manifest}: the held-out pairs can be scored neither by class (every row needs a "
            "label and the class names) nor by retrieval (every row needs a caption)"
        )
    info.update(train_pairs=len(train_records), eval_pairs=len(eval_records))
    return Domain(
        name,
        ImageFiles(root, train_paths, image_size),
        caption,
        ImageFiles(root, eval_paths, image_size),
        labels,
        classnames if labels is not None else None,
        templates,
        captions,
        augment=bool(spec.get("augment", False)),
        info=info,
    )


def load_domain(entry, cfg: FinetuneConfig, image_size: int) -> Domain:
    if isinstance(entry, str) and entry in BUILTIN_DOMAINS:
        return load_builtin_domain(entry, cfg, image_size)
    try:
        return load_manifest_domain(entry, image_size)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"domains: {err}") from None


class PairTable(Dataset):
    """``(pixels, domain index, item index)`` over the training images of every domain; the
    caption is drawn per step from the domain, so repeated epochs see different captions."""

    def __init__(self, domains: list[Domain]):
        self.domains = domains
        self.starts = [0]
        for d in domains:
            self.starts.append(self.starts[-1] + len(d.train_images))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int):
        d = bisect.bisect_right(self.starts, index) - 1
        item = index - self.starts[d]
        return self.domains[d].train_images[item], d, item


# ------------------------------------------------------------------------- training helpers


def random_affine(
    pixels: torch.Tensor, g: torch.Generator, degrees=10.0, scale=(0.9, 1.1), shift=0.08
) -> torch.Tensor:
    """Small per-image rotation, scale and shift (handwriting varies; labels do not)."""
    n = pixels.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, align_corners=False, padding_mode="zeros")


def set_trainable(
    model: torch.nn.Module,
    mode: str,
    last_n: int = 1,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_targets=DEFAULT_TARGETS,
) -> list[str]:
    """Choose what trains. Returns the names of the LoRA-adapted layers (empty otherwise)."""
    if mode == "full":
        model.requires_grad_(True)
        return []
    if mode == "lora":
        return apply_lora(model, lora_targets, lora_rank, lora_alpha)
    if mode != "last_n":
        raise ValueError(f"trainable: expected {', '.join(TRAINABLE)}, got {mode!r}")
    model.requires_grad_(False)
    towers = [model.visual.transformer.resblocks, model.transformer.resblocks]
    for blocks in towers:
        for block in list(blocks)[-last_n:]:
            block.requires_grad_(True)
    for module in (model.visual.ln_post, model.ln_final):
        module.requires_grad_(True)
    model.visual.proj.requires_grad_(True)
    model.text_projection.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    return []


@torch.no_grad()
def evaluate_domain(
    model, tokenizer, domain: Domain, normalize, device, batch_size: int = 256
) -> dict:
    """Image -> text on the held-out images: ``top1`` over class prompts, ``R@1``/``R@5`` over
    the held-out captions (an image's rank is that of its best caption)."""
    model.eval()
    images = domain.eval_images
    emb = []
    for start in range(0, len(images), batch_size):
        if isinstance(images, torch.Tensor):
            chunk = images[start : start + batch_size]
        else:
            stop = min(start + batch_size, len(images))
            chunk = torch.stack([images[i] for i in range(start, stop)])
        emb.append(F.normalize(model.encode_image(normalize(chunk.to(device))).float(), dim=-1))
    emb = torch.cat(emb)

    def encode_text(texts: list[str]) -> torch.Tensor:
        out = [
            model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float()
            for i in range(0, len(texts), batch_size)
        ]
        return F.normalize(torch.cat(out), dim=-1)

    result = {}
    if domain.eval_labels is not None:
        text = class_text_embeddings(encode_text, domain.classnames, domain.templates)
        result["top1"] = topk_accuracy(emb @ text.T, domain.eval_labels.to(device), (1,))["top1"]
    if domain.eval_captions:
        flat = [c for caps in domain.eval_captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(domain.eval_captions) for _ in caps])
        positives = owner[None, :].to(device) == torch.arange(len(emb), device=device)[:, None]
        r = retrieval_metrics(emb @ encode_text(flat).T, (1, 5), positives)
        result["R@1"], result["R@5"] = r["R@1"], r["R@5"]
    return result


def validate_finetune_config(cfg: FinetuneConfig) -> None:
    """What can be checked before building anything; raises ConfigError (one line)."""
    if cfg.trainable not in TRAINABLE:
        raise ConfigError(f"trainable: expected {', '.join(TRAINABLE)}, got {cfg.trainable!r}")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"save_dtype: expected {', '.join(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if not str(cfg.output).endswith(".safetensors"):
        raise ConfigError(f"output: must end in .safetensors, got {cfg.output}")
    for name in ("epochs", "batch_size", "eval_batch_size", "last_n", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(cfg, name)}")
    if not cfg.domains:
        raise ConfigError("domains: give at least one domain")
    names = []
    for entry in cfg.domains:
        if isinstance(entry, str) and entry in BUILTIN_DOMAINS:
            names.append(entry)
        else:
            spec = manifest_spec(entry)
            names.append(spec.get("name") or Path(spec["manifest"]).stem)
    if len(set(names)) != len(names):
        raise ConfigError(f"domains: names must be unique, got {names}")
    validate_anchor_config(cfg.anchor)


def _describe_base(cfg: FinetuneConfig, pretrained: str | None) -> dict:
    base = {"model": cfg.anchor.model, "pretrained": cfg.anchor.pretrained}
    if pretrained is not None and Path(pretrained).is_file():
        base["sha256"] = file_sha256(pretrained, 16)
    return base


# ------------------------------------------------------------------------- the task


def anchor_normalizer(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pixels in [0, 1] -> the input statistics ``Anchor`` normalises with later: the fine-tuned
    towers must see the same input."""
    import open_clip  # all of torchvision (~2 s): only when fine-tuning

    visual = model.visual
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def normalize(x):
        return (x - mean.to(x)) / std.to(x)

    return normalize


class CaptionObjective(Objective):
    """CLIP's contrastive loss on a batch of ``(pixels, domain, item)``: a caption is drawn per
    image and step, and the images of augmented domains get a small random affine warp, both
    from one generator seeded by ``seed``."""

    def __init__(self, domains, tokenizer, normalize, loss_fn, seed: int, device):
        self.domains, self.tokenizer, self.normalize = domains, tokenizer, normalize
        self.loss_fn, self.device = loss_fn, device
        self.generator = torch.Generator().manual_seed(seed)

    def backward(self, ctx: StepContext, batch) -> float:
        pixels, batch_domains, batch_items = batch
        g, domains = self.generator, self.domains
        captions = [
            domains[dom].train_captions(item, g)
            for dom, item in zip(batch_domains.tolist(), batch_items.tolist())
        ]
        augment = torch.tensor([domains[d].augment for d in batch_domains.tolist()])
        if augment.any():
            pixels = pixels.clone()
            pixels[augment] = random_affine(pixels[augment].cpu(), g).to(pixels)
        image_features, text_features, logit_scale = ctx.model(
            self.normalize(pixels), self.tokenizer(captions).to(self.device)
        )[:3]
        loss = self.loss_fn(image_features, text_features, logit_scale)
        ctx.accelerator.backward(loss)
        return loss.item()

    def after_step(self, ctx: StepContext) -> None:
        with torch.no_grad():  # CLIP's clamp keeps the learnable temperature sane
            ctx.accelerator.unwrap_model(ctx.model).logit_scale.clamp_(0, math.log(100))


class FinetuneTask(Task):
    """Both towers of the open_clip anchor on the image-caption pairs of ``cfg.domains``."""

    def __init__(self, cfg: FinetuneConfig, quiet: bool = False):
        self.cfg = cfg
        self.settings = LoopSettings(
            seed=cfg.seed,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            lr=cfg.lr,
            betas=(0.9, 0.98),
            warmup_epochs=cfg.warmup_epochs,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            threads=cfg.threads,
            desc="fine-tune anchor",
            quiet=quiet,
        )

    def build(self, accelerator: Accelerator) -> TaskParts:
        import open_clip  # all of torchvision (~2 s): only when fine-tuning

        cfg, device = self.cfg, accelerator.device
        self.model_name, self.pretrained = validate_anchor_config(cfg.anchor)
        model, _, _ = load_open_clip(self.model_name, self.pretrained, "cpu")
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.normalize = anchor_normalizer(model)
        self.domains = [load_domain(entry, cfg, size) for entry in cfg.domains]
        model.to(device)
        self.before = self.evaluate_domains(model, device)
        try:
            self.adapted = set_trainable(
                model, cfg.trainable, cfg.last_n, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets
            )
        except ValueError as err:
            raise ConfigError(f"lora_targets: {err}") from None
        model.to(device)  # new adapters are created on the base layer's device; this is a no-op
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        loss_fn = open_clip.ClipLoss(
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            gather_with_grad=True,
        )
        objective = CaptionObjective(
            self.domains, self.tokenizer, self.normalize, loss_fn, cfg.seed, device
        )
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
        return TaskParts(model, groups, PairTable(self.domains), objective)

    def batch_too_large(self, processes: int, samples: int) -> str:
        per = "" if processes == 1 else f" per process x {processes} processes"
        return f"batch_size: {self.cfg.batch_size}{per} is larger than the {samples} training pairs"

    def evaluate_domains(self, model, device) -> dict:
        return {
            d.name: evaluate_domain(
                model, self.tokenizer, d, self.normalize, device, self.cfg.eval_batch_size
            )
            for d in self.domains
        }

    def finish(self, run: Run) -> dict:
        """Fold LoRA into the weights, evaluate what is saved, write OUTPUT and OUTPUT.json."""
        model = run.accelerator.unwrap_model(run.model)
        # What is evaluated is what is saved: the adapters folded into plain open_clip weights.
        merge_lora(model)
        after = self.evaluate_domains(model, run.accelerator.device)
        result = self.report(run, model, after)
        if run.accelerator.is_main_process:
            self.save(model, result)
        return result

    def report(self, run: Run, model, after: dict) -> dict:
        cfg, before, domains = self.cfg, self.before, self.domains
        classified = [d.name for d in domains if "top1" in before[d.name]]
        result = {
            "image_to_text_before": before,
            "image_to_text_after": after,
            # The keys of the shipped anchor's report: top-1 of the domains with classes.
            "image_to_text_top1_before": {n: before[n]["top1"] for n in classified},
            "image_to_text_top1_after": {n: after[n]["top1"] for n in classified},
            "eval_sizes": {d.name: len(d.eval_images) for d in domains},
            "train_seconds": run.seconds,
            **(run.threads.metrics() if run.threads else {}),
            "steps": run.step,
            "final_loss": run.loss,
            "trainable": cfg.trainable,
            "trainable_parameters": self.trainable_params,
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "base": _describe_base(cfg, self.pretrained),
        }
        if any(d.info for d in domains):  # where each manifest domain came from, its sizes
            result["domains"] = {d.name: d.info for d in domains if d.info}
        if cfg.trainable == "last_n":
            result["last_n"] = cfg.last_n
        if cfg.trainable == "lora":
            result["lora"] = {
                "rank": cfg.lora_rank,
                "alpha": cfg.lora_alpha,
                "targets": list(cfg.lora_targets),
                "adapted_layers": len(self.adapted),
                "merged": True,
            }
        return result

    def save(self, model, result: dict) -> None:
        """The weights in ``save_dtype`` with the report as metadata, then ``OUTPUT.json``;
        adds ``output``, ``sha256`` and ``use_as_anchor`` to ``result``."""
        cfg, dtype = self.cfg, SAVE_DTYPES[self.cfg.save_dtype]
        state = {
            k: v.detach().to(dtype if v.is_floating_point() else v.dtype).cpu().contiguous()
            for k, v in model.state_dict().items()
        }
        out = Path(cfg.output)
        metadata = {"model": self.model_name, "finetune": json.dumps(result)}
        atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        result["output"] = str(out)
        result["sha256"] = file_sha256(out, 16)  # what Anchor.identity() will report
        result["use_as_anchor"] = (
            f"anchor.model={cfg.anchor.model} anchor.model_config={cfg.anchor.model_config} "
            f"anchor.pretrained={out}"
        )
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))


def finetune_anchor(cfg: FinetuneConfig, quiet: bool = False) -> dict:
    """Fine-tune the anchor on ``cfg.domains``; returns the report (also in ``OUTPUT.json``)."""
    validate_finetune_config(cfg)
    return fit(FinetuneTask(cfg, quiet))
