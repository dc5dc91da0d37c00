"""Pre-norm ViT trunk on PyTorch's fused attention.

Parameter names follow ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``bias_k``, ``bias_v``, ``out_proj``) so that ImageBind's released trunks and a plain
``nn.MultiheadAttention`` reference load into ``Attention`` key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention with an optional learned key/value token (ImageBind's
    ``add_bias_kv``), computed with ``scaled_dot_product_attention``.

    The extra token is concatenated onto K and V after projection, exactly what
    ``nn.MultiheadAttention(add_bias_kv=True)`` does, so a fused kernel gives the same result.
    """

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's init, so both start from the same distribution.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, dim)], dim=1)
            if attn_mask is not None:
                # Every query may attend the extra token: True for boolean masks, 0 for additive.
                fill = True if attn_mask.dtype == torch.bool else 0.0
                attn_mask = F.pad(attn_mask, (0, 1), value=fill)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP towers were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP activations a trunk can use (``EncoderShape.act``).
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Block(nn.Module):
    """``x + drop_path(attn(LN(x)))``, then the same with the MLP; by default LN eps 1e-6 and
    exact GELU (ImageBind); an open_clip tower's block is the same with eps 1e-5
    (``models/anchor_init.py`` maps one onto the other)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        add_bias_kv: bool = False,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        mlp_width: int | None = None,
    ):
        # timm.layers imports timm.models and torchvision (~2 s): only once a block is built.
        from timm.layers import DropPath, Mlp

        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, add_bias_kv=add_bias_kv)
        self.norm_2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = mlp_width or int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden, act_layer=ACTIVATIONS[act])
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x)))
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Trunk(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        add_bias_kv: bool = False,
        grad_checkpointing: bool = False,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        mlp_width: int | None = None,
    ):
        super().__init__()
        # Drop path rises linearly from 0 to the given rate over the depth (ImageBind, timm).
        rates = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, rate, add_bias_kv, norm_eps, act, mlp_width)
            for rate in rates
        )
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x
