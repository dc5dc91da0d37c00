"""Depth: one-channel disparity image [1, H, W] -> ViT (ImageBind's depth encoder is a ViT-S)."""

from ..data import depth as depth_data
from ..models.encoder import PatchStem
from ..registry import ModalitySpec, register_modality

# Training augmentation (ImageBind's depth/thermal recipe; see data/transforms.py).
AUGMENT_DEFAULTS = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, erase_p=0.25)


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
        # mean/std: the training set's disparity statistics (train/compute_stats.py); datasets
        # fill them in, and the saved model keeps them.
        preprocess=dict(image_size=224, in_chans=1, **depth_data.DEFAULTS, **AUGMENT_DEFAULTS),
        load=depth_data.load,
        augment=depth_data.augment,
        description="disparity from metric depth, one channel",
    )
)
