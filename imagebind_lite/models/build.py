"""Encoders of registered modalities: a spec's named size -> a ``ModalityEncoder``."""

from __future__ import annotations

from typing import Any

from ..registry import ModalitySpec, get_modality
from .encoder import EncoderShape, ModalityEncoder, PatchStem

TRUNK_FIELDS = ("width", "depth", "heads", "mlp_ratio", "drop_path")
# An encoder laid out as an open_clip image tower (``encoder.init=anchor``): what the model
# folder's ``architecture`` records, so that it rebuilds without the anchor.
ARCHITECTURE_FIELDS = (
    "width",
    "depth",
    "heads",
    "mlp_width",
    "patch",
    "norm_eps",
    "act",
    "ln_pre",
    "drop_path",
)


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
    architecture: dict[str, Any] | None = None,
    patch_dropout: float = 0.0,
) -> ModalityEncoder:
    """Build the encoder of a registered modality at a named size, projecting to ``embed_dim``;
    ``patch_dropout``: FLIP's token dropping in training (``PatchDropout``).

    ``architecture`` (``ARCHITECTURE_FIELDS``, from ``models.anchor_init.anchor_architecture``
    or a model folder) lays it out as an open_clip image tower instead, on the modality's
    ``image_shape``; ``size`` and ``overrides`` are then not used. The encoder keeps it as
    ``encoder.architecture`` (None otherwise) and ``save_model`` records it."""
    spec = get_modality(modality)
    if spec.is_anchor or spec.build_stem is None:
        raise ValueError(f"{modality!r} is an anchor modality: its tower comes from the anchor")
    options = {**spec.preprocess, **(preprocess or {})}
    if architecture is not None:
        stem, shape = _tower_layout(spec, embed_dim, architecture, options, grad_checkpointing)
    else:
        fields = resolve_size(modality, size, overrides)
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
    shape.patch_dropout = patch_dropout
    encoder = ModalityEncoder(
        stem,
        shape,
        temperature=temperature or spec.temperature,
        sample_ndim=spec.sample_ndim,
        imagebind_scaling=imagebind_scaling,
    )
    encoder.architecture = dict(architecture) if architecture is not None else None
    return encoder


def _tower_layout(
    spec: ModalitySpec, embed_dim: int, arch: dict, options: dict, grad_checkpointing: bool
) -> tuple[PatchStem, EncoderShape]:
    """An open_clip ViT's layout on the modality's image: a bias-free patch conv without a norm
    (stride = patch), then ``ln_pre`` after the positional embedding, blocks without the extra
    key/value token, the tower's LayerNorm eps and activation."""
    missing = [name for name in ARCHITECTURE_FIELDS if name not in arch]
    if missing:
        raise ValueError(f"architecture of {spec.name!r} lacks {', '.join(missing)}")
    if spec.image_shape is None:
        raise ValueError(f"{spec.name!r} is not image-shaped: it has no open_clip tower layout")
    chans, height, width = spec.image_shape(options)
    patch = tuple(arch["patch"])
    stem = PatchStem(chans, arch["width"], (height, width), patch, patch, norm=False)
    shape = EncoderShape(
        width=arch["width"],
        depth=arch["depth"],
        heads=arch["heads"],
        embed_dim=embed_dim,
        mlp_ratio=arch["mlp_width"] / arch["width"],
        drop_path=arch["drop_path"],
        add_bias_kv=False,
        head_dropout=spec.head_dropout,
        grad_checkpointing=grad_checkpointing,
        norm_eps=arch["norm_eps"],
        act=arch["act"],
        mlp_width=arch["mlp_width"],
        ln_pre=arch["ln_pre"],
    )
    return stem, shape


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
