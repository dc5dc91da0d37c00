"""Audio: log-mel fbank clips [clips, 1, mel, frames] -> ViT on overlapping 2-D patches."""

from ..data import audio as audio_data
from ..data import audio_device
from ..data import bad_input as bi
from ..data.audio_reference import resolve_options
from ..data.datasets import BadSample
from ..data.manifest import read_waveform
from ..files import AUDIO_EXTS
from ..models.encoder import ConvStem, PatchStem, patch_tokens
from ..registry import ImageBindBranch, ImageBindCheckpointError, ModalitySpec, register_modality


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


def image_shape(options: dict) -> tuple[int, int, int]:
    """One clip as an image: [1, mel bins, frames]."""
    return (1, int(options["num_mel_bins"]), int(options["target_length"]))


def load(path, **options):
    wav, sample_rate = audio_data.read_audio(path)
    return audio_data.waveform_to_clips(wav, sample_rate, options)


def load_source(source: bi.Source, options: dict):
    """A dataset's audio file or shard member -> clips; unreadable, empty and silent files are
    bad input with their reasons."""
    wav, rate = read_waveform(source)
    if audio_data.is_silent(wav):
        raise BadSample("silent", f"{bi.source_name(source)}: all samples are zero")
    if audio_device.features_on(options) == "device":
        return audio_device.pack_clips(wav, rate, options)  # the fbank runs in the step
    return audio_data.waveform_to_clips(wav, rate, options)


def augment(feats, train: bool, freq_mask: int = 12, time_mask: int = 0, generator=None, **o):
    if not train or audio_device.features_on(o) == "device":
        return feats  # with features on the device, masking happens there (device_features)
    return audio_data.spec_augment(feats, freq_mask, time_mask, generator)


def device_features(packed, options: dict, train: bool, generator=None):
    """A batch of packed clips on the device -> log-mel batch, masked when ``train``."""
    feats = audio_device.log_mel_batch(packed, options)
    if not train:
        return feats
    freq, time = int(options.get("freq_mask", 12)), int(options.get("time_mask", 0))
    return audio_device.spec_augment_batch(feats, freq, time, generator)


def feature_options(options: dict) -> dict:
    """The options a stored fbank depends on (not the masking, applied when training)."""
    resolved = resolve_options(options)
    return {key: resolved[key] for key in (*audio_data.DEFAULTS, "compat")}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def _stride_for(name: str, size: tuple[int, int], kernel: tuple[int, int], tokens: int) -> int:
    # The learned position table fixes the token count; with the fbank size known, exactly one
    # square stride usually produces it (128x204, kernel 16: only 10 gives 12x19 = 228).
    found = [s for s in range(1, max(size) + 1) if patch_tokens(size, kernel, (s, s)) == tokens]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ImageBindCheckpointError(
            f"{name}: no stride turns a {size[0]}x{size[1]} input with kernel "
            f"{kernel[0]}x{kernel[1]} into the checkpoint's {tokens} patch tokens; pass "
            f"preprocess={{'{name}': {{'num_mel_bins': ..., 'target_length': ...}}}} "
            f"or stride={{'{name}': ...}}"
        )
    if kernel[0] == kernel[1] and kernel[0] in found:
        return kernel[0]
    raise ImageBindCheckpointError(
        f"{name}: strides {found} all give {tokens} tokens on a {size[0]}x{size[1]} input; "
        f"pass stride={{'{name}': ...}}"
    )


def stem_from_weights(name: str, proj, proj_key: str, tokens: int, preprocess, stride):
    """ImageBind's audio stem: a Conv2d over the fbank, its stride read off the token count."""
    if proj.ndim != 4:
        raise ImageBindCheckpointError(
            f"{name}: {proj_key} has shape {list(proj.shape)}; expected a Conv2d weight "
            f"[width, in_chans, kh, kw]"
        )
    kernel = (int(proj.shape[2]), int(proj.shape[3]))
    size = (
        int(preprocess.get("num_mel_bins", audio_data.DEFAULTS["num_mel_bins"])),
        int(preprocess.get("target_length", audio_data.DEFAULTS["target_length"])),
    )
    if stride is None:
        step = _pair(_stride_for(name, size, kernel, tokens))
    else:
        step = _pair(stride)
        if patch_tokens(size, kernel, step) != tokens:
            raise ImageBindCheckpointError(
                f"{name}: stride {step} on a {size[0]}x{size[1]} input with kernel {kernel} "
                f"gives {patch_tokens(size, kernel, step)} tokens; the checkpoint has {tokens}"
            )
    fields = {
        "kernel": kernel[0] if kernel[0] == kernel[1] else kernel,
        "stride": step[0] if step[0] == step[1] else step,
    }
    return fields, {"num_mel_bins": size[0], "target_length": size[1]}


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
        extensions=AUDIO_EXTS,
        load_source=load_source,
        image_shape=image_shape,
        device_features=device_features,
        feature_options=feature_options,
        imagebind=ImageBindBranch(
            stem="rgbt_stem",
            heads=12,
            stem_type=PatchStem,
            stem_from_weights=stem_from_weights,
            preprocess={"compat": "imagebind"},
        ),
    )
)
