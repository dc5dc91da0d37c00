"""Configs are data: YAML files load into these dataclasses, and any field can be overridden on
the command line as ``section.field=value`` (values parse as YAML: ``optim.lr=3e-4``,
``data.preprocess={num_mel_bins: 64}``). Unknown fields and wrong types fail at start with one
line naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from .files import atomic_write_text

_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A bad config; the message is one line naming the field and the problem."""


@dataclass
class AnchorConfig:
    # An open_clip model name (``ViT-B-32``, ``ViT-H-14``) or one registered from ``model_config``.
    model: str = "tiny-clip-32"
    # An open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``), a local checkpoint file,
    # ``imagebind_lite:NAME`` for an anchor shipped in the package, or null for random weights.
    pretrained: str | None = "imagebind_lite:tiny-clip-digits-scenes"
    # An open_clip model JSON (file or folder) to register before building, for custom sizes.
    model_config: str | None = "imagebind_lite:tiny-clip-32"
    # A folder written by ``train/cache_anchor.py``: read anchor embeddings instead of running it.
    cache: str | None = None


@dataclass
class EncoderConfig:
    size: str = "tiny"  # a named size of the modality (``tiny``, ``imagebind``, ...)
    # Any size field (width, depth, heads, mlp_ratio, drop_path, kernel, stride, patch) to override.
    overrides: dict = field(default_factory=dict)
    temperature: float | None = None  # default: the modality's fixed temperature
    grad_checkpointing: bool = False
    compile: bool = False
    # random, or anchor: start from the anchor's image tower (an open_clip ViT), which then
    # fixes the architecture (overrides: drop_path only); image-shaped modalities only.
    init: str = "random"
    # all (full fine-tuning), lens (frozen trunk; stem and head train), lora (lens plus LoRA
    # adapters of lora_rank/lora_alpha on the trunk, merged when saved) or head (head only).
    trainable: str = "all"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # FLIP's patch dropout: in training each sample keeps a random 1 - p of its patch tokens (the
    # CLS token always); none in evaluation. In [0, 1).
    patch_dropout: float = 0.0


@dataclass
class DataConfig:
    dataset: str = "avmnist"  # a registered dataset (``imagebind_lite.data.datasets``)
    root: str | None = None  # dataset folder; null means the copy shipped with the package
    batch_size: int = 128  # per process
    num_workers: int = 0
    preprocess: dict = field(default_factory=dict)  # modality preprocessing options
    options: dict = field(default_factory=dict)  # dataset-specific options
    bad_input: str = "skip"  # skip (replace and count) or raise


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    epochs: int = 30
    max_steps: int | None = None  # stop early (tests, smoke runs)
    warmup_epochs: float = 2.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1  # micro-batches per step; negatives stay the full effective batch


@dataclass
class LossConfig:
    # infonce: symmetric InfoNCE at the fixed temperature (encoder.temperature); siglip: SigLIP's
    # pairwise sigmoid loss with a learnable scale and bias of its own (docs/scale.md).
    kind: str = "infonce"
    # open_clip's local loss: each process scores its own rows against the global batch, so
    # logit memory grows linearly with it; the gradients are the same (docs/scale.md). InfoNCE
    # only: siglip always is.
    local: bool = False
    # siglip: the initial multiplier of the logits (the parameter is its log) and bias.
    init_scale: float = 10.0
    init_bias: float = -10.0


@dataclass
class EvalConfig:
    templates: str = "default"  # a template set name (imagebind_lite.evaluation.prompts) or a list
    batch_size: int = 256
    every_epochs: int = 0  # 0: only at the end


@dataclass
class TrainConfig:
    modality: str = "audio"
    modality_file: str | None = None  # a .py file or module that registers a new modality
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    # CPU threads for torch in each process; null: the CPUs available to the process divided
    # by the processes on this machine (imagebind_lite/threads.py). GPU runs ignore it.
    threads: int | None = None
    output_dir: str = "runs"
    run_name: str | None = None  # default: <modality>-<dataset>
    mixed_precision: str = "no"  # no, fp16, bf16 (Accelerate)
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 2
    log_every: int = 10
    tracker: str | None = "tensorboard"  # any Accelerate tracker, or null


@dataclass
class BindConfig:
    """Several modalities against one anchor in one run (``train/bind.py``). Each entry of
    ``modalities`` is ``{config: a YAML file or shipped name (default: the shipped
    <modality>.yaml, else the defaults), weight: its share of the steps (default: its epochs x
    batches per epoch), ...}`` plus any TrainConfig field of that modality (``data.batch_size``,
    ``encoder.size``, ``encoder.temperature``, ``data.preprocess``, ``optim.lr``, ...)."""

    modalities: dict = field(default_factory=dict)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    sampling: str = "random"  # random: weighted draw from (seed, step); round_robin
    steps: int | None = None  # total; default: the sum of each modality's epochs x batches
    max_steps: int | None = None  # stop early (tests, smoke runs)
    warmup_steps: int | None = None  # default: the sum of each modality's warm-up steps
    betas: tuple = (0.9, 0.95)
    grad_clip: float | None = 1.0
    emergent: list = field(default_factory=list)  # [[a, b], ...]; default: every pair
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    threads: int | None = None  # CPU threads for torch per process (TrainConfig.threads)
    output_dir: str = "runs"
    run_name: str | None = None  # default: bind-<modality>-<modality>...
    mixed_precision: str = "no"
    num_workers: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    tracker: str | None = "tensorboard"


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value) if (tp is tuple or origin is tuple) else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config field {prefix}{unknown[0]!r}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _check_type(value, hints[name], path)
    # Nested sections given only partly keep their defaults for the other fields.
    obj = cls(**{k: v for k, v in kwargs.items() if not dataclasses.is_dataclass(v)})
    for name, value in kwargs.items():
        if dataclasses.is_dataclass(value):
            setattr(obj, name, value)
    return obj


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and key
            not in (
                "overrides",
                "preprocess",
                "options",
            )
        ):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({err})") from None
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r} has an empty field name")
        value = {part: value}
    return value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    cls: type = TrainConfig,
    extra: dict | None = None,
):
    """Defaults <- YAML file <- ``extra`` (nested fields) <- command-line overrides, validated
    against ``cls``."""
    data: dict = dataclasses.asdict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of fields")
        # Validate the file's own fields before merging so that errors name the real field.
        _from_dict(cls, _merge(data, loaded))
        data = _merge(data, loaded)
    if extra:
        data = _merge(data, extra)
    for text in overrides:
        data = _merge(data, parse_override(text))
    return _from_dict(cls, data)


def config_to_dict(config) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def save_config(config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


# What a resumed run may set anew: how far it goes, how it is fed and split over processes (the
# loop checks that the global batch stays), where its files are, how it logs and evaluates.
# Any other field (the model, the data, the loss, the optimizer) must stay the run's.
RESUMABLE = (
    "optim.max_steps",
    "max_steps",
    "data.batch_size",
    "optim.grad_accum",
    "data.num_workers",
    "num_workers",
    "threads",
    "data.root",
    "anchor.cache",
    "output_dir",
    "run_name",
    "tracker",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "encoder.compile",
    "encoder.grad_checkpointing",
    "eval.*",
    "modalities.*.data.num_workers",
    "modalities.*.data.root",
    "modalities.*.eval.*",
)


def _flat(value, prefix: str = "") -> dict:
    """A nested config as ``{dotted.field: value}`` (an empty mapping adds nothing)."""
    if not isinstance(value, dict):
        return {prefix[:-1]: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}


def check_resumed_config(config, saved_path: str | Path) -> None:
    """Refuse, in one line, a resumed run whose config changes a field outside ``RESUMABLE``
    from the one saved in its folder (``saved_path``, ``config.yaml``)."""
    saved = _flat(yaml.safe_load(Path(saved_path).read_text()) or {})
    now = _flat(config_to_dict(config))

    def shown(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "(unset)"

    changed = [
        f"{key}: {shown(saved, key)} -> {shown(now, key)}"
        for key in sorted(saved.keys() | now.keys(), key=str)
        if saved.get(key) != now.get(key) and not any(fnmatch(key, p) for p in RESUMABLE)
    ]
    if changed:
        listed = "; ".join(changed[:3]) + (
            f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        raise ConfigError(
            f"--resume: this config changes what the run was trained with ({listed}); resume "
            f"with --config {saved_path} (a resumed run may change only how far it goes, its "
            "batch split, workers, paths, logging and evaluation), or start a new run"
        )


def shipped_config(name: str) -> Path:
    """A config shipped with the package (``audio.yaml`` or ``audio``): the top-level
    ``configs/`` of the source tree, installed as ``imagebind_lite.configs``."""
    file = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    # In a source tree (setup.py beside the package) its own configs/: an editable install may
    # map the installed name to another checkout's.
    tree = Path(__file__).resolve().parents[1]
    source = tree / "configs"
    try:
        if (tree / "setup.py").is_file() and source.is_dir():
            folder = source
        else:
            folder = importlib.resources.files("imagebind_lite.configs")
    except ModuleNotFoundError:
        raise ConfigError(
            "the shipped configs are not installed: install the package (pip install -e .)"
        ) from None
    path = Path(str(folder / file))
    if not path.is_file():
        known = sorted(p.name for p in Path(str(folder)).glob("*.yaml"))
        raise ConfigError(f"no shipped config {file!r}; shipped: {', '.join(known)}")
    return path


def resolve_config_arg(value: str | None, default: str | None) -> Path | None:
    """``--config``: a YAML file, else the name of a shipped config; without it, the script's
    own shipped config (None: the dataclass defaults)."""
    if value is None:
        return shipped_config(default) if default else None
    path = Path(value)
    if path.is_file() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path  # load_config names a missing file in one line
    return shipped_config(value)
