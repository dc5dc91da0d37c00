"""Training datasets on the standard layouts of ``data.adapters``: ``audioset`` and ``vggsound``
(frame + audio), ``sunrgbd`` and ``nyud`` (RGB + depth), ``llvip`` (RGB + thermal, whole frames
for training, person/background crops for evaluation), built with the record datasets of
``data.manifest``. Options: see ``data.adapters``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .adapters import MissingSplitFile, read_layout_info, sunrgbd_missing_split
from .datasets import register_dataset
from .manifest import build_from_records


@dataclass
class _LayoutDataset:
    modality: str  # the one modality it pairs with RGB (checked by the dataset registry)
    # "per_split": read the layout once per split; "filter": read everything, split by record.
    mode: str
    train_split: str | None
    eval_split: str | None
    train_options: dict = field(default_factory=dict)
    eval_options: dict = field(default_factory=dict)


LAYOUT_DATASETS = {
    "audioset": _LayoutDataset(
        "audio",
        "per_split",
        "balanced_train",
        "eval",
        {"require": ("audio", "vision")},
        {"require": ("audio", "vision")},
    ),
    "vggsound": _LayoutDataset(
        "audio", "filter", "train", "test", {"require": ("audio", "vision")}
    ),
    "sunrgbd": _LayoutDataset("depth", "filter", "train", "test"),
    "nyud": _LayoutDataset("depth", "filter", "train", "test"),
    "llvip": _LayoutDataset(
        "thermal", "per_split", "train", "test", {"crops": "none"}, {"crops": "both"}
    ),
}


def build_layout_dataset(name: str, cfg, anchor, spec):
    setup = LAYOUT_DATASETS[name]
    opts = cfg.data.options
    if not cfg.data.root:
        raise ValueError(f"dataset {name}: set data.root to the dataset folder")
    root = Path(cfg.data.root)
    common = dict(opts.get("layout_options") or {})
    train_split = opts.get("train_split", setup.train_split)
    eval_split = opts.get("eval_split", setup.eval_split)
    info: dict = {"layout": name}
    classnames = opts.get("classnames")
    extra = {"classnames": classnames} if classnames and name in ("sunrgbd", "nyud") else {}
    if setup.mode == "per_split":
        train, names, i = read_layout_info(
            name, root, split=train_split, **{**setup.train_options, **extra, **common}
        )
        info["train_dropped_missing"] = i.get("dropped_missing", 0)
        evaluation, eval_names = [], None
        if eval_split and not opts.get("eval_layout"):
            evaluation, eval_names, i = read_layout_info(
                name, root, split=eval_split, **{**setup.eval_options, **extra, **common}
            )
            info["eval_dropped_missing"] = i.get("dropped_missing", 0)
        names = eval_names or names
    else:
        everything, names, i = read_layout_info(
            name, root, **{**setup.train_options, **extra, **common}
        )
        info.update({k: v for k, v in i.items() if v is not None})
        if name == "sunrgbd" and not i.get("split_source") and (train_split or eval_split):
            asked = f"data.options train_split={train_split!r}, eval_split={eval_split!r}"
            raise MissingSplitFile(
                sunrgbd_missing_split(
                    root, asked, "data.options={train_split: null, eval_split: null}"
                )
            )
        if any(r.split is not None for r in everything):
            train = [r for r in everything if r.split == train_split]
            evaluation = [r for r in everything if eval_split and r.split == eval_split]
            info.update(train_split=train_split, eval_split=eval_split)
        else:
            train, evaluation = everything, []
            info["split"] = "none found: every record trains, no evaluation"
    eval_root = root
    if opts.get("eval_layout"):
        eval_root = Path(opts.get("eval_root") or root)
        evaluation, names, _ = read_layout_info(
            opts["eval_layout"], eval_root, **(opts.get("eval_layout_options") or {})
        )
        info.update(eval_layout=opts["eval_layout"], eval_root=str(eval_root))
    if classnames:
        names = list(classnames)
    if evaluation and any(isinstance(r.label, list) for r in evaluation):
        # Multi-label (AudioSet): top-1 accuracy is undefined; the loop falls back to retrieval.
        names = None
    return build_from_records(
        cfg,
        anchor,
        spec,
        root,
        train,
        evaluation,
        names,
        opts.get("templates"),
        info,
        f"{name} at {root}",
        f"--layout {name}",
        eval_root=eval_root,
    )


def _register_layout_datasets() -> None:
    for name, setup in LAYOUT_DATASETS.items():
        register_dataset(name, modalities=(setup.modality,))(
            lambda cfg, anchor, spec, _n=name: build_layout_dataset(_n, cfg, anchor, spec)
        )


_register_layout_datasets()
