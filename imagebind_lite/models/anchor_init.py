"""``encoder.init=anchor``: a new modality's encoder started from the anchor's image tower.

ViT-Lens and LanguageBind start each new modality from the anchor's own pretrained image
tower. Here an open_clip ``VisionTransformer`` (``anchor.model.visual``) is mapped onto the
project's own ``ModalityEncoder`` (its blocks keep drop path, gradient checkpointing and the
fused attention):

==============================  ===============================================================
open_clip                       ``ModalityEncoder``
==============================  ===============================================================
``conv1.weight`` [W, 3, p, p]   ``stem.proj.weight`` [W, C, p, p]: summed over RGB and shared
                                equally by the C input channels (a 3-channel input: copied), so
                                an input with C equal channels gives the anchor's patch tokens
``class_embedding``             ``cls_token``
``positional_embedding``        ``pos_embed``: CLS position kept, the grid resized (bicubic, as
                                open_clip's ``resize_pos_embed``) to the modality's token grid
``ln_pre``                      ``ln_pre`` (LayerNorm over all tokens after the positions)
``transformer.resblocks.i``     ``trunk.blocks.i``: ``ln_1``/``ln_2`` -> ``norm_1``/``norm_2``,
                                ``attn.*`` (same names), ``mlp.c_fc``/``c_proj`` -> ``fc1``/``fc2``
``ln_post``                     ``head_norm``
``proj`` [W, D]                 ``head.weight`` [D, W] (the anchor's embedding dim)
==============================  ===============================================================

The architecture (width, depth, heads, MLP width, patch, LayerNorm eps, activation) comes from
the tower and is recorded in the model folder (``architecture``), so a saved encoder loads
without the anchor. Refused, in one line naming ``encoder.init``: a tower that is not such a ViT
(ModifiedResNet, timm, attentional pooling, layer scale, custom blocks), a modality whose input
is not image-shaped (``ModalitySpec.image_shape`` is None: IMU, pen), architecture overrides,
and an anchor cache whose anchor has no weights to start from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..registry import get_modality
from .build import resolve_size
from .encoder import ModalityEncoder
from .trainable import TRAINABLE_MODES, set_trainable

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer

# open_clip (all of torchvision, ~2 s) is imported in the functions that use it: only for
# encoder.init=anchor, where the anchor has been built (and so imported it) anyway.

INIT_MODES = ("random", "anchor")
WHERE = "encoder.init=anchor"


def check_encoder_options(cfg) -> None:
    """``encoder.init``, ``encoder.trainable`` and LoRA's settings, before anything is built
    (the anchor's model config must be registered: after ``validate_anchor_config``)."""
    if cfg.encoder.init not in INIT_MODES:
        raise ConfigError(
            f"encoder.init: expected {' or '.join(INIT_MODES)}, got {cfg.encoder.init!r}"
        )
    if cfg.encoder.trainable not in TRAINABLE_MODES:
        raise ConfigError(
            f"encoder.trainable: expected {', '.join(TRAINABLE_MODES)}, "
            f"got {cfg.encoder.trainable!r}"
        )
    if cfg.encoder.lora_rank < 1 or cfg.encoder.lora_alpha <= 0:
        raise ConfigError(
            f"encoder.lora_rank / encoder.lora_alpha: must be at least 1 / positive, got "
            f"{cfg.encoder.lora_rank} / {cfg.encoder.lora_alpha}"
        )
    if cfg.encoder.init != "anchor":
        return
    spec = get_modality(cfg.modality)
    if spec.image_shape is None:
        raise ConfigError(
            f"{WHERE}: modality {cfg.modality!r} is not image-shaped ({spec.sample_ndim}-d "
            "samples, no ModalitySpec.image_shape): the anchor's image tower cannot map onto "
            "it; use encoder.init=random"
        )
    fixed = sorted(set(cfg.encoder.overrides) - {"drop_path"})
    if fixed:
        raise ConfigError(
            f"{WHERE}: the anchor's tower fixes the architecture; encoder.overrides may only set "
            f"drop_path, not {', '.join(fixed)}"
        )
    if cfg.anchor.cache and cfg.anchor.pretrained is None:
        raise ConfigError(
            f"{WHERE}: anchor.cache holds only embeddings and anchor.pretrained is null, so "
            "there are no anchor weights to start from; set anchor.pretrained"
        )
    import open_clip

    vision = (open_clip.get_model_config(cfg.anchor.model) or {}).get("vision_cfg", {})
    kind = "a timm" if vision.get("timm_model_name") else None
    if isinstance(vision.get("layers"), (list, tuple)):
        kind = "a ModifiedResNet"
    if kind:
        raise ConfigError(
            f"{WHERE}: anchor {cfg.anchor.model} has {kind} image tower, not an open_clip "
            "VisionTransformer; use encoder.init=random or a ViT anchor"
        )


def init_architecture(cfg, anchor) -> dict[str, Any] | None:
    """The architecture to build (``build_encoder(architecture=...)``): None for
    ``encoder.init=random``, the anchor tower's for ``anchor`` (drop path from the size)."""
    if cfg.encoder.init != "anchor":
        return None
    fields = resolve_size(cfg.modality, cfg.encoder.size, cfg.encoder.overrides)
    return anchor_architecture(anchor.model.visual, fields.get("drop_path", 0.0))


def setup_encoder(encoder: ModalityEncoder, cfg, anchor) -> list[str]:
    """After ``build_encoder``: the anchor tower's weights (``encoder.init=anchor``), then what
    trains (``encoder.trainable``). Returns the LoRA-adapted layers' names."""
    if cfg.encoder.init == "anchor":
        load_anchor_tower(encoder, anchor.model.visual)
    try:
        return set_trainable(
            encoder, cfg.encoder.trainable, cfg.encoder.lora_rank, cfg.encoder.lora_alpha
        )
    except ValueError as err:
        raise ConfigError(f"encoder.trainable={cfg.encoder.trainable}: {err}") from None


# ------------------------------------------------------------------------- the tower


def _block_problem(block: nn.Module) -> str | None:
    from open_clip.transformer import ResidualAttentionBlock

    if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
        return f"{type(block).__name__} blocks"
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        return "layer scale"
    attn = block.attn
    if attn.in_proj_weight is None or attn.in_proj_bias is None or attn.bias_k is not None:
        return "an attention without one fused, biased q/k/v projection"
    if _activation(block) is None:
        return f"a {type(block.mlp.gelu).__name__} activation"
    return None


def _activation(block: nn.Module) -> str | None:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


def _tower_problem(visual: VisionTransformer) -> str | None:
    blocks = list(visual.transformer.resblocks)
    conv = visual.conv1
    norms = [visual.ln_post] + [n for b in blocks for n in (b.ln_1, b.ln_2)]
    if not isinstance(visual.ln_pre, nn.Identity):
        norms.append(visual.ln_pre)
    if visual.attn_pool is not None:
        return "attentional pooling"
    if visual.pool_type != "tok":
        return f"{visual.pool_type!r} pooling (not the CLS token)"
    if visual.proj is None:
        return "no output projection"
    if not blocks:
        return "no blocks"
    if conv.stride != conv.kernel_size or conv.bias is not None or conv.padding != (0, 0):
        return "a patch convolution that is not bias-free with stride = patch"
    if not all(isinstance(n, nn.LayerNorm) and n.weight is not None for n in norms):
        return "norms that are not affine LayerNorms"
    if len({n.eps for n in norms}) > 1 or len({b.mlp.c_fc.out_features for b in blocks}) > 1:
        return "blocks of different LayerNorm eps or MLP width"
    if len({_activation(b) for b in blocks}) > 1:
        return "blocks of different activations"
    return next((p for p in map(_block_problem, blocks) if p), None)


def anchor_architecture(visual: nn.Module, drop_path: float = 0.0) -> dict[str, Any]:
    """``ARCHITECTURE_FIELDS`` of an open_clip image tower; ConfigError (one line naming
    ``encoder.init``) where it is not a plain ViT."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"{WHERE}: the anchor's image tower is a {type(visual).__name__}, not an open_clip "
            "VisionTransformer; use encoder.init=random or a ViT anchor"
        )
    problem = _tower_problem(visual)
    if problem:
        raise ConfigError(
            f"{WHERE}: the anchor's ViT has {problem}, which the encoder cannot reproduce; use "
            "encoder.init=random"
        )
    first = visual.transformer.resblocks[0]
    return {
        "width": int(visual.conv1.out_channels),
        "depth": len(visual.transformer.resblocks),
        "heads": int(first.attn.num_heads),
        "mlp_width": int(first.mlp.c_fc.out_features),
        "patch": [int(k) for k in visual.conv1.kernel_size],
        "norm_eps": float(visual.ln_post.eps),
        "act": _activation(first),
        "ln_pre": not isinstance(visual.ln_pre, nn.Identity),
        "drop_path": float(drop_path),
    }


# ------------------------------------------------------------------------- the weights


def patch_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """[W, 3, p, p] RGB patch weights -> [W, in_chans, p, p]: copied for three channels, else
    summed over RGB and split equally, so equal channels give the anchor's projection."""
    if in_chans == weight.shape[1]:
        return weight.clone()
    return (weight.sum(1, keepdim=True) / in_chans).repeat(1, in_chans, 1, 1)


def resize_pos_embed(
    table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """[1 + gh*gw, W] (CLS first) -> [1 + nh*nw, W]: the CLS position kept, the grid resized
    as open_clip's ``resize_pos_embed`` and timm's ``resample_abs_pos_embed`` do (bicubic,
    antialiased, align_corners=False); the same grid is copied."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if table.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(f"a {table.shape[0]}-row position table does not hold a {old_grid} grid")
    if old_grid == new_grid:
        return table.clone()
    cls, grid = table[:1], table[1:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(table.dtype)
    return torch.cat([cls, grid])


def _block_state(i: int, block: nn.Module) -> dict[str, torch.Tensor]:
    ours = f"trunk.blocks.{i}."
    pairs = {
        "norm_1": block.ln_1,
        "norm_2": block.ln_2,
        "attn.out_proj": block.attn.out_proj,
        "mlp.fc1": block.mlp.c_fc,
        "mlp.fc2": block.mlp.c_proj,
    }
    state = {
        f"{ours}{name}.{key}": value
        for name, module in pairs.items()
        for key, value in module.state_dict().items()
    }
    state[f"{ours}attn.in_proj_weight"] = block.attn.in_proj_weight
    state[f"{ours}attn.in_proj_bias"] = block.attn.in_proj_bias
    return state


@torch.no_grad()
def anchor_state_dict(visual: VisionTransformer, encoder: ModalityEncoder) -> dict:
    """The tower's weights under the encoder's keys, fitted to its channels and token grid."""
    state = {
        "stem.proj.weight": patch_weight(visual.conv1.weight, encoder.stem.in_chans),
        "cls_token": visual.class_embedding.reshape(1, 1, -1),
        "pos_embed": resize_pos_embed(
            visual.positional_embedding, visual.grid_size, encoder.stem.grid
        ).unsqueeze(0),
        "head_norm.weight": visual.ln_post.weight,
        "head_norm.bias": visual.ln_post.bias,
        "head.weight": visual.proj.t(),
    }
    if not isinstance(visual.ln_pre, nn.Identity):
        state["ln_pre.weight"], state["ln_pre.bias"] = visual.ln_pre.weight, visual.ln_pre.bias
    for i, block in enumerate(visual.transformer.resblocks):
        state.update(_block_state(i, block))
    return state


def load_anchor_tower(encoder: ModalityEncoder, visual: nn.Module) -> None:
    """Copy the anchor's image tower into an encoder built with its ``anchor_architecture``."""
    anchor_architecture(visual)  # refuses what cannot map
    state = anchor_state_dict(visual, encoder)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "log_logit_scale"]  # the modality's fixed temperature
    if missing or unexpected:
        raise ValueError(
            f"the anchor's tower does not fill the encoder (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): build it with architecture=anchor_architecture(...)"
        )
