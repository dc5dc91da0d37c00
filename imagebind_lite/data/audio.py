"""Audio: read with soundfile, resample to 16 kHz, sample clips, kaldi fbank, normalise.

The public audio API. The recipe, its constants and the two ``compat`` modes ("default", the
project's own, and "imagebind", which reproduces ImageBind's ``load_and_transform_audio_data``
output, quirks included) are described and implemented plainly in
:mod:`imagebind_lite.data.audio_reference`, which defines correct output. The functions here run
:mod:`imagebind_lite.data.audio_engine`, which computes the same floating-point operations in the
same order, batched over clips and files on a thread pool, and so gives the reference's output
bit for bit (the reference run with ``torch.set_num_threads(1)``; the engine's output never
depends on the caller's thread count, ``num_workers`` or batching). Reading is in
:mod:`imagebind_lite.data.audio_io`.

In imagebind mode an :class:`AudioPaddingWarning` is issued when padding or cropping exceeds
20% of a clip's frames, as ImageBind logs; it is emitted once per file, not once per clip.

Bad input: :func:`read_audio` raises :class:`AudioReadError` (a ``ValueError`` with a
``reason``) for missing, empty, corrupt, truncated or NaN/inf files; digitally silent audio
loads (check it with :func:`is_silent`) and gives the log floor, -1.2776 after normalising.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from . import audio_engine as _engine
from .audio_io import AudioReadError, is_silent, read_audio
from .audio_reference import (
    COMPAT_MODES,
    DEFAULTS,
    IMAGEBIND_MEAN,
    IMAGEBIND_STD,
    clip_starts,
    imagebind_clip_bounds,
)
from .audio_reference import resolve_options as _options

__all__ = [
    "COMPAT_MODES",
    "DEFAULTS",
    "IMAGEBIND_MEAN",
    "IMAGEBIND_STD",
    "AudioPaddingWarning",
    "AudioReadError",
    "clip_starts",
    "default_num_workers",
    "fbank",
    "imagebind_clip_bounds",
    "is_silent",
    "load_and_transform_audio",
    "read_audio",
    "resample",
    "spec_augment",
    "waveform_to_clips",
]


class AudioPaddingWarning(UserWarning):
    """A clip's fbank was padded or cropped by more than 20% of its frames (imagebind mode)."""


def resample(wav: torch.Tensor, orig: int, new: int, imagebind: bool = False) -> torch.Tensor:
    """Resample ``[..., samples]`` with torchaudio's windowed-sinc defaults.

    ``imagebind=False``: as ``torchaudio.transforms.Resample`` (kernel computed in float64).
    ``imagebind=True``: bit-identical to ``torchaudio.functional.resample`` on float32 input.
    """
    if orig == new:
        return wav
    return _engine.resample(wav, int(orig), int(new), bool(imagebind))


def fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    target_length: int = 204,
    mean: float = IMAGEBIND_MEAN,
    std: float = IMAGEBIND_STD,
) -> torch.Tensor:
    """One mono clip [samples] -> normalised log-mel [1, num_mel_bins, target_length].

    Frames beyond the clip are zero-padded on the right in log-mel space before normalising,
    as ImageBind does; longer clips are cropped on the right.
    """
    o = {
        "sample_rate": sample_rate,
        "num_mel_bins": num_mel_bins,
        "target_length": target_length,
        "mean": mean,
        "std": std,
    }
    out = torch.empty(1, 1, num_mel_bins, target_length)
    waveform = waveform.to(torch.float32)
    _engine.features_into(out, [waveform - waveform.mean()], o)
    return out[0]


def waveform_to_clips(
    wav: torch.Tensor, sample_rate: int, options: dict | None = None
) -> torch.Tensor:
    """[channels, samples] (or [samples]) at any rate -> [num_clips, 1, mel bins, target_length].

    ``options`` may hold any of :data:`DEFAULTS` plus ``compat`` ("default" or "imagebind");
    other keys are ignored. See :mod:`imagebind_lite.data.audio_reference` for how the modes
    differ. ``wav`` is not modified.
    """
    o = _options(options)
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dtype != torch.float32:
        wav = wav.to(torch.float32)
    out = torch.empty(o["num_clips"], 1, o["num_mel_bins"], o["target_length"])

    def features():
        return _engine.features_into(out, _engine.clip_signals(wav, int(sample_rate), o), o)

    flagged = _engine.run_single_threaded(features)
    if flagged and o["compat"] == "imagebind":
        message = _engine.padding_message("waveform", flagged, o["target_length"])
        warnings.warn(message, AudioPaddingWarning, stacklevel=2)
    return out


def default_num_workers() -> int:
    """One worker per usable CPU, at most 8 and at most ``torch.get_num_threads()``.

    The last bound respects the caller's thread budget: DataLoader workers set torch to one
    thread, and there the parallelism already comes from the DataLoader, so each uses one.
    """
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus, torch.get_num_threads()))


def load_and_transform_audio(
    paths: Sequence[str | Path | BinaryIO], num_workers: int | None = None, **options
) -> torch.Tensor:
    """Files (paths or binary file objects) -> [N, num_clips, 1, num_mel_bins, target_length].

    ``options``: any of :data:`DEFAULTS` (sample_rate, num_clips, clip_duration, num_mel_bins,
    target_length, mean, std, utterance_norm) and ``compat`` ("default" or "imagebind"; see
    :mod:`imagebind_lite.data.audio_reference`). Files are decoded and featurised in chunks on
    ``num_workers`` threads (default: :func:`default_num_workers`; at least 1). Each worker runs
    torch single-threaded and computes the fbank of its chunk as a few batched ops that release
    the GIL, so the threads overlap. The output does not depend on ``num_workers``. Raises
    :class:`AudioReadError` naming the first bad file; emits :class:`AudioPaddingWarning`
    (imagebind mode) per file.
    """
    o = _options(options)
    paths = list(paths)
    # Plain memory, not MADV_HUGEPAGE: huge pages made whole calls slower (docs/speed.md).
    out = torch.empty(len(paths), o["num_clips"], 1, o["num_mel_bins"], o["target_length"])
    workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
    if not paths:
        return out
    for message in _engine.transform_paths(paths, out, o, workers):
        warnings.warn(message, AudioPaddingWarning, stacklevel=2)
    return out


def spec_augment(
    feats: torch.Tensor, freq_mask: int = 12, time_mask: int = 0, generator=None
) -> torch.Tensor:
    """Zero one random band of up to ``freq_mask`` mel bins (and ``time_mask`` frames) per clip.

    Masked values are set to 0, the normalised mean, as ImageBind's frequency masking does.
    """
    feats = feats.clone()
    *_, bins, frames = feats.shape
    flat = feats.reshape(-1, bins, frames)
    for clip in flat:
        for size, axis, extent in ((freq_mask, 0, bins), (time_mask, 1, frames)):
            if size <= 0:
                continue
            width = int(torch.randint(0, size + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(extent - width, 0) + 1, (1,), generator=generator))
            if axis == 0:
                clip[start : start + width, :] = 0
            else:
                clip[:, start : start + width] = 0
    return flat.reshape(feats.shape)
