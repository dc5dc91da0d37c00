"""What of a ``ModalityEncoder`` trains (``encoder.trainable``).

The encoder's parameters fall in three parts (``ModalityEncoder.parameter_parts``): the stem
(patch embedding, CLS token, positional embedding, ``ln_pre``), the trunk (the transformer
blocks) and the head (final LayerNorm and the projection into the anchor's space).

``all``: every part (full fine-tuning). ``lens``: the stem and the head, the trunk frozen
(ViT-Lens: a pretrained trunk, a new modality's own tokeniser and output). ``lora``: as
``lens``, plus rank-``lora_rank`` adapters (``imagebind_lite/lora.py``) on the trunk's attention
output and MLP layers. ``head``: the head only. Frozen parameters get ``requires_grad=False``, so
the optimizer never sees them (``training.loop.param_groups``), and a frozen BatchNorm keeps its
statistics (``ModalityEncoder.train``). ``save_model`` merges the adapters into the weights.
"""

from __future__ import annotations

from torch import nn

from ..lora import apply_lora

# The trained parts of each mode.
TRAINABLE_PARTS = {
    "all": ("stem", "trunk", "head"),
    "lens": ("stem", "head"),
    "lora": ("stem", "head"),
    "head": ("head",),
}
TRAINABLE_MODES = tuple(TRAINABLE_PARTS)
# The trunk's nn.Linear layers that LoRA adapts: attention output and both MLP layers (the
# fused q/k/v projection is a bare parameter, as in nn.MultiheadAttention).
LORA_TARGETS = ("out_proj", "fc1", "fc2")


def set_trainable(
    encoder: nn.Module, mode: str, lora_rank: int = 8, lora_alpha: float = 16.0
) -> list[str]:
    """Freeze what ``mode`` does not train, in place. Returns the LoRA-adapted layers' names
    (empty unless ``mode`` is ``lora``)."""
    if mode not in TRAINABLE_PARTS:
        raise ValueError(f"trainable: expected {', '.join(TRAINABLE_MODES)}, got {mode!r}")
    adapted = []
    if mode == "lora":
        # Freezes the trunk, then adds the (trainable) adapters.
        names = apply_lora(encoder.trunk, LORA_TARGETS, lora_rank, lora_alpha)
        adapted = [f"trunk.{name}" for name in names]
    for part, params in encoder.parameter_parts().items():
        if part == "trunk" and mode == "lora":
            continue
        for _, param in params:
            param.requires_grad_(part in TRAINABLE_PARTS[mode])
    encoder.train(encoder.training)  # frozen BatchNorms to eval mode
    return adapted


def trainable_counts(encoder: nn.Module) -> dict[str, int]:
    """Trainable parameters (elements) per part, and their ``total``."""
    counts = {
        part: sum(p.numel() for _, p in params if p.requires_grad)
        for part, params in encoder.parameter_parts().items()
    }
    counts["total"] = sum(counts.values())
    return counts
