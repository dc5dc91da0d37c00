"""Low-rank adapters (LoRA, Hu et al. 2021) for ``nn.Linear`` layers, with no dependency.

An adapted layer computes ``W x + b + (alpha / r) * B A x`` with ``A`` [r, in] drawn at random
and ``B`` [out, r] zero, so a freshly adapted model computes exactly what the base model does;
only ``A`` and ``B`` train. ``merge_lora`` folds ``(alpha / r) * B A`` into ``W`` and puts the
original ``nn.Linear`` back in place, so a merged model has the base model's classes and
state-dict keys: an open_clip model merged this way saves as a plain open_clip checkpoint.

``nn.MultiheadAttention`` never calls its ``out_proj``: it passes ``out_proj.weight`` and
``out_proj.bias`` to the functional attention. ``LoRALinear.weight`` is therefore the effective
weight ``W + (alpha / r) * B A``, so adapting ``out_proj`` works there too (at the cost of forming
the full matrix on each forward); layers that are called go through the cheaper low-rank path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# open_clip's transformer blocks: attention output projection and both MLP layers.
DEFAULT_TARGETS = ("out_proj", "c_fc", "c_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        ref = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(self.rank, base.in_features, dtype=ref.dtype, device=ref.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, self.rank, dtype=ref.dtype, device=ref.device)
        )
        # nn.Linear's own init for A; B = 0 makes the update start at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.delta()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The base layer with the update folded in (computed in float32, stored in its dtype)."""
        weight = self.base.weight
        merged = weight.float() + self.delta().float()
        weight.copy_(merged.to(weight.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def apply_lora(
    model: nn.Module,
    targets: Iterable[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets`` (or whose full dotted
    name ends with one of them) in a ``LoRALinear``, in place. Returns the wrapped names.
    Only the adapters are left trainable; everything else in ``model`` is frozen."""
    targets = tuple(targets)
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, LoRALinear)
        # A LoRALinear's own base layer is ``<name>.base``: never wrap twice.
        and not name.endswith(".base")
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not chosen:
        raise ValueError(f"no nn.Linear layer named {', '.join(targets)} in {type(model).__name__}")
    model.requires_grad_(False)
    for name in chosen:
        parent_name, child = _split(name)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base layer and put the base layer back, in place."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        parent_name, child = _split(name)
        setattr(model.get_submodule(parent_name), child, layer.merge())
    return list(layers)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as it would be after ``merge_lora``, without changing the model:
    each adapted layer's ``weight`` with its update folded in (in float32, stored in its dtype)
    and the plain ``nn.Linear`` keys, no ``lora_A``/``lora_B``/``base``."""
    state = model.state_dict()
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        for key in ("lora_A", "lora_B"):
            state.pop(prefix + key)
        weight = state.pop(prefix + "base.weight")
        state[prefix + "weight"] = (weight.float() + layer.delta().float()).to(weight.dtype)
        if prefix + "base.bias" in state:
            state[prefix + "bias"] = state.pop(prefix + "base.bias")
    return state
