"""The modality registry: every modality is data (a ``ModalitySpec``), not a code path.

A spec says how raw input becomes tokens (the stem), the trunk sizes, the head (LayerNorm ->
CLS -> bias-free Linear into the anchor's dimension, built by ``ModalityEncoder``), and the
postprocessor (L2 normalisation, fixed temperature).

This module is a leaf: it imports nothing of the package, so every layer can read the
registry. The built-in modalities (one file each in ``imagebind_lite/modalities/``) are
registered by ``imagebind_lite.builtins``, which importing ``imagebind_lite`` runs; a researcher
adds one from any file with ``register_modality`` (``docs/extending.md``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    # path -> tensor of one sample, with preprocessing options: the modality's file reader.
    load: Callable[..., Any] | None = None
    # (tensor, train: bool, options) -> tensor: training augmentation / eval transform.
    augment: Callable[..., Any] | None = None
    is_anchor: bool = False
    description: str = ""
    # Its place in ImageBind's checkpoints (None: ImageBind has no such encoder).
    imagebind: ImageBindBranch | None = None


_REGISTRY: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec, overwrite: bool = False) -> ModalitySpec:
    existing = _REGISTRY.get(spec.name)
    if existing is not None and not overwrite:
        # The same file imported twice (a test module, then a saved model's copy of it)
        # registers the same modality again: accept it; a different one is a clash.
        same_origin = (
            getattr(existing.build_stem, "__qualname__", None)
            == getattr(spec.build_stem, "__qualname__", None)
            and existing.sizes == spec.sizes
        )
        if not same_origin:
            raise ValueError(f"modality {spec.name!r} is already registered")
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
