"""IMU: accelerometer + gyroscope, [6, 2000] windows (ImageBind's Ego4D setting)."""

from ..models.encoder import LinearWindowStem
from . import ModalitySpec, register_modality


def build_stem(size: dict, options: dict) -> LinearWindowStem:
    return LinearWindowStem(
        in_chans=options["channels"],
        width=size["width"],
        length=options["length"],
        kernel=size["window"],
    )


register_modality(
    ModalitySpec(
        name="imu",
        temperature=0.2,
        sizes={
            "imagebind": dict(width=512, depth=6, heads=8, drop_path=0.7, window=8),
            "tiny": dict(width=64, depth=2, heads=2, mlp_ratio=2.0, window=8),
        },
        build_stem=build_stem,
        sample_ndim=2,
        head_dropout=0.5,
        preprocess=dict(channels=6, length=2000),
        description="6-axis IMU, 250 windows of 8 steps",
    )
)
