"""Encoders of registered modalities: a spec's named size -> a ``ModalityEncoder``."""

from __future__ import annotations

from typing import Any

from ..registry import get_modality
from .encoder import EncoderShape, ModalityEncoder

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
    patch_dropout: float = 0.0,
) -> ModalityEncoder:
    """Build the encoder of a registered modality at a named size, projecting to ``embed_dim``;
    ``patch_dropout``: FLIP's token dropping in training (``PatchDropout``)."""
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
        patch_dropout=patch_dropout,
    )
    return ModalityEncoder(
        stem,
        shape,
        temperature=temperature or spec.temperature,
        sample_ndim=spec.sample_ndim,
        imagebind_scaling=imagebind_scaling,
    )


def stem_tokens(
    modality: str,
    size: str = "tiny",
    overrides: dict[str, Any] | None = None,
    preprocess: dict[str, Any] | None = None,
) -> int:
    """The tokens the modality's stem makes at a size (CLS not counted), without the trunk."""
    spec = get_modality(modality)
    if spec.is_anchor or spec.build_stem is None:
        raise ValueError(f"{modality!r} is an anchor modality: its tower comes from the anchor")
    stem = spec.build_stem(
        resolve_size(modality, size, overrides), {**spec.preprocess, **(preprocess or {})}
    )
    return int(getattr(stem, "num_tokens", 0))
