"""The modality registry: every modality is data (a ``ModalitySpec``), not a code path.

A spec says how raw input becomes tokens (the stem), the trunk sizes, the head (LayerNorm ->
CLS -> bias-free Linear into the anchor's dimension, built by ``ModalityEncoder``), and the
postprocessor (L2 normalisation, fixed temperature). Built-in modalities live one per file in
this package; a researcher adds one from any file with ``register_modality`` (see README,
"Add a modality in one file").
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

from torch import nn

from ..models.encoder import EncoderShape, ModalityEncoder


@dataclass
class ModalitySpec:
    name: str
    temperature: float
    # Named sizes: each maps to trunk fields (width, depth, heads, mlp_ratio, drop_path) and
    # stem fields (anything ``build_stem`` reads, e.g. kernel, stride).
    sizes: dict[str, dict[str, Any]]
    # (size fields, preprocessing options) -> stem module with ``num_tokens``.
    build_stem: Callable[[dict[str, Any], dict[str, Any]], nn.Module] | None
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


TRUNK_FIELDS = ("width", "depth", "heads", "mlp_ratio", "drop_path")


def resolve_size(modality: str, size: str, overrides: dict[str, Any] | None = None) -> dict:
    spec = get_modality(modality)
    if size not in spec.sizes:
        raise KeyError(
            f"modality {modality!r} has no size {size!r}; known: {', '.join(spec.sizes)}"
        )
    fields = dict(spec.sizes[size])
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return fields


def build_encoder(
    modality: str,
    embed_dim: int,
    size: str = "tiny",
    overrides: dict[str, Any] | None = None,
    preprocess: dict[str, Any] | None = None,
    temperature: float | None = None,
    grad_checkpointing: bool = False,
    imagebind_scaling: bool = False,
) -> ModalityEncoder:
    """Build the encoder of a registered modality at a named size, projecting to ``embed_dim``."""
    spec = get_modality(modality)
    if spec.is_anchor or spec.build_stem is None:
        raise ValueError(f"{modality!r} is an anchor modality: its tower comes from the anchor")
    fields = resolve_size(modality, size, overrides)
    options = {**spec.preprocess, **(preprocess or {})}
    stem = spec.build_stem(fields, options)
    shape = EncoderShape(
        width=fields["width"],
        depth=fields["depth"],
        heads=fields["heads"],
        embed_dim=embed_dim,
        mlp_ratio=fields.get("mlp_ratio", 4.0),
        drop_path=fields.get("drop_path", 0.0),
        add_bias_kv=spec.add_bias_kv,
        head_dropout=spec.head_dropout,
        grad_checkpointing=grad_checkpointing,
    )
    return ModalityEncoder(
        stem,
        shape,
        temperature=temperature or spec.temperature,
        sample_ndim=spec.sample_ndim,
        imagebind_scaling=imagebind_scaling,
    )


# Built-in modalities register themselves on import.
from . import anchor_towers, audio, depth, imu, pen, thermal  # noqa: E402,F401
