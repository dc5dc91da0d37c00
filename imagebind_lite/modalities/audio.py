"""Audio: log-mel fbank clips [clips, 1, mel, frames] -> ViT on overlapping 2-D patches."""

from ..data import audio as audio_data
from ..models.encoder import ConvStem, PatchStem
from ..registry import ModalitySpec, register_modality


def build_stem(size: dict, options: dict):
    # The positional embedding follows the fbank grid that the preprocessing options produce.
    grid = (options["num_mel_bins"], options["target_length"])
    if size.get("conv_stem"):
        return ConvStem(1, size["width"], grid, list(size["conv_stem"]))
    return PatchStem(
        in_chans=1,
        width=size["width"],
        input_size=(options["num_mel_bins"], options["target_length"]),
        kernel=size["kernel"],
        stride=size["stride"],
    )


def load(path, **options):
    wav, sample_rate = audio_data.read_audio(path)
    return audio_data.waveform_to_clips(wav, sample_rate, options)


def augment(feats, train: bool, freq_mask: int = 12, time_mask: int = 0, generator=None, **_):
    return audio_data.spec_augment(feats, freq_mask, time_mask, generator) if train else feats


register_modality(
    ModalitySpec(
        name="audio",
        temperature=0.05,
        sizes={
            # ImageBind's audio encoder: ViT-B on 128x204 fbank, kernel 16 / stride 10 -> 12x19.
            "imagebind": dict(width=768, depth=12, heads=12, drop_path=0.1, kernel=16, stride=10),
            "base": dict(width=768, depth=12, heads=12, drop_path=0.1, kernel=16, stride=10),
            "small": dict(width=384, depth=12, heads=6, drop_path=0.1, kernel=16, stride=10),
            # CPU-sized: trains in minutes on two cores.
            "tiny": dict(width=128, depth=4, heads=4, mlp_ratio=2.0, kernel=8, stride=8),
            # Early convolutions before the same tiny trunk: generalises better on small data.
            "tiny-conv": dict(width=128, depth=3, heads=4, mlp_ratio=2.0, conv_stem=[16, 32, 64]),
        },
        build_stem=build_stem,
        sample_ndim=3,
        preprocess=dict(audio_data.DEFAULTS, freq_mask=12, time_mask=0),
        load=load,
        augment=augment,
        description="kaldi log-mel fbank clips, ImageBind recipe",
    )
)
