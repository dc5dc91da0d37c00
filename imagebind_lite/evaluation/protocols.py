"""Pinned evaluation protocols: ImageBind's emergent zero-shot benchmarks, read from each
dataset's own on-disk layout (``data.adapters.read_layout``) and printed beside the published
numbers.

| protocol  | modality | task                              | metric         | ImageBind |
|-----------|----------|-----------------------------------|----------------|-----------|
| esc50     | audio    | 50 classes, 5 folds, mean         | top-1          | 66.9      |
| audioset  | audio    | 527 classes, multi-label, eval set| mAP            | 17.6      |
| vggsound  | audio    | 309 classes, test split           | top-1          | 27.8      |
| sund      | depth    | SUN RGB-D test, 19 scene classes  | top-1          | 35.1      |
| nyud      | depth    | NYU-D test, 10 classes (+"other") | top-1          | 54.0      |
| llvip     | thermal  | person vs background crops        | top-1          | 63.4      |
| clotho    | audio    | text->audio, 5 captions per clip  | R@1 / R@10     | 6.0 / 28.4|
| audiocaps | audio    | text->audio, test split           | R@1 / R@10     | 9.3 / 42.3|

Prompts: CLIP's 80 ImageNet templates for every modality, ensembled (ImageBind's choice).
Several captions per clip (Clotho, AudioCaps): every caption is a query and its clip the one
positive (text->audio); audio->text counts a clip as found when any of its captions is in the
top K -- the standard protocol of the audio-retrieval literature.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import ensure_modality
from ..config import load_config
from ..data.adapters import Record, read_layout
from ..data.avmnist import DEFAULT_ROOT, digits_to_pixels, image_split, load_digit_images
from ..data.bad_input import resolve_inside
from ..data.datasets import BadSample, eval_mode, get_dataset_builder
from ..data.manifest import PairSampler
from ..files import parse_key_values
from ..registry import get_modality
from .metrics import (
    chunked_retrieval_metrics,
    confusion_matrix,
    labels_to_multi_hot,
    mean_average_precision,
    per_class_accuracy,
)
from .prompts import get_templates, readable_classname
from .space import Space, cached, embed_stream
from .zero_shot import class_scores, class_text_embeddings, topk_accuracy

# ESC-50 (Piczak 2015) in ``target`` order, as in meta/esc50.csv.
ESC50_CLASSES = [
    "dog",
    "rooster",
    "pig",
    "cow",
    "frog",
    "cat",
    "hen",
    "insects",
    "sheep",
    "crow",
    "rain",
    "sea waves",
    "crackling fire",
    "crickets",
    "chirping birds",
    "water drops",
    "wind",
    "pouring water",
    "toilet flush",
    "thunderstorm",
    "crying baby",
    "sneezing",
    "clapping",
    "breathing",
    "coughing",
    "footsteps",
    "laughing",
    "brushing teeth",
    "snoring",
    "drinking sipping",
    "door wood knock",
    "mouse click",
    "keyboard typing",
    "door wood creaks",
    "can opening",
    "washing machine",
    "vacuum cleaner",
    "clock alarm",
    "clock tick",
    "glass breaking",
    "helicopter",
    "chainsaw",
    "siren",
    "car horn",
    "engine",
    "train",
    "church bells",
    "airplane",
    "fireworks",
    "hand saw",
]

# SUN RGB-D scene classification (Song et al. 2015): the 19 scenes with more than 80 frames;
# the test frames of other scenes are left out (5,050 -> 4,660 frames).
SUN_D_CLASSES = [
    "bathroom",
    "bedroom",
    "classroom",
    "computer room",
    "conference room",
    "corridor",
    "dining area",
    "dining room",
    "discussion area",
    "furniture store",
    "home office",
    "kitchen",
    "lab",
    "lecture theatre",
    "library",
    "living room",
    "office",
    "rest space",
    "study space",
]

# NYU Depth v2 (1,449 labelled frames, 654 test in the official splits.mat; ImageBind's Table 1
# says 653, one frame left out unpublished: see docs/evaluation.md): 27 scene types folded
# into 10 classes, the nine most frequent and "other". "other" has no prompt of its own: its
# score is the best score of the 18 remaining scene names below.
NYU_D_CLASSES = [
    "bedroom",
    "kitchen",
    "living room",
    "bathroom",
    "dining room",
    "office",
    "home office",
    "classroom",
    "bookstore",
    "other",
]
NYU_D_OTHER_SCENES = [
    "indoor balcony",
    "exercise room",
    "printer room",
    "laundry room",
    "dinette",
    "foyer",
    "conference room",
    "cafe",
    "home storage",
    "student lounge",
    "computer lab",
    "basement",
    "study room",
    "office kitchen",
    "reception room",
    "study",
    "furniture store",
    "playroom",
]
# The dataset's own spellings of those names.
_NYU_SPELLING = {"excercise room": "exercise room"}

LLVIP_CLASSES = ["background", "person"]


@dataclass(frozen=True)
class Reference:
    model: str
    metric: str
    value: float  # percent, as published
    note: str = ""


IB = "ImageBind"


@dataclass
class Protocol:
    name: str
    title: str
    layout: str
    modality: str
    task: str  # "classification" | "multilabel" | "retrieval"
    metrics: tuple[str, ...]  # the headline metrics, compared with the references
    references: tuple[Reference, ...]
    layout_options: dict = field(default_factory=dict)
    classnames: list[str] | None = None  # None: the layout's own class list
    class_prompts: dict[int, list[str]] = field(default_factory=dict)  # class -> names scored
    group_by: str | None = None  # "fold": metrics per fold and their mean
    templates: str = "imagenet"
    test_set: str = ""


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            "esc50",
            "ESC-50",
            "esc50",
            "audio",
            "classification",
            ("top1",),
            (
                Reference(IB, "top1", 66.9),
                Reference("ViT-Lens-L", "top1", 75.9),
                Reference("LAION-CLAP", "top1", 91.0, "text-paired training, not emergent"),
            ),
            classnames=ESC50_CLASSES,
            group_by="fold",
            test_set="2,000 clips, 5 folds of 400; top-1 per fold, then the mean",
        ),
        Protocol(
            "audioset",
            "AudioSet",
            "audioset",
            "audio",
            "multilabel",
            ("mAP",),
            (Reference(IB, "mAP", 17.6),),
            layout_options={"split": "eval"},
            test_set="the eval segments (eval_segments.csv, about 20k clips as downloadable); "
            "mAP over the 527 classes with a positive",
        ),
        Protocol(
            "vggsound",
            "VGGSound",
            "vggsound",
            "audio",
            "classification",
            ("top1",),
            (Reference(IB, "top1", 27.8),),
            layout_options={"split": "test"},
            test_set="the test split of vggsound.csv (309 classes)",
        ),
        Protocol(
            "sund",
            "SUN-D",
            "sunrgbd",
            "depth",
            "classification",
            ("top1",),
            (Reference(IB, "top1", 35.1), Reference("ViT-Lens-L", "top1", 52.2)),
            layout_options={"split": "test", "classnames": SUN_D_CLASSES},
            classnames=SUN_D_CLASSES,
            test_set="SUN RGB-D test frames of the 19 scene classes (4,660), depth only",
        ),
        Protocol(
            "nyud",
            "NYU-D",
            "nyud",
            "depth",
            "classification",
            ("top1",),
            (
                Reference(IB, "top1", 54.0),
                Reference("LanguageBind", "top1", 65.1),
                Reference("ViT-Lens-L", "top1", 68.5),
            ),
            layout_options={"split": "test"},
            classnames=NYU_D_CLASSES,
            class_prompts={9: NYU_D_OTHER_SCENES},
            test_set="NYU-D v2 test frames (654), 10 classes; 'other' = best of 18 scene names",
        ),
        Protocol(
            "llvip",
            "LLVIP",
            "llvip",
            "thermal",
            "classification",
            ("top1",),
            (Reference(IB, "top1", 63.4), Reference("LanguageBind", "top1", 87.2)),
            layout_options={"split": "test", "crops": "both"},
            classnames=LLVIP_CLASSES,
            test_set="person boxes of the test images and as many background boxes, thermal",
        ),
        Protocol(
            "clotho",
            "Clotho",
            "clotho",
            "audio",
            "retrieval",
            ("t2a_R@1", "t2a_R@10"),
            (Reference(IB, "t2a_R@1", 6.0), Reference(IB, "t2a_R@10", 28.4)),
            layout_options={"split": "evaluation"},
            test_set="evaluation split (1,045 clips x 5 captions); each caption a query",
        ),
        Protocol(
            "audiocaps",
            "AudioCaps",
            "audiocaps",
            "audio",
            "retrieval",
            ("t2a_R@1", "t2a_R@10"),
            (Reference(IB, "t2a_R@1", 9.3), Reference(IB, "t2a_R@10", 42.3)),
            layout_options={"split": "test"},
            test_set="test split (about 975 clips x 5 captions); each caption a query",
        ),
    ]
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name.lower().replace("-", "")]
    except KeyError:
        on_layout = [p.name for p in PROTOCOLS.values() if p.layout == name.lower()]
        hint = f" (the {name} layout's protocol is {on_layout[0]!r})" if on_layout else ""
        raise KeyError(f"unknown protocol {name!r}{hint}; known: {', '.join(PROTOCOLS)}") from None


def list_protocols() -> list[str]:
    return list(PROTOCOLS)


# ----------------------------------------------------------------------------- labels


def _norm(name: str | None) -> str | None:
    return None if name is None else readable_classname(name).lower()


def prepare_records(protocol: Protocol, records: list[Record], layout_names: list[str] | None):
    """Records and layout class names -> (records kept, labels, class names, excluded count).

    Applies the protocol's test-set rules: SUN-D keeps its 19 classes, NYU-D folds the other
    scenes into "other", ESC-50 checks the layout's names against the pinned list.
    """
    classnames = list(protocol.classnames or layout_names or [])
    if protocol.task == "retrieval":
        kept = [r for r in records if r.captions]
        return kept, None, None, len(records) - len(kept)
    if protocol.name == "nyud":
        index = {_norm(n): i for i, n in enumerate(NYU_D_CLASSES[:-1])}
        known = set(index) | {_norm(n) for n in NYU_D_OTHER_SCENES} | set(_NYU_SPELLING)
        kept, labels = [], []
        for r in records:
            scene = _norm(r.meta.get("scene"))
            if scene is None:
                continue
            scene = _NYU_SPELLING.get(scene, scene)
            if scene not in known:
                warnings.warn(
                    f"nyud: scene {scene!r} of {r.id} is not an NYU-D scene type; "
                    "scored as 'other'",
                    stacklevel=2,
                )
            kept.append(r)
            labels.append(index.get(scene, len(NYU_D_CLASSES) - 1))
        return kept, labels, classnames, len(records) - len(kept)
    if protocol.name == "esc50" and layout_names:
        differ = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(layout_names, classnames))
            if _norm(a) != _norm(b)
        ]
        if differ:
            raise ValueError(
                f"esc50: meta/esc50.csv names class {differ[0][0]} {differ[0][1]!r}, the standard "
                f"list {differ[0][2]!r}: not the ESC-50 release this protocol pins"
            )
    kept = [r for r in records if r.label is not None and r.label != []]
    if protocol.task == "multilabel":
        labels = [list(r.label) if isinstance(r.label, list) else [r.label] for r in kept]
    else:
        if any(isinstance(r.label, list) for r in kept):
            raise ValueError(f"{protocol.name}: multi-label records in a single-label protocol")
        labels = [int(r.label) for r in kept]
        if labels and max(labels) >= len(classnames):
            raise ValueError(
                f"{protocol.name}: label {max(labels)} but only {len(classnames)} classes"
            )
    return kept, labels, classnames, len(records) - len(kept)


# ------------------------------------------------------------------------ loading records


def record_loader(
    space: Space,
    modality: str,
    records: list[Record],
    root: Path,
    keys: Sequence[str] | None = None,
):
    """Index -> {key: model input} for ``keys`` (default: the modality alone).

    A modality aligned with the RGB frame (``ModalitySpec.read_aligned``: depth, thermal) is
    read through the training pipeline's ``PairSampler`` in evaluation mode: the record's crop
    box (LLVIP person/background), intrinsics, focal length, baseline and bit layout are applied
    exactly as in training, centre-cropped, together with its RGB image when it has one (the
    crop is then measured on the image, as in training).
    """
    keys = tuple(keys or (modality,))
    root = Path(root)
    sampler = None
    if get_modality(modality).read_aligned is not None:
        sampler = PairSampler(get_modality(modality), space.preprocess(modality), space.anchor)

    def load(i: int) -> dict:
        record = records[i]
        paired = sampler is not None and record.paths.get("vision") is not None
        sources = {}
        for key in (*keys, "vision") if paired else keys:
            if record.paths.get(key) is None:
                raise BadSample("missing", f"record {record.id}: no {key} file")
            sources[key] = resolve_inside(root, record.paths[key])
        if record.paths.get("intrinsics") is not None:
            sources["intrinsics"] = resolve_inside(root, record.paths["intrinsics"])
        if sampler is not None:
            out = sampler(sources, record.meta, False, None)
            return {k: out[k] for k in keys}
        return {k: space.load_file(sources[k], k) for k in keys}

    return load


def embed_records(
    space: Space,
    modality: str,
    records: list[Record],
    root: Path,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    cache: str | Path | None = None,
    tag: str = "",
    skip_bad: bool = True,
):
    """-> (embeddings [M, D], indices into ``records`` of the M embedded, errors, cache used)."""
    ids = [r.id for r in records]
    errors: dict[str, str] = {}

    def compute():
        out = embed_stream(
            {modality: space.encoder_fn(modality)},
            len(records),
            record_loader(space, modality, records, root),
            batch_size,
            num_workers,
            progress,
            f"embed {tag or modality}",
            skip_bad,
            space.device,
        )
        errors.update({ids[i]: e for i, e in out.errors.items()})
        return out.embeddings[modality], [ids[i] for i in out.kept.tolist()]

    fingerprint = f"{space.fingerprint(modality)}:{tag}"
    emb, kept_ids, used = cached(
        cache, ids, fingerprint, compute, {"modality": modality, "protocol": tag}
    )
    position = {rid: i for i, rid in enumerate(ids)}
    kept = torch.tensor([position[r] for r in kept_ids], dtype=torch.long)
    return emb, kept, errors, used


# ------------------------------------------------------------------------------- scoring


def class_name_embeddings(
    space: Space,
    classnames: Sequence[str],
    templates: Sequence[str],
    class_prompts: dict[int, list[str]] | None = None,
):
    """Prompt-ensembled embeddings of every name scored -> (names [K, D], owner class [K]).

    A class scores as its best name: one name per class, except where ``class_prompts`` gives
    the names that stand for it (NYU-D's "other")."""
    names, owner = [], []
    for c, name in enumerate(classnames):
        for n in (class_prompts or {}).get(c, [name]):
            names.append(readable_classname(n))
            owner.append(c)
    key = (tuple(names), tuple(owner), tuple(templates))
    if key not in space.prompt_memo:
        emb = class_text_embeddings(space.anchor.encode_text, names, templates).cpu()
        space.prompt_memo[key] = (emb, torch.tensor(owner))
    return space.prompt_memo[key]


def score_classification(embeddings, labels, name_emb, owner, num_classes, groups=None) -> dict:
    scores = class_scores(embeddings, name_emb, owner, num_classes)
    labels_t = torch.tensor(labels)
    out = topk_accuracy(scores, labels_t, (1, 5))
    predictions = scores.argmax(dim=1)
    out["per_class_accuracy"] = per_class_accuracy(predictions, labels_t, num_classes).tolist()
    out["confusion_matrix"] = confusion_matrix(predictions, labels_t, num_classes).tolist()
    if groups is not None:
        per = {}
        for g in sorted(set(groups)):
            mask = torch.tensor([x == g for x in groups])
            per[str(g)] = topk_accuracy(scores[mask], labels_t[mask], (1, 5))
        out["per_group"] = per
        out["top1_group_mean"] = sum(v["top1"] for v in per.values()) / len(per)
        out["top5_group_mean"] = sum(v["top5"] for v in per.values()) / len(per)
    return out


def score_retrieval(
    space: Space,
    audio_emb: torch.Tensor,
    records: list[Record],
    kept: torch.Tensor,
    ks=(1, 5, 10),
    progress: bool = False,
) -> dict:
    """Text<->item retrieval with several captions per item; ``kept`` are the records whose
    item was embedded (captions of a skipped item have no positive and are left out)."""
    captions, owner = [], []
    for position, index in enumerate(kept.tolist()):
        for caption in records[index].captions:
            captions.append(caption)
            owner.append(position)
    text = space.embed_texts(captions)
    owner_t = torch.tensor(owner)
    items = torch.arange(len(audio_emb))
    t2a = chunked_retrieval_metrics(text, audio_emb, ks, owner_t, items, progress=progress)
    a2t = chunked_retrieval_metrics(audio_emb, text, ks, items, owner_t, progress=progress)
    out = {f"t2a_{k}": v for k, v in t2a.items()}
    out.update({f"a2t_{k}": v for k, v in a2t.items()})
    out["num_captions"] = len(captions)
    return out


# ------------------------------------------------------------------------------- running


def evaluate_protocol(
    protocol: Protocol | str,
    root: str | Path,
    space: Space,
    layout_options: dict | None = None,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    cache: str | Path | None = None,
    skip_bad: bool = True,
) -> dict:
    """Run one protocol on the dataset at ``root`` with the space's encoder for its modality."""
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    root = Path(root)
    options = {**protocol.layout_options, **(layout_options or {})}
    records, layout_names = read_layout(protocol.layout, root, **options)
    records, labels, classnames, excluded = prepare_records(protocol, records, layout_names)
    if not records:
        raise ValueError(f"{protocol.name}: no test records under {root} (options {options})")
    emb, kept, errors, used_cache = embed_records(
        space,
        protocol.modality,
        records,
        root,
        batch_size,
        num_workers,
        progress,
        cache,
        protocol.name,
        skip_bad,
    )
    if len(kept) == 0:
        raise ValueError(
            f"{protocol.name}: every record failed to load, e.g. {next(iter(errors.values()), '?')}"
        )
    result = {
        "protocol": protocol.name,
        "title": protocol.title,
        "modality": protocol.modality,
        "root": str(root),
        "layout_options": {k: v for k, v in options.items() if k != "classnames"},
        "num_records": len(records),
        "num_evaluated": len(kept),
        "excluded_by_protocol": excluded,
        "skipped": len(records) - len(kept),
        "skipped_examples": dict(list(errors.items())[:5]),
        "embeddings_cache": str(cache) if cache else None,
        "embeddings_cache_used": used_cache,
        "test_set": protocol.test_set,
    }
    if protocol.task == "retrieval":
        metrics = score_retrieval(space, emb, records, kept, progress=progress)
    else:
        template_list = get_templates(templates or protocol.templates)
        result["templates"] = len(template_list)
        result["classnames"] = classnames
        name_emb, owner = class_name_embeddings(
            space, classnames, template_list, protocol.class_prompts
        )
        kept_labels = [labels[i] for i in kept.tolist()]
        if protocol.task == "multilabel":
            scores = class_scores(emb, name_emb, owner, len(classnames))
            targets = labels_to_multi_hot(kept_labels, len(classnames))
            metrics = mean_average_precision(scores, targets)
        else:
            groups = None
            if protocol.group_by == "fold":
                groups = [records[i].fold for i in kept.tolist()]
            metrics = score_classification(
                emb, kept_labels, name_emb, owner, len(classnames), groups
            )
            if groups is not None:
                # The published number is the mean over folds, not the pooled accuracy.
                for k in ("top1", "top5"):
                    metrics[f"{k}_pooled"], metrics[k] = metrics[k], metrics[f"{k}_group_mean"]
    result["metrics"] = metrics
    result["headline"] = {m: metrics[m] for m in protocol.metrics}
    result["references"] = [vars(r) for r in protocol.references]
    return result


# ------------------------------------------------------------------------------- printing


def format_table(result: dict) -> str:
    """The headline metrics (percent) beside every published reference, then per-fold rows."""
    refs = result.get("references", [])
    models = list(dict.fromkeys(r["model"] for r in refs))
    header = ["metric", "ours", *models]
    rows = []
    for metric, value in result["headline"].items():
        row = [metric, f"{100 * value:.1f}"]
        for model in models:
            found = [r for r in refs if r["model"] == model and r["metric"] == metric]
            row.append(f"{found[0]['value']:.1f}" if found else "-")
        rows.append(row)
    per = result["metrics"].get("per_group")
    if per:
        for group, values in per.items():
            rows.append(
                [f"  fold {group} top1", f"{100 * values['top1']:.1f}", *["" for _ in models]]
            )
        rows.append(
            [
                "  pooled top1",
                f"{100 * result['metrics']['top1_pooled']:.1f}",
                *["" for _ in models],
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"{result['title']} ({result['modality']}): {result['num_evaluated']} evaluated"
        + (f", {result['skipped']} skipped" if result.get("skipped") else ""),
        " | ".join(h.ljust(w) for h, w in zip(header, widths)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    notes = [f"{r['model']}: {r['note']}" for r in refs if r.get("note")]
    lines += [f"  ({n})" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------- a run's own data


def load_run_config(run_dir: str | Path):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_config(path)


def run_bundle(run_dir: str | Path, anchor):
    """The dataset of a saved run, rebuilt from its ``config.yaml`` -> (config, bundle). A
    modality defined by the run's own code must already be loaded (``load_run(trust_code)``)."""
    cfg = load_run_config(run_dir)
    ensure_modality(cfg.modality, cfg.modality_file, Path(run_dir))
    bundle = get_dataset_builder(cfg.data.dataset)(cfg, anchor, get_modality(cfg.modality))
    if bundle.eval is None:
        raise ValueError(f"{run_dir}: dataset {cfg.data.dataset} has no evaluation split")
    return cfg, bundle


def run_templates(cfg, bundle, override: str | Sequence[str] | None = None) -> list[str]:
    """The run's own prompt templates (as its training-time evaluation used), or an override."""
    if override:
        return get_templates(override)
    if cfg.eval.templates != "default":
        return get_templates(cfg.eval.templates)
    return list(bundle.templates or ["{}"])


@dataclass
class Collection:
    """Embeddings of one modality. ``ids`` pair rows across modalities (instance retrieval;
    several rows may share an id, e.g. captions); ``labels`` give class-level positives."""

    modality: str
    embeddings: torch.Tensor
    ids: list[str] | None = None
    labels: list[int] | None = None
    names: list[str] | None = None  # what a report shows for each row


def _avmnist_images(cfg, space: Space) -> Collection:
    images, labels = load_digit_images(Path(cfg.data.root) if cfg.data.root else DEFAULT_ROOT)
    # The images held out of the anchor's fine-tuning, as the audio test speakers are held out.
    held = ~image_split(len(images))
    anchor = space.anchor
    pixels = anchor.normalize_pixels(digits_to_pixels(images[held], anchor.image_size[0]))
    emb = torch.cat(
        [anchor.encode_image(pixels[i : i + 256]).cpu() for i in range(0, len(pixels), 256)]
    )
    index = torch.nonzero(held).flatten().tolist()
    names = [f"digit-image-{i}" for i in index]
    return Collection("vision", emb, None, labels[held].tolist(), names)


# Datasets whose evaluation samples carry no paired image get a class-level image gallery.
EXTRA_GALLERIES = {"avmnist": _avmnist_images}


def run_collections(
    space: Space,
    run_dir: str | Path,
    templates=None,
    batch_size: int = 64,
    progress: bool = False,
    num_workers: int = 0,
    built: tuple | None = None,
) -> tuple[dict, dict]:
    """Embed a run's evaluation split -> ({modality: Collection}, info). The run's modality,
    the paired image when samples carry one (else a dataset's extra gallery), and the class
    prompts as a ``text`` collection. ``built``: a (config, bundle) from ``run_bundle``.
    The split is read in its evaluation mode (``data.datasets.eval_mode``)."""
    cfg, bundle = built or run_bundle(run_dir, space.anchor)
    modality = cfg.modality
    dataset = eval_mode(bundle.eval)
    first = dataset[0]
    keys = [modality] + (["vision"] if "vision" in first else [])
    encoders = {k: space.encoder_fn(k) for k in keys}

    def load(i: int) -> dict:
        sample = dataset[i]
        return {**{k: sample[k] for k in keys}, "id": str(sample["id"]), "label": sample["label"]}

    out = embed_stream(
        encoders,
        len(dataset),
        load,
        batch_size,
        num_workers,
        progress,
        f"embed {modality}",
        True,
        space.device,
        extras=("id", "label"),
    )
    ids, labels = out.extras["id"], [int(x) for x in out.extras["label"]]
    has_labels = bool(bundle.classnames) and all(x >= 0 for x in labels)
    colls = {
        k: Collection(k, out.embeddings[k], ids, labels if has_labels else None, ids) for k in keys
    }
    if "vision" not in colls and cfg.data.dataset in EXTRA_GALLERIES:
        colls["vision"] = EXTRA_GALLERIES[cfg.data.dataset](cfg, space)
    info = {
        "run_dir": str(run_dir),
        "dataset": cfg.data.dataset,
        "modality": modality,
        "num_eval": len(dataset),
        "skipped": len(out.errors),
        "classnames": bundle.classnames,
    }
    if bundle.classnames:
        template_list = run_templates(cfg, bundle, templates)
        text = class_text_embeddings(space.anchor.encode_text, bundle.classnames, template_list)
        colls["text"] = Collection(
            "text", text.cpu(), None, list(range(len(bundle.classnames))), list(bundle.classnames)
        )
        info["templates"] = template_list
    return colls, info


def evaluate_run(
    space: Space,
    run_dir: str | Path,
    templates=None,
    batch_size: int = 64,
    progress: bool = False,
    collections: tuple[dict, dict] | None = None,
) -> dict:
    """Zero-shot classification on a run's own evaluation split, in the protocol result form."""
    colls, info = collections or run_collections(space, run_dir, templates, batch_size, progress)
    modality = info["modality"]
    if "text" not in colls or colls[modality].labels is None:
        raise ValueError(
            f"{run_dir}: dataset {info['dataset']} has no class labels; use eval/retrieval.py"
        )
    classnames = info["classnames"]
    metrics = score_classification(
        colls[modality].embeddings,
        colls[modality].labels,
        colls["text"].embeddings,
        None,
        len(classnames),
    )
    return {
        "protocol": "run",
        "title": f"{info['dataset']} evaluation split",
        "modality": modality,
        "run_dir": str(run_dir),
        "num_records": info["num_eval"],
        "num_evaluated": len(colls[modality].embeddings),
        "skipped": info["skipped"],
        "templates": len(info["templates"]),
        "classnames": classnames,
        "metrics": metrics,
        "headline": {"top1": metrics["top1"], "top5": metrics["top5"]},
        "references": [],
    }


# ------------------------------------------------------------------ cross-modal retrieval


def record_collections(
    space: Space,
    records: list[Record],
    root: str | Path,
    modalities: Sequence[str] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    cache_prefix: str | Path | None = None,
) -> dict[str, Collection]:
    """Embed every modality of the records that the space can encode (files, and captions as
    ``text``). Depth/thermal are read with their RGB partner so that both get the same crop.
    ``cache_prefix``: reuse/save each pass's embeddings as ``PREFIX.<keys>.safetensors``."""
    root = Path(root)
    present = {k for r in records for k in r.paths}
    if any(r.captions for r in records):
        present.add("text")
    wanted = [m for m in (modalities or space.modalities) if m in present and m in space.modalities]
    labels_all = [r.label if isinstance(r.label, int) else None for r in records]
    use_labels = all(x is not None for x in labels_all)
    colls: dict[str, Collection] = {}

    def embed_pass(modality: str, keys: tuple[str, ...]):
        """One streamed pass over the records holding every key -> embeddings per key."""
        has = [i for i, r in enumerate(records) if all(r.paths.get(k) for k in keys)]
        ids = [records[i].id for i in has]
        errors: dict = {}

        def compute():
            out = embed_stream(
                {k: space.encoder_fn(k) for k in keys},
                len(has),
                record_loader(space, modality, [records[i] for i in has], root, keys),
                batch_size,
                num_workers,
                progress,
                f"embed {'+'.join(keys)}",
                True,
                space.device,
            )
            errors.update(out.errors)
            # Keys side by side in one tensor: one cache file per pass.
            return torch.cat([out.embeddings[k] for k in keys], 1), [
                ids[i] for i in out.kept.tolist()
            ]

        cache = f"{cache_prefix}.{'+'.join(keys)}.safetensors" if cache_prefix else None
        fingerprint = "+".join(space.fingerprint(k) for k in keys)
        emb, kept_ids, _ = cached(cache, ids, fingerprint, compute, {"modalities": list(keys)})
        if has and not kept_ids:
            raise ValueError(
                f"no {modality} file could be read, e.g. {next(iter(errors.values()), '?')}"
            )
        position = {r.id: i for i, r in enumerate(records)}
        kept = [position[r] for r in kept_ids]
        labels = [labels_all[i] for i in kept] if use_labels else None
        for k, part in zip(keys, emb.chunk(len(keys), dim=1)):
            if k not in colls:
                colls[k] = Collection(k, part, list(kept_ids), labels, list(kept_ids))

    for modality in [m for m in wanted if not get_modality(m).is_anchor]:
        pair_vision = get_modality(modality).read_aligned is not None and "vision" in wanted
        embed_pass(modality, (modality, "vision") if pair_vision else (modality,))
    if "vision" in wanted and "vision" not in colls:
        embed_pass("vision", ("vision",))
    if "text" in wanted:
        captions, ids = [], []
        for r in records:
            captions += r.captions
            ids += [r.id] * len(r.captions)
        colls["text"] = Collection("text", space.embed_texts(captions), ids, None, captions)
    return colls


def _positives(query: Collection, gallery: Collection):
    """(query groups, gallery groups, mode, query rows kept) for a direction."""
    if query.ids is not None and gallery.ids is not None and set(query.ids) & set(gallery.ids):
        index = {i: n for n, i in enumerate(dict.fromkeys(gallery.ids))}
        rows = [n for n, i in enumerate(query.ids) if i in index]
        qg = torch.tensor([index[query.ids[n]] for n in rows])
        gg = torch.tensor([index[i] for i in gallery.ids])
        return qg, gg, "instance", rows
    if query.labels is not None and gallery.labels is not None:
        have = set(gallery.labels)
        rows = [n for n, label in enumerate(query.labels) if label in have]
        return (
            torch.tensor([query.labels[n] for n in rows]),
            torch.tensor(gallery.labels),
            "class",
            rows,
        )
    return None


def default_directions(collections: dict[str, Collection]) -> list[tuple[str, str]]:
    names = list(collections)
    return [
        (a, b)
        for a in names
        for b in names
        if a != b and _positives(collections[a], collections[b]) is not None
    ]


def cross_modal_retrieval(
    collections: dict[str, Collection],
    directions: Sequence[tuple[str, str]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = False,
) -> dict:
    """R@K and median rank for each (query modality, gallery modality) direction. Rows pair up
    by id where both sides have ids in common (instance retrieval; several captions per item
    allowed), else by class label (class-level retrieval: any item of the class counts)."""
    results = {}
    for a, b in directions or default_directions(collections):
        for name in (a, b):
            if name not in collections:
                raise ValueError(f"no {name} embeddings (have: {', '.join(collections)})")
        found = _positives(collections[a], collections[b])
        if found is None:
            raise ValueError(f"{a}->{b}: the two sides share neither ids nor labels")
        qg, gg, mode, rows = found
        metrics = chunked_retrieval_metrics(
            collections[a].embeddings[rows],
            collections[b].embeddings,
            ks,
            qg,
            gg,
            progress=progress,
        )
        metrics.update(
            positives=mode,
            queries=len(rows),
            gallery=len(gg),
            queries_without_positive=len(collections[a].embeddings) - len(rows),
        )
        results[f"{a}->{b}"] = metrics
    return results


def format_retrieval(results: dict, ks: Sequence[int] = (1, 5, 10)) -> str:
    header = ["direction", "positives", "queries", "gallery", *[f"R@{k}" for k in ks], "MdR"]
    rows = [
        [
            d,
            m["positives"],
            str(m["queries"]),
            str(m["gallery"]),
            *[f"{100 * m[f'R@{k}']:.1f}" for k in ks],
            f"{m['median_rank']:.0f}",
        ]
        for d, m in results.items()
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths)),
        "-+-".join("-" * w for w in widths),
    ]
    return "\n".join(lines + [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])


# ------------------------------------------------------------------------ training split


def run_train_collection(
    space: Space,
    run_dir: str | Path,
    batch_size: int = 64,
    progress: bool = False,
    num_workers: int = 0,
    built: tuple | None = None,
):
    """The run's training split in its modality, in its evaluation mode (no augmentation, no
    random flip, shift or warp: ``data.datasets.eval_mode``), so that a probe trains on the view
    it is tested on -> (Collection, class names). ``built``: a (config, bundle) from
    ``run_bundle``, to build the data once."""
    cfg, bundle = built or run_bundle(run_dir, space.anchor)
    modality = cfg.modality
    dataset = eval_mode(bundle.train)

    def load(i: int) -> dict:
        sample = dataset[i]
        return {modality: sample[modality], "id": str(sample["id"]), "label": sample["label"]}

    out = embed_stream(
        {modality: space.encoder_fn(modality)},
        len(dataset),
        load,
        batch_size,
        num_workers,
        progress,
        f"embed train {modality}",
        True,
        space.device,
        extras=("id", "label"),
    )
    labels = [int(x) for x in out.extras["label"]]
    return Collection(
        modality, out.embeddings[modality], out.extras["id"], labels, out.extras["id"]
    ), bundle.classnames


def parse_options(pairs: Sequence[str]) -> dict:
    """``KEY=VALUE`` strings (values parsed as YAML) -> dict, for layout options."""
    return parse_key_values(pairs)


def layout_for(name: str) -> tuple[str, dict]:
    """A protocol name -> (its layout, its test-set options); any other name is a layout."""
    key = name.lower().replace("-", "")
    if key in PROTOCOLS:
        p = PROTOCOLS[key]
        return p.layout, dict(p.layout_options)
    return name, {}
