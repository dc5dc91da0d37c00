"""ImageBind's audio recipe, written out plainly, file by file and clip by clip.

This module defines what correct means for the audio pipeline: ``audio_engine`` computes the
same floating-point operations in the same order, batched, and the tests require its output to
equal this module's bit for bit (with torch single-threaded, see below). It is slow on purpose:
the kernels are rebuilt per call, and every clip is one ``kaldi.fbank`` call.

The recipe (ImageBind's ``load_and_transform_audio_data``): read the file as float32, resample
to 16 kHz with torchaudio's windowed-sinc kernel, cut ``num_clips`` clips of ``clip_duration``
seconds with evenly spaced starts, remove each clip's mean, take a kaldi fbank (128 mel bins,
25 ms Hanning windows every 10 ms, no dither, no energy), pad with zeros or crop on the right
to ``target_length`` frames and normalise with mean -4.268 and std 9.138 (padding therefore
reads (0 - mean) / std = 0.467).

Two modes, chosen with the ``compat`` option:

``compat="default"`` (the project's own recipe)
    * channels are averaged to mono before resampling (stereo keeps both sides' content), with
      the kernel ``torchaudio.transforms.Resample`` builds (in float64, rounded once);
    * each clip's mean is removed from a copy, so overlapping clips never affect each other;
    * clip starts are ``i * max(duration - clip, 0) / (num_clips - 1)`` in floating point, and a
      single clip is centred in the file.

``compat="imagebind"`` (reproduces ImageBind's output)
    * the whole ``[channels, samples]`` waveform is resampled with
      ``torchaudio.functional.resample`` (kernel built in float32);
    * clips are views of that waveform and each view's mean, taken over *all* channels, is
      subtracted in place, so when clips overlap (files between 2 s and 6 s for 3 clips of 2 s)
      a later clip inherits the earlier clip's shift on the shared samples;
    * the fbank is computed on channel 0 only;
    * clip starts are exact fractions ``i * max(duration - clip, 0) / max(num_clips - 1, 1)``
      (a single clip starts at 0) and sample indices are ``int(t * sample_rate)``.

Both modes zero-pad a clip shorter than one 25 ms window up to one window (ImageBind's fbank
asserts on such input); a file shorter than ``clip_duration`` yields ``num_clips`` clips of the
whole file. ``utterance_norm`` (not ImageBind's) subtracts each clip's mean normalised log-mel
spectrum over its kept frames, and pads with 0.

Thread count: a clip mean over more than 32768 samples (several channels, or clips over
2.048 s) is a parallel sum whose rounding depends on ``torch.get_num_threads()``, so ImageBind's
output for such clips moves by ~1e-5 with the thread count. The engine always computes on
single-threaded torch; compare with this module under ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF
from torchaudio.compliance import kaldi

IMAGEBIND_MEAN = -4.268
IMAGEBIND_STD = 9.138

DEFAULTS = {
    "sample_rate": 16000,
    "num_clips": 3,
    "clip_duration": 2.0,
    "num_mel_bins": 128,
    "target_length": 204,
    "mean": IMAGEBIND_MEAN,
    "std": IMAGEBIND_STD,
    # Not ImageBind's: subtract each clip's mean log-mel spectrum over its real frames (cepstral
    # mean normalisation; padding becomes 0). It removes most of a speaker's and microphone's
    # fixed colouring, which a small encoder trained on few speakers otherwise memorises.
    "utterance_norm": False,
}

COMPAT_MODES = ("default", "imagebind")

# The kaldi.fbank arguments ImageBind fixes.
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


def resolve_options(options: dict | None) -> dict:
    """:data:`DEFAULTS` overridden by ``options`` (plus ``compat``), validated."""
    o = {**DEFAULTS, "compat": "default", **(options or {})}
    if o["compat"] not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {o['compat']!r}")
    if o["num_clips"] < 1 or o["clip_duration"] <= 0 or o["target_length"] < 1:
        raise ValueError(
            "num_clips and target_length must be >= 1 and clip_duration > 0, got "
            f"{o['num_clips']}, {o['target_length']}, {o['clip_duration']}"
        )
    return o


def clip_starts(duration: float, clip_duration: float, num_clips: int) -> list[float]:
    """Evenly spaced clip starts covering the file: ``i * max(duration - clip, 0) / (n - 1)``."""
    if num_clips == 1:
        return [max(duration - clip_duration, 0.0) / 2]
    span = max(duration - clip_duration, 0.0)
    return [i * span / (num_clips - 1) for i in range(num_clips)]


def imagebind_clip_bounds(
    num_samples: int, sample_rate: int, clip_duration: float, num_clips: int
) -> list[tuple[int, int]]:
    """Sample ranges ``[begin, end)`` of ImageBind's constant-clips-per-file sampler.

    Times are exact fractions of the float duration, truncated to samples with ``int``; the
    float subtraction before the fraction is deliberate (the sampler does the same), because
    which sample a clip ends on depends on it.
    """
    clip = Fraction(clip_duration)
    span = max(num_samples / sample_rate - float(clip), 0.0)
    # Integer form of ``int(Fraction(span) / (n - 1) * i * rate)``: Fraction arithmetic costs
    # more than decoding a short file.
    p, q = span.as_integer_ratio()
    q *= max(num_clips - 1, 1)
    a, b = clip.numerator, clip.denominator
    return [
        (p * i * sample_rate // q, (p * i * b + a * q) * sample_rate // (q * b))
        for i in range(num_clips)
    ]


def read(source: str | Path | BinaryIO) -> tuple[torch.Tensor, int]:
    """``(waveform [channels, samples] float32, sample_rate)`` as soundfile decodes it."""
    data, sample_rate = sf.read(source, dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), int(sample_rate)


def resample(wav: torch.Tensor, orig: int, new: int, imagebind: bool = False) -> torch.Tensor:
    """torchaudio's resampling: the functional (float32 kernel) or the transform (float64)."""
    if imagebind:
        return AF.resample(wav, orig, new)
    return torchaudio.transforms.Resample(orig, new)(wav)


def log_mel(clip: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128):
    """ImageBind's kaldi fbank of a mean-removed clip ([samples] or channel 0 of
    [channels, samples]) -> [num_mel_bins, frames], padded to one window if shorter."""
    window = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    if clip.shape[-1] < window:
        clip = torch.nn.functional.pad(clip, (0, window - clip.shape[-1]))
    return kaldi.fbank(
        clip if clip.dim() == 2 else clip.unsqueeze(0),
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
    ).T


def normalise(feats: torch.Tensor, o: dict) -> torch.Tensor:
    """[mel, frames] log-mel -> [1, mel, target_length]: crop or zero-pad, then normalise."""
    target = int(o["target_length"])
    kept = min(feats.shape[1], target)
    feats = torch.nn.functional.pad(feats[:, :kept], (0, target - kept))
    feats = (feats - o["mean"]) / o["std"]
    if o.get("utterance_norm"):
        # Summed along the rows of the output's layout, [mel, frames] row-major (kaldi's
        # transposed output, when only cropped, would be summed in another order).
        feats = feats.contiguous()
        feats[:, :kept] -= feats[:, :kept].mean(dim=1, keepdim=True)
        feats[:, kept:] = 0.0
    return feats.unsqueeze(0)


def waveform_to_clips(
    wav: torch.Tensor, sample_rate: int, options: dict | None = None
) -> torch.Tensor:
    """[channels, samples] (or [samples]) at any rate -> [num_clips, 1, mel, target_length]."""
    o = resolve_options(options)
    sr, mel = int(o["sample_rate"]), int(o["num_mel_bins"])
    wav = (wav if wav.dim() == 2 else wav.unsqueeze(0)).to(torch.float32)
    clips = []
    if o["compat"] == "imagebind":
        # Kept as torchaudio returns it, a view whose rows are longer than the samples kept, as
        # in ImageBind: a mean over several channels of a copy would be summed in another order.
        resampled = resample(wav, sample_rate, sr, imagebind=True)
        wav = wav.clone() if resampled is wav else resampled  # the clips shift it in place
        bounds = imagebind_clip_bounds(wav.shape[1], sr, o["clip_duration"], o["num_clips"])
        for begin, end in bounds:
            clip = wav[:, begin:end]
            clip -= clip.mean()  # in place: the views overlap, so later clips see this shift
            clips.append(normalise(log_mel(clip, sr, mel), o))
    else:
        mono = resample(wav.mean(dim=0), sample_rate, sr)
        length = int(o["clip_duration"] * sr)
        for start in clip_starts(mono.numel() / sr, o["clip_duration"], o["num_clips"]):
            clip = mono[int(start * sr) : int(start * sr) + length]
            clips.append(normalise(log_mel(clip - clip.mean(), sr, mel), o))
    return torch.stack(clips)


def fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    target_length: int = 204,
    mean: float = IMAGEBIND_MEAN,
    std: float = IMAGEBIND_STD,
) -> torch.Tensor:
    """One mono clip [samples] -> normalised log-mel [1, num_mel_bins, target_length]."""
    clip = waveform.to(torch.float32)
    o = {"target_length": target_length, "mean": mean, "std": std}
    return normalise(log_mel(clip - clip.mean(), sample_rate, num_mel_bins), o)


def load_and_transform_audio(paths: Sequence[str | Path | BinaryIO], **options) -> torch.Tensor:
    """Files -> [N, num_clips, 1, num_mel_bins, target_length], one file at a time."""
    return torch.stack([waveform_to_clips(*read(p), options) for p in paths])
