"""The frozen CLIP anchor: image and text towers from open_clip.

Frozen means no gradients, eval mode always (``train()`` is a no-op), no optimizer state and no
activation memory: every forward runs under ``torch.no_grad``. New encoders project into its
embedding dimension.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from .config import AnchorConfig, ConfigError
from .files import load_error_line

ASSETS = Path(__file__).resolve().parent / "assets"
PACKAGE_PREFIX = "imagebind_lite:"


def resolve_asset(value: str | None, suffixes: tuple[str, ...]) -> str | None:
    """``imagebind_lite:NAME`` -> the shipped file ``assets/anchors/NAME<suffix>``."""
    if value is None or not value.startswith(PACKAGE_PREFIX):
        return value
    name = value[len(PACKAGE_PREFIX) :]
    for suffix in suffixes:
        candidate = ASSETS / "anchors" / f"{name}{suffix}"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"no anchor asset {name!r} shipped in {ASSETS / 'anchors'}")


def looks_like_path(value: str) -> bool:
    """Whether ``anchor.pretrained`` names a file (else an open_clip tag)."""
    return (
        "/" in value
        or "\\" in value
        or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    )


def validate_anchor_config(cfg: AnchorConfig) -> tuple[str, str | None]:
    """Check the anchor can be built, before any data is read. Returns (model, pretrained)."""
    # open_clip imports all of torchvision and torch._dynamo (~2 s): only when an anchor is used.
    import open_clip

    config_file = resolve_asset(cfg.model_config, (".json",))
    if config_file is not None:
        if not Path(config_file).exists():
            raise ConfigError(f"anchor.model_config: file not found: {config_file}")
        open_clip.add_model_config(config_file)
    if cfg.model not in open_clip.list_models():
        raise ConfigError(
            f"anchor.model: open_clip does not know {cfg.model!r} "
            f"(e.g. ViT-B-32, ViT-H-14; register a JSON with anchor.model_config)"
        )
    pretrained = resolve_asset(cfg.pretrained, (".safetensors", ".pt"))
    if pretrained is not None:
        if looks_like_path(pretrained):
            if not Path(pretrained).is_file():
                raise ConfigError(f"anchor.pretrained: checkpoint file not found: {pretrained}")
        elif pretrained not in open_clip.list_pretrained_tags_by_model(cfg.model):
            tags = open_clip.list_pretrained_tags_by_model(cfg.model)
            raise ConfigError(
                f"anchor.pretrained: {pretrained!r} is neither a file nor an open_clip tag of "
                f"{cfg.model} (tags: {', '.join(tags) or 'none'})"
            )
    return cfg.model, pretrained


# What open_clip, torch.load and safetensors raise for weights that cannot be had or do not fit.
LOAD_ERRORS = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)


def load_open_clip(model_name: str, pretrained: str | None, device):
    """open_clip's (model, train transform, preprocess); weights that do not load are one line
    naming ``anchor.pretrained``."""
    import open_clip  # see validate_anchor_config

    try:
        return open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device
        )
    except LOAD_ERRORS as err:
        if pretrained is None or isinstance(err, torch.OutOfMemoryError):
            raise
        raise ConfigError(f"anchor.pretrained: {_not_loaded(model_name, pretrained, err)}") from err


def _not_loaded(model_name: str, pretrained: str, err: Exception) -> str:
    detail = load_error_line(err)
    if not looks_like_path(pretrained):
        return (
            f"could not fetch open_clip's {pretrained!r} weights of {model_name} (offline? a "
            f"downloaded checkpoint file works too): {detail}"
        )
    if str(err).startswith("Error(s) in loading state_dict"):
        return f"{pretrained} does not fit open_clip's {model_name}: {detail}"
    return f"{pretrained}: not a readable checkpoint ({type(err).__name__}: {detail})"


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:limit]


class Anchor(nn.Module):
    """Frozen open_clip image and text towers with their preprocessing and tokenizer."""

    def __init__(self, cfg: AnchorConfig, device: torch.device | str = "cpu"):
        import open_clip  # see validate_anchor_config

        super().__init__()
        model_name, pretrained = validate_anchor_config(cfg)
        self.config = cfg
        self.model_name = model_name
        self.pretrained = pretrained
        model, _, preprocess = load_open_clip(model_name, pretrained, device)
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.preprocess = preprocess  # PIL image -> normalised tensor, as the anchor was trained
        self.tokenizer = open_clip.get_tokenizer(model_name)
        visual = model.visual
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.image_mean = torch.tensor(
            getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        )
        self.image_std = torch.tensor(
            getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        )
        self.embed_dim = int(visual.output_dim)

    def train(self, mode: bool = True):
        # The anchor never leaves eval mode: dropout/BN stats must not change the target space.
        return super().train(False)

    def identity(self) -> dict:
        """What determines the anchor's outputs: for cache manifests and saved models."""
        ident = {"model": self.model_name, "pretrained": self.config.pretrained}
        if self.pretrained is not None and Path(self.pretrained).is_file():
            ident["sha256"] = file_sha256(self.pretrained, 16)
        ident["image_size"] = list(self.image_size)
        ident["image_mean"] = self.image_mean.tolist()
        ident["image_std"] = self.image_std.tolist()
        return ident

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels in [0, 1] -> the anchor's input (resized, CLIP-normalised)."""
        if images.shape[-2:] != self.image_size:
            images = F.interpolate(
                images, size=self.image_size, mode="bicubic", align_corners=False
            ).clamp(0, 1)
        mean = self.image_mean.to(images).view(1, 3, 1, 1)
        std = self.image_std.to(images).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)
