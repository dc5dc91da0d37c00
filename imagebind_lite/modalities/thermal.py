"""Thermal: one-channel infrared image [1, H, W] -> ViT (ImageBind's thermal encoder is a ViT-B)."""

from ..data import thermal as thermal_data
from ..data.transforms import sensor_normaliser
from ..models.encoder import PatchStem
from ..registry import ImageBindBranch, ModalitySpec, register_modality
from .depth import AUGMENT_DEFAULTS, build_image_stem, image_shape, image_stem_from_weights

NAME = "thermal"


def read_aligned(sources: dict, meta: dict, options: dict):
    """A record's infrared image, pixel-aligned with its RGB frame (LLVIP): (values, None)."""
    return thermal_data.thermal_input(sources[NAME], **options)


register_modality(
    ModalitySpec(
        name=NAME,
        temperature=0.1,
        sizes={
            "imagebind": dict(width=768, depth=12, heads=12, patch=16),
            "base": dict(width=768, depth=12, heads=12, patch=16),
            "tiny": dict(width=128, depth=3, heads=4, mlp_ratio=2.0, patch=4),
        },
        build_stem=build_image_stem,
        sample_ndim=3,
        # mean/std: the training set's statistics (train/compute_stats.py); datasets fill them in.
        preprocess=dict(image_size=224, in_chans=1, **thermal_data.DEFAULTS, **AUGMENT_DEFAULTS),
        load=thermal_data.load,
        augment=thermal_data.augment,
        description="one-channel infrared intensity",
        read_aligned=read_aligned,
        normaliser=lambda options: sensor_normaliser(NAME, options),
        stats_options=thermal_data.conversion_options,
        scene_input=lambda scenes: scenes["thermal"],
        image_shape=image_shape,
        imagebind=ImageBindBranch(
            stem="rgbt_stem",
            heads=12,
            stem_type=PatchStem,
            stem_from_weights=image_stem_from_weights,
        ),
    )
)
