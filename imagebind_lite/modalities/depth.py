"""Depth: one-channel disparity image [1, H, W] -> ViT (ImageBind's depth encoder is a ViT-S)."""

from ..models.encoder import PatchStem
from . import ModalitySpec, register_modality


def build_image_stem(size: dict, options: dict) -> PatchStem:
    image_size = options["image_size"]
    return PatchStem(
        in_chans=options.get("in_chans", 1),
        width=size["width"],
        input_size=(image_size, image_size),
        kernel=size["patch"],
        stride=size["patch"],
    )


register_modality(
    ModalitySpec(
        name="depth",
        temperature=0.2,
        sizes={
            "imagebind": dict(width=384, depth=12, heads=8, patch=16),
            "small": dict(width=384, depth=12, heads=8, patch=16),
            "tiny": dict(width=128, depth=3, heads=4, mlp_ratio=2.0, patch=4),
        },
        build_stem=build_image_stem,
        sample_ndim=3,
        preprocess=dict(image_size=224, in_chans=1),
        description="disparity from metric depth, one channel",
    )
)
