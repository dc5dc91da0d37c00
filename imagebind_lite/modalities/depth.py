"""Depth: one-channel disparity image [1, H, W] -> ViT (ImageBind's depth encoder is a ViT-S)."""

import math

from ..data import depth as depth_data
from ..data import scenes as scenes_data
from ..data.transforms import sensor_normaliser
from ..models.encoder import PatchStem, patch_tokens
from ..registry import ImageBindBranch, ImageBindCheckpointError, ModalitySpec, register_modality

NAME = "depth"

# Training augmentation (ImageBind's depth/thermal recipe; see data/transforms.py).
AUGMENT_DEFAULTS = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, erase_p=0.25)
# Per-record columns that override the reading options (data.manifest).
RECORD_OPTIONS = ("fx", "baseline", "layout")


def build_image_stem(size: dict, options: dict) -> PatchStem:
    image_size = options["image_size"]
    return PatchStem(
        in_chans=options.get("in_chans", 1),
        width=size["width"],
        input_size=(image_size, image_size),
        kernel=size["patch"],
        stride=size["patch"],
    )


def image_shape(options: dict) -> tuple[int, int, int]:
    """The square image the stem reads: [in_chans, image_size, image_size]."""
    size = int(options["image_size"])
    return (int(options.get("in_chans", 1)), size, size)


def read_aligned(sources: dict, meta: dict, options: dict):
    """A record's depth map (registered to its RGB frame) -> (disparity [1,H,W], valid mask),
    with the record's own ``fx``, ``baseline`` and bit ``layout`` overriding the options and
    its ``intrinsics`` file giving the focal length."""
    options = {**options, **{k: meta[k] for k in RECORD_OPTIONS if meta.get(k) is not None}}
    return depth_data.depth_input(sources[NAME], intrinsics=sources.get("intrinsics"), **options)


def image_stem_from_weights(name: str, proj, proj_key: str, tokens: int, preprocess, stride):
    """ImageBind's depth/thermal stem: square patches with stride = patch, as ours."""
    if proj.ndim != 4:
        raise ImageBindCheckpointError(
            f"{name}: {proj_key} has shape {list(proj.shape)}; expected a Conv2d weight "
            f"[width, in_chans, kh, kw]"
        )
    kernel = (int(proj.shape[2]), int(proj.shape[3]))
    if kernel[0] != kernel[1]:
        raise ImageBindCheckpointError(
            f"{name}: non-square patch {kernel} in {proj_key}; the image stem is square"
        )
    patch = kernel[0]
    if stride is not None:
        step = (stride, stride) if isinstance(stride, int) else tuple(int(v) for v in stride)
        if step != kernel:
            raise ImageBindCheckpointError(
                f"{name}: the image stem's stride is its patch ({patch}); got {stride}"
            )
    if "image_size" in preprocess:
        image_size = int(preprocess["image_size"])
        found = patch_tokens((image_size, image_size), kernel, kernel)
        if found != tokens:
            raise ImageBindCheckpointError(
                f"{name}: a {image_size}x{image_size} image in {patch}-pixel patches gives "
                f"{found} tokens; the checkpoint has {tokens}"
            )
    else:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ImageBindCheckpointError(
                f"{name}: {tokens} patch tokens is not a square grid; pass "
                f"preprocess={{'{name}': {{'image_size': ...}}}}"
            )
        image_size = side * patch
    return {"patch": patch}, {"image_size": image_size, "in_chans": int(proj.shape[1])}


register_modality(
    ModalitySpec(
        name=NAME,
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
        read_aligned=read_aligned,
        normaliser=lambda options: sensor_normaliser(NAME, options),
        stats_options=depth_data.conversion_options,
        # The scenes' metric depth as the encoder sees it: disparity.
        scene_input=lambda scenes: scenes_data.depth_to_disparity(scenes["depth"]),
        image_shape=image_shape,
        imagebind=ImageBindBranch(
            stem="depth_stem",
            heads=8,
            stem_type=PatchStem,
            stem_from_weights=image_stem_from_weights,
        ),
    )
)
