"""A modality encoder: stem -> transformer trunk -> head -> postprocessor.

Every new modality (audio, depth, thermal, imu, your own) is this one module with a different
stem and size; the modality registry (``imagebind_lite.modalities``) says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Trunk


@dataclass
class EncoderShape:
    """Everything needed to build the trunk and head; the stem is built by the modality."""

    width: int
    depth: int
    heads: int
    embed_dim: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    add_bias_kv: bool = True
    head_dropout: float = 0.0
    grad_checkpointing: bool = False
    # An open_clip tower's layout (``encoder.init=anchor``, ``models/anchor_init.py``): its
    # LayerNorm eps, MLP activation and hidden width, and a LayerNorm over all tokens after the
    # positional embedding (open_clip's ``ln_pre``) in place of the stem's own.
    norm_eps: float = 1e-6
    act: str = "gelu"
    mlp_width: int | None = None
    ln_pre: bool = False
    patch_dropout: float = 0.0


def patch_tokens(size, kernel, stride) -> int:
    """Patch tokens of a ``PatchStem`` on a ``size`` input (each a pair): 0 if none fit."""
    gh, gw = ((s - k) // st + 1 for s, k, st in zip(size, kernel, stride, strict=True))
    return gh * gw if gh > 0 and gw > 0 else 0


class PatchStem(nn.Module):
    """Conv2d patchifier (bias-free, as ImageBind's RGBT/depth stems) followed by LayerNorm
    (``norm=False``: none, as open_clip's ``conv1``, whose tower normalises after the positional
    embedding instead)."""

    def __init__(
        self,
        in_chans: int,
        width: int,
        input_size: tuple[int, int],
        kernel: int | tuple[int, int],
        stride: int | tuple[int, int],
        norm: bool = True,
    ):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.input_size = tuple(input_size)
        self.in_chans = in_chans
        self.grid = tuple((s - k) // st + 1 for s, k, st in zip(self.input_size, kernel, stride))
        if min(self.grid) < 1:
            raise ValueError(f"input {self.input_size} is smaller than the patch kernel {kernel}")
        self.num_tokens = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, width, kernel_size=kernel, stride=stride, bias=False)
        self.norm = nn.LayerNorm(width, eps=1e-5) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_chans, *self.input_size):
            raise ValueError(
                f"expected input of shape [B, {self.in_chans}, {self.input_size[0]}, "
                f"{self.input_size[1]}], got {list(x.shape)}"
            )
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ConvStem(nn.Module):
    """A few stride-2 3x3 convolutions (BatchNorm, GELU) then a 1x1 projection to the width.

    Early convolutions give a small transformer the locality and small-shift invariance that it
    otherwise has to learn from data (Xiao et al., 2021); on a few thousand clips that is the
    difference between memorising speakers and generalising to new ones. Used by CPU sizes.
    """

    def __init__(self, in_chans: int, width: int, input_size: tuple[int, int], channels: list[int]):
        super().__init__()
        self.input_size, self.in_chans = tuple(input_size), in_chans
        layers, prev = [], in_chans
        grid = list(self.input_size)
        for ch in channels:
            layers += [
                nn.Conv2d(prev, ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch),
                nn.GELU(),
            ]
            prev = ch
            grid = [(g - 1) // 2 + 1 for g in grid]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(prev, width, 1)
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.grid = tuple(grid)
        self.num_tokens = grid[0] * grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_chans, *self.input_size):
            raise ValueError(
                f"expected input of shape [B, {self.in_chans}, {self.input_size[0]}, "
                f"{self.input_size[1]}], got {list(x.shape)}"
            )
        return self.norm(self.proj(self.convs(x)).flatten(2).transpose(1, 2))


class LinearWindowStem(nn.Module):
    """Cuts a [B, C, T] signal into non-overlapping windows of ``kernel`` steps and projects each
    window of C*kernel values to the width (ImageBind's IMU stem)."""

    def __init__(self, in_chans: int, width: int, length: int, kernel: int):
        super().__init__()
        if length % kernel:
            raise ValueError(f"length {length} is not a multiple of the window {kernel}")
        self.in_chans, self.length, self.kernel = in_chans, length, kernel
        self.num_tokens = length // kernel
        self.proj = nn.Linear(in_chans * kernel, width, bias=False)
        self.norm = nn.LayerNorm(width, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_chans, self.length):
            raise ValueError(
                f"expected input of shape [B, {self.in_chans}, {self.length}], got {list(x.shape)}"
            )
        windows = x.unfold(-1, self.kernel, self.kernel)  # B, C, N, K
        windows = windows.permute(0, 2, 1, 3).flatten(2)  # B, N, C*K
        return self.norm(self.proj(windows))


class PatchDropout(nn.Module):
    """FLIP's patch dropout (Li et al., 2023): in training, each sample keeps a random
    ``max(1, int(n * (1 - p)))`` of its ``n`` tokens after the first (the CLS token, always
    kept); the identity in eval mode or at ``p = 0``. Applied after the positional embedding,
    so a kept token keeps its position. The draw comes from torch's global RNG on the tokens'
    device, which the training loop reseeds every step, as it does for drop path: a resumed run
    draws the same tokens. (open_clip's ``PatchDropout`` does the same but always draws on the
    CPU.)"""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"patch_dropout: expected a probability in [0, 1), got {p}")
        self.p = p

    def kept(self, tokens: int) -> int:
        """How many of ``tokens`` (CLS not counted) a training forward keeps."""
        return max(1, int(tokens * (1.0 - self.p))) if self.p else tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        first, rest = x[:, :1], x[:, 1:]
        keep = self.kept(rest.shape[1])
        order = torch.rand(rest.shape[:2], device=x.device).argsort(dim=1)[:, :keep]
        rest = rest.gather(1, order.unsqueeze(-1).expand(-1, -1, rest.shape[-1]))
        return torch.cat([first, rest], dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ModalityEncoder(nn.Module):
    """Encodes one modality into the anchor's space.

    ``forward`` takes ``[B, *sample_shape]`` or, for several clips/views per item,
    ``[B, clips, *sample_shape]``; clip embeddings are averaged after normalising.

    ``imagebind_scaling=False`` (default) returns unit vectors. ``True`` reproduces ImageBind's
    forward: each clip is normalised and multiplied by the modality's fixed logit scale
    (``1 / temperature``), and the clips are averaged without renormalising.
    """

    def __init__(
        self,
        stem: nn.Module,
        shape: EncoderShape,
        temperature: float,
        sample_ndim: int,
        imagebind_scaling: bool = False,
    ):
        super().__init__()
        width = shape.width
        self.stem = stem
        self.sample_ndim = sample_ndim
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) / math.sqrt(width))
        self.pos_embed = nn.Parameter(torch.randn(1, stem.num_tokens + 1, width) / math.sqrt(width))
        if shape.patch_dropout and stem.num_tokens < 2:
            raise ValueError(
                f"patch_dropout: the stem makes {stem.num_tokens} token; there are none to drop"
            )
        self.patch_dropout = PatchDropout(shape.patch_dropout)
        self.trunk = Trunk(
            width,
            shape.depth,
            shape.heads,
            shape.mlp_ratio,
            shape.drop_path,
            shape.add_bias_kv,
            shape.grad_checkpointing,
            shape.norm_eps,
            shape.act,
            shape.mlp_width,
        )
        # Identity (no weights, no state-dict keys) unless the layout is an open_clip tower's.
        self.ln_pre = nn.LayerNorm(width, eps=shape.norm_eps) if shape.ln_pre else nn.Identity()
        self.head_norm = nn.LayerNorm(width, eps=shape.norm_eps)
        self.head_dropout = nn.Dropout(shape.head_dropout)
        self.head = nn.Linear(width, shape.embed_dim, bias=False)
        # A saved buffer, not a parameter: the scale is fixed, as in ImageBind.
        self.register_buffer("log_logit_scale", torch.tensor(math.log(1.0 / temperature)))
        self.imagebind_scaling = imagebind_scaling
        self.apply(_init_linear)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_logit_scale))

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.ln_pre(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        tokens = self.trunk(self.patch_dropout(tokens))
        return self.head(self.head_dropout(self.head_norm(tokens[:, 0])))

    def parameter_parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The named parameters by part: ``trunk`` (the transformer blocks), ``head`` (the final
        LayerNorm and the projection into the anchor's space) and ``stem`` (everything before
        the trunk: patch embedding, CLS token, positional embedding, ``ln_pre``)."""
        parts: dict[str, list] = {"stem": [], "trunk": [], "head": []}
        for name, param in self.named_parameters():
            module = name.split(".", 1)[0]
            part = {"trunk": "trunk", "head_norm": "head", "head": "head"}.get(module, "stem")
            parts[part].append((name, param))
        return parts

    def train(self, mode: bool = True):
        # A frozen BatchNorm (encoder.trainable leaves its stem out) keeps its running
        # statistics: frozen parts stay exactly as they were.
        super().train(mode)
        for module in self.modules():
            params = list(module.parameters()) if isinstance(module, BATCH_NORMS) else []
            if params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clips = None
        if x.dim() == self.sample_ndim + 2:
            clips = x.shape[1]
            x = x.flatten(0, 1)
        elif x.dim() != self.sample_ndim + 1:
            raise ValueError(
                f"expected a batch of {self.sample_ndim}-d samples ([B, ...] or [B, clips, ...]), "
                f"got a tensor of shape {list(x.shape)}"
            )
        emb = F.normalize(self.encode_tokens(x), dim=-1)
        if self.imagebind_scaling:
            emb = emb * self.log_logit_scale.exp()
        if clips is not None:
            emb = emb.unflatten(0, (-1, clips)).mean(dim=1)
            if not self.imagebind_scaling:
                emb = F.normalize(emb, dim=-1)
        return emb


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
