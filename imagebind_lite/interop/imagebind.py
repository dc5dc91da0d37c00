"""ImageBind checkpoints <-> ``ModalityEncoder``: load the released audio, depth, thermal and IMU
encoders of ``imagebind_huge.pth`` (or any checkpoint in its layout) and write ours back in it.

Nothing here is ImageBind's code; the mapping is rebuilt from the layout facts in
``shared/reference/imagebind.md``. Key layout of one modality ``m`` (flat fp32 state dict):

==========================  ============================================================
ours                        ImageBind
==========================  ============================================================
``stem.proj.weight``        ``modality_preprocessors.m.{stem}.proj.weight``
``stem.norm.*``             ``modality_preprocessors.m.{stem}.norm_layer.*``
``cls_token``               ``modality_preprocessors.m.cls_token``
``pos_embed``               ``modality_preprocessors.m.pos_embedding_helper.pos_embed``
                            (IMU: ``modality_preprocessors.imu.pos_embed``)
``trunk.blocks.i.*``        ``modality_trunks.m.blocks.i.*`` (same names below ``blocks.i``)
``head_norm.*``             ``modality_heads.m.0.*``
``head.weight``             ``modality_heads.m.2.weight`` (IMU: ``.3.weight``, after Dropout)
``log_logit_scale``         ``modality_postprocessors.m.1.log_logit_scale``
==========================  ============================================================

``{stem}`` is ``rgbt_stem`` for audio and thermal, ``depth_stem`` for depth, ``imu_stem`` for IMU.
These per-modality facts (stem name, head index, positional-table key, heads, how the stem's
sizes follow from its weights) are each modality's ``ModalitySpec.imagebind``
(``imagebind_lite.registry.ImageBindBranch``), in the modality's own file; this module holds
what is common to every branch.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..files import load_error_line
from ..models.build import resolve_size
from ..models.encoder import EncoderShape, ModalityEncoder
from ..registry import (
    ImageBindBranch,
    ImageBindCheckpointError,
    ModalitySpec,
    get_modality,
    list_modalities,
)

__all__ = [
    "IMAGEBIND_MODALITIES",
    "ImageBindCheckpointError",
    "ImageBindEncoderConfig",
    "MissingModalityError",
    "build_from_config",
    "export_imagebind_state_dict",
    "imagebind_key",
    "imagebind_modalities",
    "infer_imagebind_config",
    "load_imagebind_encoders",
    "load_imagebind_state_dict",
]


def imagebind_modalities() -> tuple[str, ...]:
    """The registered modalities that have a branch in ImageBind's checkpoints."""
    return tuple(n for n in list_modalities() if get_modality(n).imagebind is not None)


# The built-in ones (audio, depth, IMU, thermal), as the modalities were registered on import.
IMAGEBIND_MODALITIES = imagebind_modalities()

_BRANCH_ROOTS = (
    "modality_preprocessors",
    "modality_trunks",
    "modality_heads",
    "modality_postprocessors",
)
# Without it the modality's registry temperature stands (equal to ImageBind's fixed scales).
_OPTIONAL_OURS = ("log_logit_scale",)


class MissingModalityError(KeyError):
    """The checkpoint has no branch for a requested modality."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and escapes included
        return str(self.args[0]) if self.args else ""


@dataclass
class ImageBindEncoderConfig:
    """What the weights of one ImageBind branch say about the encoder that holds them.

    ``build_encoder(modality, embed_dim, "imagebind", overrides, preprocess)`` builds the same
    architecture whenever ``add_bias_kv`` is True and ``stem_bias`` False (always so for the
    released checkpoint), e.g. to fine-tune from ImageBind's weights with our training code;
    ``build_from_config`` covers the other cases too.
    """

    modality: str
    embed_dim: int
    overrides: dict[str, Any]
    preprocess: dict[str, Any]
    add_bias_kv: bool = True
    stem_bias: bool = False
    log_logit_scale: float | None = None


def _prefixes(modality: str) -> list[str]:
    return [f"{root}.{modality}." for root in _BRANCH_ROOTS]


def _branch_spec(modality: str) -> ImageBindBranch:
    """The modality's ``ModalitySpec.imagebind``; a clear error where there is none."""
    try:
        spec: ModalitySpec | None = get_modality(modality)
    except KeyError:
        spec = None
    if spec is not None and spec.imagebind is not None:
        return spec.imagebind
    if spec is not None and spec.is_anchor:
        raise ValueError(
            f"ImageBind's {modality} tower is OpenCLIP ViT-H-14 (laion2b_s32b_b79k), our frozen "
            f"anchor: load it through open_clip, not from an ImageBind checkpoint"
        )
    raise ValueError(
        f"unknown ImageBind modality {modality!r}; supported: {', '.join(imagebind_modalities())}"
    )


def _check_modality(modality: str) -> None:
    _branch_spec(modality)


def imagebind_key(modality: str, our_key: str) -> str:
    """ImageBind's name for one of our ``ModalityEncoder`` state-dict keys."""
    branch = _branch_spec(modality)
    pre = f"modality_preprocessors.{modality}"
    stem = f"{pre}.{branch.stem}"
    if our_key.startswith("stem.proj."):
        return f"{stem}.proj.{our_key[len('stem.proj.') :]}"
    if our_key.startswith("stem.norm."):
        return f"{stem}.norm_layer.{our_key[len('stem.norm.') :]}"
    if our_key == "cls_token":
        return f"{pre}.cls_token"
    if our_key == "pos_embed":
        return f"{pre}.{branch.pos_embed}"
    if our_key.startswith("trunk.blocks."):
        return f"modality_trunks.{modality}.blocks.{our_key[len('trunk.blocks.') :]}"
    if our_key.startswith("head_norm."):
        return f"modality_heads.{modality}.0.{our_key[len('head_norm.') :]}"
    if our_key == "head.weight":
        return f"modality_heads.{modality}.{branch.head_index}.weight"
    if our_key == "log_logit_scale":
        return f"modality_postprocessors.{modality}.1.log_logit_scale"
    raise ImageBindCheckpointError(
        f"{modality}: our key {our_key!r} has no counterpart in ImageBind's layout"
    )


def _aliases(modality: str, their_key: str) -> list[str]:
    # Other names of the positional table, in checkpoints re-saved from ports.
    branch = _branch_spec(modality)
    pre = f"modality_preprocessors.{modality}"
    if their_key != f"{pre}.{branch.pos_embed}":
        return []
    return [f"{pre}.{alias}" for alias in branch.pos_embed_aliases]


def load_imagebind_state_dict(
    path: str | os.PathLike, modalities: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling code: ``.safetensors`` through safetensors (only the
    branches of ``modalities`` are read), anything else through ``torch.load(weights_only=True)``,
    memory-mapped where the file allows so that one 86M-parameter branch of the 4.8 GB
    ``imagebind_huge.pth`` does not cost 4.8 GB of RAM."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageBind checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return _safetensors_branches(path, modalities)
        state = _torch_load(path)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ImageBindCheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {load_error_line(err)})"
        ) from err
    if not isinstance(state, Mapping):
        raise ImageBindCheckpointError(
            f"{path} holds a {type(state).__name__}, not a flat state dict of tensors"
        )
    return dict(state)


def _safetensors_branches(path: str, modalities: Iterable[str] | None) -> dict:
    wanted = tuple(p for m in (modalities or ()) for p in _prefixes(m))
    with safe_open(path, framework="pt", device="cpu") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        return {k: f.get_tensor(k) for k in names if modalities is None or k.startswith(wanted)}


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (pre-zip) torch.save files cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def _branch_keys(state_dict: Mapping[str, Any], modality: str) -> list[str]:
    prefixes = tuple(_prefixes(modality))
    return [k for k in state_dict if k.startswith(prefixes)]


def _tensor(state_dict: Mapping[str, Any], key: str, modality: str, what: str) -> torch.Tensor:
    if key not in state_dict:
        raise ImageBindCheckpointError(
            f"{modality}: the checkpoint has no {key!r}, needed to infer the {what}"
        )
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise ImageBindCheckpointError(f"{modality}: {key!r} is a {type(value).__name__}")
    return value


def _per_modality(value: Any, modality: str, default: Any = None) -> Any:
    if isinstance(value, Mapping):
        return value.get(modality, default)
    return default if value is None else value


def _check_per_modality(name: str, value: Any, nested: bool = False) -> None:
    # A flat preprocess dict ({"num_mel_bins": 64}) or a typo'd modality would otherwise be
    # ignored without a word and the defaults used.
    if not isinstance(value, Mapping):
        if nested and value is not None:
            raise TypeError(f"{name} must map modality -> options, got {type(value).__name__}")
        return
    supported = imagebind_modalities()
    unknown = [k for k in value if k not in supported]
    if unknown:
        raise ValueError(
            f"{name} is keyed by modality ({', '.join(supported)}); got keys "
            f"{unknown}" + (f", e.g. {name}={{'audio': {{...}}}}" if nested else "")
        )


def _stem_fields(
    modality: str,
    state_dict: Mapping[str, Any],
    tokens: int,
    preprocess: Mapping[str, Any],
    stride: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(size fields, preprocessing options) that make the registry's stem fit the weights:
    the modality's own ``ImageBindBranch.stem_from_weights`` reads them off the projection."""
    proj_key = imagebind_key(modality, "stem.proj.weight")
    proj = _tensor(state_dict, proj_key, modality, "stem")
    read = _branch_spec(modality).stem_from_weights
    return read(modality, proj, proj_key, tokens, preprocess, _per_modality(stride, modality))


def _token_table(state_dict: Mapping[str, Any], modality: str) -> tuple[str, int, int]:
    """(key of the positional table, width, patch tokens) from the table and the CLS token."""
    pos_key = imagebind_key(modality, "pos_embed")
    if pos_key not in state_dict:
        pos_key = next((a for a in _aliases(modality, pos_key) if a in state_dict), pos_key)
    pos = _tensor(state_dict, pos_key, modality, "token count")
    cls = _tensor(state_dict, imagebind_key(modality, "cls_token"), modality, "CLS token")
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ImageBindCheckpointError(
            f"{modality}: {pos_key} has shape {list(pos.shape)}; expected [1, tokens, width]"
        )
    if cls.ndim != 3 or cls.shape[:2] != (1, 1):
        raise ImageBindCheckpointError(
            f"{modality}: cls_token has shape {list(cls.shape)}; one CLS token [1, 1, width] "
            f"is supported"
        )
    return pos_key, int(pos.shape[2]), int(pos.shape[1]) - 1


def _trunk_shape(
    state_dict: Mapping[str, Any], branch: list[str], modality: str, width: int
) -> tuple[int, bool, float]:
    """(depth, add_bias_kv, mlp_ratio) of the branch's transformer blocks."""
    block_re = re.compile(rf"^modality_trunks\.{re.escape(modality)}\.blocks\.(\d+)\.")
    indices = {int(m.group(1)) for k in branch if (m := block_re.match(k))}
    # max + 1, not len: a gap then shows up as missing keys in the strict check.
    depth = max(indices) + 1 if indices else 0
    if not depth:
        return 0, True, 4.0
    block = f"modality_trunks.{modality}.blocks.0"
    fc1 = _tensor(state_dict, f"{block}.mlp.fc1.weight", modality, "MLP width")
    mlp_ratio = fc1.shape[0] / width
    if int(width * mlp_ratio) != fc1.shape[0]:
        raise ImageBindCheckpointError(
            f"{modality}: MLP hidden size {fc1.shape[0]} is not reachable as int({width} * ratio)"
        )
    return depth, f"{block}.attn.bias_k" in state_dict, mlp_ratio


def _heads(num_heads: Any, modality: str, width: int, pos_key: str, pos_shape: list) -> int:
    # Attention heads cannot be read off the weights (in_proj is [3D, D] whatever the split):
    # the default is the released model's, from the modality's ImageBindBranch.
    released = _branch_spec(modality).heads
    heads = _per_modality(num_heads, modality, released)
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise ImageBindCheckpointError(
            f"{modality}: width {width} (from {pos_key} {pos_shape}) is not divisible by "
            f"{heads!r} attention heads; pass num_heads={{'{modality}': n}} with n dividing "
            f"{width} (imagebind_huge uses {released})"
        )
    return heads


def infer_imagebind_config(
    state_dict: Mapping[str, Any],
    modality: str,
    num_heads: int | Mapping[str, int] | None = None,
    preprocess: Mapping[str, Mapping[str, Any]] | None = None,
    stride: int | Mapping[str, int] | None = None,
) -> ImageBindEncoderConfig:
    """Read width, depth, MLP ratio, token count, stem kernel, embedding dim, ``add_bias_kv`` and
    the logit scale of one modality's branch off its tensor shapes.

    Heads cannot be inferred: ``num_heads`` (int, or per modality) defaults to imagebind_huge's.
    The audio stride follows from the token count and the fbank size (default 128x204, override
    with ``preprocess={"audio": {...}}``) unless ``stride`` is given; the depth/thermal image
    size follows from the token count unless ``preprocess`` gives ``image_size``.
    """
    _check_modality(modality)
    _check_per_modality("num_heads", num_heads)
    _check_per_modality("preprocess", preprocess, nested=True)
    _check_per_modality("stride", stride)
    branch = _branch_keys(state_dict, modality)
    if not branch:
        raise MissingModalityError(
            f"the checkpoint has no {modality!r} branch: no key starts with any of "
            f"{', '.join(repr(p) for p in _prefixes(modality))}"
        )
    user_pre = dict(_per_modality(preprocess, modality, {}) or {})
    pos_key, width, tokens = _token_table(state_dict, modality)
    depth, add_bias_kv, mlp_ratio = _trunk_shape(state_dict, branch, modality, width)
    pos_shape = list(state_dict[pos_key].shape)
    heads = _heads(num_heads, modality, width, pos_key, pos_shape)
    head_key = imagebind_key(modality, "head.weight")
    head = _tensor(state_dict, head_key, modality, "embedding dim")
    if head.ndim != 2:
        raise ImageBindCheckpointError(
            f"{modality}: {head_key} has shape {list(head.shape)}; expected [embed_dim, width]"
        )
    stem_fields, options = _stem_fields(modality, state_dict, tokens, user_pre, stride)
    scale_key = imagebind_key(modality, "log_logit_scale")
    return ImageBindEncoderConfig(
        modality=modality,
        embed_dim=int(head.shape[0]),
        overrides={
            "width": width,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            **stem_fields,
        },
        preprocess={**user_pre, **options},
        add_bias_kv=add_bias_kv,
        stem_bias=imagebind_key(modality, "stem.proj.bias") in state_dict,
        log_logit_scale=float(state_dict[scale_key]) if scale_key in state_dict else None,
    )


def _give_stem_bias(stem: nn.Module) -> None:
    # Neither ImageBind nor the registry's stems have a projection bias; a checkpoint that does
    # (a port, a fine-tune) still loads exactly with a biased projection of the same shape.
    old = stem.proj
    if isinstance(old, nn.Conv2d):
        stem.proj = nn.Conv2d(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, bias=True
        )
    elif isinstance(old, nn.Linear):
        stem.proj = nn.Linear(old.in_features, old.out_features, bias=True)
    else:
        raise ImageBindCheckpointError(f"cannot add a bias to a {type(old).__name__} stem")


def build_from_config(
    config: ImageBindEncoderConfig, imagebind_scaling: bool = False
) -> ModalityEncoder:
    """An untrained ``ModalityEncoder`` shaped like the branch ``config`` describes."""
    modality = config.modality
    spec = get_modality(modality)
    fields = resolve_size(modality, "imagebind", config.overrides)
    options = {**spec.preprocess, **config.preprocess}
    stem = spec.build_stem(fields, options)
    if config.stem_bias:
        _give_stem_bias(stem)
    shape = EncoderShape(
        width=fields["width"],
        depth=fields["depth"],
        heads=fields["heads"],
        embed_dim=config.embed_dim,
        mlp_ratio=fields.get("mlp_ratio", 4.0),
        drop_path=fields.get("drop_path", 0.0),
        add_bias_kv=config.add_bias_kv,
        head_dropout=spec.head_dropout,
    )
    temperature = (
        spec.temperature if config.log_logit_scale is None else math.exp(-config.log_logit_scale)
    )
    return ModalityEncoder(
        stem,
        shape,
        temperature=temperature,
        sample_ndim=spec.sample_ndim,
        imagebind_scaling=imagebind_scaling,
    )


def _load_branch(encoder: ModalityEncoder, state_dict: Mapping[str, Any], modality: str) -> None:
    """Fill every parameter and buffer of ``encoder`` from the branch, using every key of it."""
    ours = encoder.state_dict()
    branch = set(_branch_keys(state_dict, modality))
    picked: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for our_key, target in ours.items():
        their_key = imagebind_key(modality, our_key)
        candidates = [their_key, *_aliases(modality, their_key)]
        found = next((k for k in candidates if k in state_dict), None)
        if found is None:
            if our_key not in _OPTIONAL_OURS:
                missing.append(their_key)
            continue
        used.add(found)
        value = state_dict[found]
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{found}: a {type(value).__name__}, not a tensor")
        elif value.shape != target.shape:
            mismatched.append(
                f"{found}: checkpoint {list(value.shape)}, encoder {list(target.shape)} "
                f"(ours: {our_key})"
            )
        else:
            picked[our_key] = value
    unexpected = sorted(branch - used)
    if missing or unexpected or mismatched:
        lines = [f"{modality}: the checkpoint's branch does not fit the inferred encoder"]
        if missing:
            lines.append("  missing keys: " + ", ".join(sorted(missing)))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("  shape mismatches:\n    " + "\n    ".join(mismatched))
        raise ImageBindCheckpointError("\n".join(lines))
    encoder.load_state_dict(picked, strict=False)


def load_imagebind_encoders(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    modalities: Iterable[str] = ("audio", "depth", "thermal"),
    num_heads: int | Mapping[str, int] | None = None,
    imagebind_scaling: bool = False,
    preprocess: Mapping[str, Mapping[str, Any]] | None = None,
    stride: int | Mapping[str, int] | None = None,
) -> dict[str, ModalityEncoder]:
    """ImageBind's encoders for ``modalities`` as ``ModalityEncoder``s, in eval mode.

    ``state_dict_or_path``: a flat state dict in ImageBind's layout, or a ``.pth``/``.pt``
    (read with ``weights_only=True``) or ``.safetensors`` file. Each encoder takes ImageBind's
    input for its modality (audio ``[B, 1, 128, 204]`` or ``[B, clips, 1, 128, 204]``, depth and
    thermal ``[B, 1, H, W]``, IMU ``[B, 6, 2000]``) and returns ``[B, E]``:
    ``imagebind_scaling=True`` gives ImageBind's output exactly (normalised, times the fixed
    logit scale, clips averaged after scaling); False gives unit vectors.

    ``num_heads``: int for all, or per modality; defaults to imagebind_huge's (audio 12, depth 8,
    thermal 12, IMU 8). A wrong count that still divides the width cannot be detected from the
    weights and gives wrong outputs. ``preprocess`` (per modality) and ``stride`` (int or per
    modality) pin input sizes that the weights leave open; see ``infer_imagebind_config``.
    ImageBind caps its output scale at 100; the released scales (20, 5, 10, 5) are far below,
    and the loaded ``log_logit_scale`` is used as is.

    Loading is strict: every key of each requested branch is used, every parameter is filled,
    every shape matches, or ``ImageBindCheckpointError`` lists what did not.
    """
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    for modality in modalities:
        _check_modality(modality)
    _check_per_modality("num_heads", num_heads)
    _check_per_modality("preprocess", preprocess, nested=True)
    _check_per_modality("stride", stride)
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict = load_imagebind_state_dict(state_dict_or_path, modalities)
    elif isinstance(state_dict_or_path, Mapping):
        state_dict = state_dict_or_path
    else:
        raise TypeError(
            f"expected a state dict or a checkpoint path, got {type(state_dict_or_path).__name__}"
        )
    encoders = {}
    for modality in modalities:
        config = infer_imagebind_config(state_dict, modality, num_heads, preprocess, stride)
        encoder = build_from_config(config, imagebind_scaling)
        _load_branch(encoder, state_dict, modality)
        encoders[modality] = encoder.eval()
    return encoders


def export_imagebind_state_dict(
    encoders: Mapping[str, ModalityEncoder],
) -> dict[str, torch.Tensor]:
    """Our encoders' weights under ImageBind's key names (the inverse of
    ``load_imagebind_encoders``): a flat state dict with one branch per modality, contiguous
    copies that share no storage with the modules."""
    out: dict[str, torch.Tensor] = {}
    for modality, encoder in encoders.items():
        _check_modality(modality)
        if not isinstance(encoder, ModalityEncoder):
            raise TypeError(f"{modality}: expected a ModalityEncoder, got {type(encoder).__name__}")
        expected_stem = _branch_spec(modality).stem_type
        if not isinstance(encoder.stem, expected_stem):
            raise ImageBindCheckpointError(
                f"{modality}: ImageBind's layout needs a {expected_stem.__name__} stem, this "
                f"encoder has a {type(encoder.stem).__name__}"
            )
        for our_key, value in encoder.state_dict().items():
            out[imagebind_key(modality, our_key)] = value.detach().clone().contiguous()
    return out
