"""The modality registry: every modality is data (a ``ModalitySpec``), not a code path.

A spec says how raw input becomes tokens (the stem), the trunk sizes, the head (LayerNorm ->
CLS -> bias-free Linear into the anchor's dimension, built by ``ModalityEncoder``), the
postprocessor (L2 normalisation, fixed temperature), and every way the rest of the library
treats the modality differently from another: its file reader, how a dataset column becomes a
tensor, whether it is cropped together with the RGB image, its normalisation statistics, what
it sees of the synthetic scenes, its default prompt templates, its place in ImageBind's
checkpoints. Nothing outside ``imagebind_lite/modalities/`` asks a modality for its name to
decide what to do (``tests/test_architecture.py`` checks it).

This module is a leaf: it imports nothing of the package, so every layer can read the
registry. The built-in modalities (one file each in ``imagebind_lite/modalities/``) are
registered by ``imagebind_lite.builtins``, which importing ``imagebind_lite`` runs; a researcher
adds one from any file with ``register_modality`` (``docs/extending.md``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The anchor's towers (``ModalitySpec.anchor_tower``).
IMAGE_TOWER = "image"
TEXT_TOWER = "text"
ANCHOR_TOWERS = (IMAGE_TOWER, TEXT_TOWER)

# Class-prompt templates of a dataset that names classes but gives no templates.
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ImageBindCheckpointError(ValueError):
    """The checkpoint's branch for a modality does not fit the encoder it describes.

    Defined here (and re-exported by ``imagebind_lite.interop.imagebind``) so that a modality
    file's ``ImageBindBranch.stem_from_weights`` can raise it without importing the interop layer.
    """


@dataclass(frozen=True)
class ImageBindBranch:
    """Where one modality's encoder sits in ImageBind's checkpoints (``imagebind_huge.pth``).

    Keys of a branch: ``modality_preprocessors.<name>.<stem>.proj.weight``, ``.<pos_embed>``,
    ``modality_trunks.<name>.blocks.i.*``, ``modality_heads.<name>.<head_index>.weight``, ...
    (``imagebind_lite.interop.imagebind`` has the whole table).
    """

    # The stem's module name under modality_preprocessors.<name> (rgbt_stem, depth_stem, ...).
    stem: str
    # Attention heads of the released model: the weights cannot tell them.
    heads: int
    # The stem class whose weights map onto ImageBind's (export refuses any other).
    stem_type: type
    # (modality name, projection weight, its ImageBind key, patch tokens, preprocessing
    # options given, stride given or None) -> (size fields, preprocessing options) that make
    # ``build_stem`` fit the weights; raises ImageBindCheckpointError when nothing fits.
    stem_from_weights: Callable[..., tuple[dict[str, Any], dict[str, Any]]]
    # Index of the Linear in modality_heads.<name> (2, after LayerNorm and CLS selection).
    head_index: int = 2
    # The positional table under modality_preprocessors.<name>, and other names ports use.
    pos_embed: str = "pos_embedding_helper.pos_embed"
    pos_embed_aliases: tuple[str, ...] = ()
    # Preprocessing options that give the released encoder the input it was trained on.
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModalitySpec:
    name: str
    temperature: float
    # Named sizes: each maps to trunk fields (width, depth, heads, mlp_ratio, drop_path) and
    # stem fields (anything ``build_stem`` reads, e.g. kernel, stride).
    sizes: dict[str, dict[str, Any]]
    # (size fields, preprocessing options) -> stem module with ``num_tokens``.
    build_stem: Callable[[dict[str, Any], dict[str, Any]], Any] | None
    # Number of dims of one sample, e.g. 3 for [1, mel, frames]; one more means several clips.
    sample_ndim: int = 3
    add_bias_kv: bool = True
    head_dropout: float = 0.0
    # Preprocessing defaults (sample rate, mel bins, normalisation, ...); configs override them.
    preprocess: dict[str, Any] = field(default_factory=dict)
    # path -> tensor of one sample, with preprocessing options: the modality's file reader,
    # and its evaluation transform (a finished model input).
    load: Callable[..., Any] | None = None
    # (tensor, train: bool, options) -> tensor: training augmentation (identity when not train).
    augment: Callable[..., Any] | None = None
    # The anchor's own modalities: their towers come from the frozen CLIP, not from a stem.
    is_anchor: bool = False
    # Which tower of the anchor encodes it: IMAGE_TOWER or TEXT_TOWER (anchor modalities only).
    anchor_tower: str | None = None
    description: str = ""
    # Other names for it in inputs such as ``image:photo.png``.
    aliases: tuple[str, ...] = ()
    # File suffixes (lower case, with the dot) that say a file is of this modality when an
    # input names none; leave empty when a suffix is ambiguous (a depth PNG is also an image).
    extensions: tuple[str, ...] = ()
    # How a dataset column becomes a tensor: (source: a Path or a data.bad_input.Blob,
    # options) -> tensor, raising data.datasets.BadSample with a reason for bad input. None:
    # ``load(path, **options)``, a shard member going through a temporary file.
    load_source: Callable[[Any, dict[str, Any]], Any] | None = None
    # An image spatially aligned with the RGB frame (depth, thermal): (sources by key, record
    # meta, options) -> (raw values [1, H, W], valid-pixel mask or None). Datasets then crop and
    # flip both images identically (data.transforms.PairedTransform), centre-crop both for
    # evaluation, and standardise this side with ``normaliser``. None: not aligned.
    read_aligned: Callable[[dict, dict, dict], tuple[Any, Any]] | None = None
    # options -> (tensor -> standardised tensor) for the aligned image.
    normaliser: Callable[[dict[str, Any]], Callable[[Any], Any]] | None = None
    # Normalisation statistics measured on the training set (train/compute_stats.py ->
    # stats.json): options -> the options the statistics depend on (recorded beside them, and
    # checked when they are read). None: the modality takes no dataset statistics.
    stats_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # What the modality sees of a synthetic scene (data.scenes.render_scenes and the probes'
    # renderer give rgb, depth, thermal): scenes -> raw input batch, before standardisation.
    scene_input: Callable[[dict], Any] | None = None
    # Prompt templates for zero-shot classification of datasets that give none.
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # Its place in ImageBind's checkpoints (None: ImageBind has no such encoder).
    imagebind: ImageBindBranch | None = None
    # options -> (channels, height, width) of one sample, when it is an image that a ViT
    # patchifies (an fbank, a depth map): ``encoder.init=anchor`` then starts the encoder from
    # the anchor's image tower. None: not image-shaped (a time series), and it refuses.
    image_shape: Callable[[dict[str, Any]], tuple[int, int, int]] | None = None
    # ``data.preprocess.features_on: device``: (batch of what ``load_source`` emits with that
    # option, options, train, generator) -> model input batch, computed on the batch's device
    # with training augmentation when ``train``. None: features are made in the workers only.
    device_features: Callable[..., Any] | None = None
    # Feature shards (train/write_shards.py --features): options -> the preprocessing options
    # stored features depend on (recorded in the shards, checked when they are read). None: the
    # modality's features cannot be stored.
    feature_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self):
        if self.anchor_tower is not None:
            if self.anchor_tower not in ANCHOR_TOWERS:
                raise ValueError(
                    f"modality {self.name!r}: anchor_tower must be one of {ANCHOR_TOWERS}, "
                    f"got {self.anchor_tower!r}"
                )
            self.is_anchor = True
        self.templates = tuple(self.templates)
        self.extensions = tuple(e.lower() for e in self.extensions)
        self.aliases = tuple(self.aliases)


_REGISTRY: dict[str, ModalitySpec] = {}


def _hash_code(code: types.CodeType, h) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(repr(const).encode())


def _hash_callable(fn: Any, h) -> None:
    """What a function (or a class's methods, or a partial) computes, not where it lives."""
    if isinstance(fn, functools.partial):
        _hash_callable(fn.func, h)
        h.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
    elif isinstance(fn, type):
        for name, member in sorted(vars(fn).items()):
            if callable(member) and hasattr(member, "__code__"):
                h.update(name.encode())
                _hash_code(member.__code__, h)
    elif hasattr(fn, "__code__"):
        _hash_code(fn.__code__, h)
    else:
        h.update(repr(type(fn)).encode())


def definition_digest(spec: ModalitySpec) -> str:
    """The same modality defined by the same code (a module imported twice, or a saved model's
    copy of its file) has the same digest; any other definition has another, lambdas included."""
    h = hashlib.sha256()
    h.update(repr((spec.sizes, spec.preprocess, spec.temperature, spec.sample_ndim)).encode())
    for fn in (spec.build_stem, spec.load, spec.augment, spec.load_source, spec.read_aligned):
        h.update(b"|")
        if fn is not None:
            _hash_callable(fn, h)
    return h.hexdigest()


def register_modality(spec: ModalitySpec, overwrite: bool = False) -> ModalitySpec:
    existing = _REGISTRY.get(spec.name)
    if existing is not None and not overwrite:
        # The same definition registered again is accepted; a different one is a clash.
        if definition_digest(existing) != definition_digest(spec):
            raise ValueError(
                f"modality {spec.name!r} is already registered by other code; pass "
                "overwrite=True to replace it"
            )
    _REGISTRY[spec.name] = spec
    return spec


def get_modality(name: str) -> ModalitySpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown modality {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_modalities(trainable_only: bool = False) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if not (trainable_only and s.is_anchor))


def resolve_alias(name: str) -> str:
    """A modality name, in any case, or one of a spec's ``aliases`` -> the registered name;
    any other string comes back as it is."""
    if name in _REGISTRY:
        return name
    key = name.lower()
    if key in _REGISTRY:
        return key
    for spec in _REGISTRY.values():
        if key in spec.aliases:
            return spec.name
    return name


def anchor_tower_of(name: str) -> str | None:
    """The anchor tower that encodes modality ``name`` (IMAGE_TOWER, TEXT_TOWER); None for a
    trained modality or a name that is not registered."""
    spec = _REGISTRY.get(name)
    return None if spec is None else spec.anchor_tower


def modality_of_suffix(suffix: str) -> str | None:
    """The modality whose ``extensions`` hold ``suffix`` (e.g. ``.wav``), or None."""
    suffix = suffix.lower()
    for spec in _REGISTRY.values():
        if suffix in spec.extensions:
            return spec.name
    return None


def import_modality_file(path: str | Path) -> None:
    """Import a user's modality file (or dotted module) so that its ``register_modality`` runs."""
    path = str(path)
    if path.endswith(".py"):
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"modality file not found: {file}")
        digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:10]
        name = f"imagebind_lite_user_{file.stem}_{digest}"  # saved models all use modality.py
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(path)
