"""Audio: read with soundfile, resample to 16 kHz, sample clips, kaldi fbank, normalise.

Constants and the clip recipe follow ImageBind (see README, "Audio preprocessing"):
128 mel bins, 25 ms Hanning windows every 10 ms, 204 frames per 2 s clip, 3 clips with evenly
spaced starts, normalised with mean -4.268 and std 9.138. Frames beyond the clip are zero-padded
in log-mel space before normalising, so padding reads (0 - mean) / std = 0.467.

Two modes, chosen with the ``compat`` option:

``compat="default"`` (the project's own recipe)
    * channels are averaged to mono before resampling (stereo keeps both sides' content);
    * each clip's mean is removed from a copy, so overlapping clips never affect each other;
    * clip starts are ``i * max(duration - clip, 0) / (num_clips - 1)`` in floating point, and a
      single clip is centred in the file;
    * no warning when a short file's clips are heavily padded (short files are routine, e.g.
      spoken digits, and the caller sees the padding in the features anyway).

``compat="imagebind"`` (reproduces ImageBind's ``load_and_transform_audio_data`` output)
    * the whole ``[channels, samples]`` waveform is resampled with the kernel that
      ``torchaudio.functional.resample`` builds (float32, sinc_interp_hann, width 6, rolloff 0.99);
    * clips are views of that waveform and each view's mean, taken over *all* channels, is
      subtracted in place, so when clips overlap (files between 2 s and 6 s for 3 clips of 2 s)
      a later clip inherits the earlier clip's shift on the shared samples;
    * the fbank is computed on channel 0 only;
    * clip starts are exact fractions ``i * max(duration - clip, 0) / max(num_clips - 1, 1)``
      (a single clip starts at 0) and sample indices are ``int(t * sample_rate)``;
    * an :class:`AudioPaddingWarning` is issued when padding or cropping exceeds 20% of a clip's
      frames, as ImageBind logs; it is emitted once per file, not once per clip.

Both modes zero-pad a clip shorter than one 25 ms window up to one window (ImageBind's fbank
asserts on such input); a file shorter than ``clip_duration`` yields ``num_clips`` clips of the
whole file.

The fbank is computed for all clips of many files at once. It performs the same floating-point
operations, in the same order, as ``torchaudio.compliance.kaldi.fbank`` with ImageBind's
arguments, so the features match a per-clip kaldi call; see ``bench/audio_preprocess.py``.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import soundfile as sf
import torch
import torchaudio
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
}

COMPAT_MODES = ("default", "imagebind")

# kaldi.fbank arguments that ImageBind fixes; the batched path below implements exactly these.
_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0
_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
_PAD_WARN_FRACTION = 0.2
_GROUP_FRAMES = 4096


class AudioReadError(ValueError):
    """A file that cannot be used as audio; the message names the file and the problem."""


class AudioPaddingWarning(UserWarning):
    """A clip's fbank was padded or cropped by more than 20% of its frames (imagebind mode)."""


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Return ``(waveform [channels, samples] float32, sample_rate)`` read with soundfile.

    Raises :class:`AudioReadError` for unreadable, corrupt or truncated files, files with no
    samples and files containing NaN or infinite samples. Silent audio loads; see
    :func:`is_silent`.
    """
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    # soundfile raises LibsndfileError (a RuntimeError) for corrupt or truncated data, OSError
    # for missing files, and a corrupt header can ask for an impossible allocation.
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, MemoryError) as err:
        raise AudioReadError(f"{path}: cannot be read as audio ({err})") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioReadError(f"{path}: contains no samples")
    if sample_rate <= 0:
        raise AudioReadError(f"{path}: invalid sample rate {sample_rate}")
    wav = torch.from_numpy(data.T.copy())
    if not torch.isfinite(wav).all():
        raise AudioReadError(f"{path}: contains NaN or infinite samples")
    return wav, int(sample_rate)


def is_silent(wav: torch.Tensor, threshold: float = 0.0) -> bool:
    """True when no sample's magnitude exceeds ``threshold`` (default: digital silence).

    Digital silence turns into the log floor in every fbank bin (-1.2776 after normalising); the
    caller decides whether such a file is usable.
    """
    return wav.numel() == 0 or bool(wav.abs().max() <= threshold)


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # The kernel is built once per rate pair, not once per file. dtype=float32 builds it the way
    # torchaudio.functional.resample does for float32 input (the transform's default builds it
    # in float64, which differs by up to 4e-5 and would break bit-exactness with ImageBind).
    return torchaudio.transforms.Resample(orig, new, dtype=torch.float32)


def resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Resample ``[..., samples]`` like ``torchaudio.functional.resample`` with its defaults."""
    if orig == new:
        return wav
    with torch.no_grad():
        return _resampler(int(orig), int(new))(wav)


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


def _options(options: dict | None) -> dict:
    o = {**DEFAULTS, "compat": "default", **(options or {})}
    if o["compat"] not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {o['compat']!r}")
    if o["num_clips"] < 1 or o["clip_duration"] <= 0 or o["target_length"] < 1:
        raise ValueError(
            "num_clips and target_length must be >= 1 and clip_duration > 0, got "
            f"{o['num_clips']}, {o['target_length']}, {o['clip_duration']}"
        )
    return o


def _clip_signals(
    wav: torch.Tensor, sample_rate: int, o: dict, owned: bool = False
) -> list[torch.Tensor]:
    """[channels, samples] -> one mean-removed 1-D signal per clip at ``o["sample_rate"]``.

    ``owned``: the caller lets imagebind mode shift ``wav`` in place (saves a copy).
    """
    sr = int(o["sample_rate"])
    if o["compat"] == "imagebind":
        resampled = resample(wav, sample_rate, sr)
        wav = resampled.clone() if resampled is wav and not owned else resampled
        signals = []
        for begin, end in imagebind_clip_bounds(
            wav.shape[1], sr, o["clip_duration"], o["num_clips"]
        ):
            view = wav[:, begin:end]
            # In place on purpose: ImageBind's clips are views, so overlapping clips see the
            # shift of earlier ones. The copy freezes channel 0 before the next clip shifts it.
            view -= view.mean()
            signals.append(view[0].clone())
        return signals
    mono = resample(wav.mean(dim=0), sample_rate, sr)
    clip_samples = int(o["clip_duration"] * sr)
    signals = []
    for start in clip_starts(mono.numel() / sr, o["clip_duration"], o["num_clips"]):
        clip = mono[int(start * sr) : int(start * sr) + clip_samples]
        signals.append(clip - clip.mean())
    return signals


@functools.lru_cache(maxsize=16)
def _fbank_constants(sample_rate: int, num_mel_bins: int):
    # Same expressions as kaldi.fbank, so window sizes and filters match bit for bit.
    shift = int(sample_rate * _FRAME_SHIFT_MS * 0.001)
    size = int(sample_rate * _FRAME_LENGTH_MS * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    window = torch.hann_window(size, periodic=False, dtype=torch.float32)
    banks, _ = kaldi.get_mel_banks(
        num_mel_bins, padded, float(sample_rate), _LOW_FREQ, 0.0, 100.0, -500.0, 1.0
    )
    banks = torch.nn.functional.pad(banks.to(torch.float32), (0, 1))
    # Kept as a transposed view: kaldi multiplies by ``banks.T`` and BLAS rounds differently
    # for a contiguous copy.
    return size, shift, padded, window, banks.T


def _frames(signal: torch.Tensor, size: int, shift: int) -> torch.Tensor:
    if signal.numel() < size:
        signal = torch.nn.functional.pad(signal, (0, size - signal.numel()))
    count = 1 + (signal.numel() - size) // shift
    return signal.as_strided((count, size), (shift * signal.stride(0), signal.stride(0)))


class _Workspace(threading.local):
    """Per-thread scratch tensors, reused across chunks.

    Fresh multi-megabyte temporaries cost page faults on every chunk, and page faults from
    several threads serialise in the kernel; reuse keeps the fbank compute-bound.
    """

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
        held = self.store.get(name)
        if held is None or held.numel() < rows * cols or held.dtype != dtype:
            held = self.store[name] = torch.empty(rows * cols + rows * cols // 4, dtype=dtype)
        return held[: rows * cols].view(rows, cols)


_WORKSPACE = _Workspace()


def _log_mel(frames: list[torch.Tensor], sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """Frame views [m_i, window] of any number of clips -> kaldi log-mel [sum m_i, mel bins].

    kaldi.fbank's per-frame steps (DC removal, pre-emphasis with the first sample repeated,
    Hanning window, zero-pad to a power of two, power spectrum as ``abs() ** 2``, mel filters,
    log with an epsilon floor), each as the same elementwise operation kaldi uses, so the
    result is bit-identical; but once for all frames of many clips instead of once per clip,
    with the filters and window cached and the intermediates in reused buffers. The returned
    tensor lives in the calling thread's workspace: copy it out before the next call.
    """
    size, _, padded, window, banks_t = _fbank_constants(sample_rate, num_mel_bins)
    count = sum(f.shape[0] for f in frames)
    ws = _WORKSPACE
    centred = torch.cat(frames, out=ws.get("frames", count, size))
    centred -= torch.mean(centred, dim=1).unsqueeze(1)
    fft_in = ws.get("fft_in", count, padded)
    fft_in[:, size:] = 0
    emphasised = fft_in[:, :size]
    torch.mul(centred[:, :-1], _PREEMPHASIS, out=emphasised[:, 1:])
    torch.mul(centred[:, :1], _PREEMPHASIS, out=emphasised[:, :1])
    torch.sub(centred, emphasised, out=emphasised)
    emphasised *= window
    spectrum = torch.fft.rfft(fft_in, out=ws.get("spectrum", count, padded // 2 + 1, torch.cfloat))
    power = torch.abs(spectrum, out=ws.get("power", count, padded // 2 + 1)).pow_(2.0)
    energies = torch.mm(power, banks_t, out=ws.get("energies", count, num_mel_bins))
    return energies.clamp_min_(_EPSILON_VALUE).log_()


_EPSILON_VALUE = float(torch.finfo(torch.float32).eps)


def _features_into(
    out: torch.Tensor, signals: list[torch.Tensor], o: dict
) -> list[tuple[int, int]]:
    """Write normalised fbanks of ``signals`` into ``out`` [len(signals), 1, mel, target].

    Returns ``(clip index, frames)`` for clips padded or cropped by more than 20%.
    """
    sr, mel, target = int(o["sample_rate"]), int(o["num_mel_bins"]), int(o["target_length"])
    size, shift, *_ = _fbank_constants(sr, mel)
    frames = [_frames(s, size, shift) for s in signals]
    # Normalising before padding gives the same numbers as ImageBind's pad-then-normalise,
    # since padding zeros become the constant (0 - mean) / std.
    pad_value = torch.zeros(()).sub_(o["mean"]).div_(o["std"]).item()
    flagged, first = [], 0
    with torch.no_grad():
        while first < len(frames):
            # Groups of about _GROUP_FRAMES frames bound the workspace and stay cache-friendly.
            last, total = first, 0
            while last < len(frames) and (last == first or total < _GROUP_FRAMES):
                total += frames[last].shape[0]
                last += 1
            logmel = _log_mel(frames[first:last], sr, mel)
            logmel.sub_(o["mean"]).div_(o["std"])
            offset = 0
            for i in range(first, last):
                count = frames[i].shape[0]
                kept = min(count, target)
                out[i, 0, :, :kept] = logmel[offset : offset + kept].T
                if kept < target:
                    out[i, 0, :, kept:] = pad_value
                offset += count
                if abs(target - count) / count > _PAD_WARN_FRACTION:
                    flagged.append((i, count))
            first = last
    return flagged


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
    _features_into(out, [waveform - waveform.mean()], o)
    return out[0]


def _padding_message(path, flagged: list[tuple[int, int]], target: int) -> str:
    clips = ", ".join(f"clip {i}: {n} frames" for i, n in flagged)
    return f"{path}: fbank padded/cropped to {target} frames by over 20% ({clips})"


def waveform_to_clips(
    wav: torch.Tensor, sample_rate: int, options: dict | None = None
) -> torch.Tensor:
    """[channels, samples] at any rate -> [num_clips, 1, num_mel_bins, target_length].

    ``options`` may hold any of :data:`DEFAULTS` plus ``compat`` ("default" or "imagebind");
    other keys are ignored. See the module docstring for how the modes differ.
    """
    o = _options(options)
    out = torch.empty(o["num_clips"], 1, o["num_mel_bins"], o["target_length"])
    flagged = _features_into(out, _clip_signals(wav, sample_rate, o), o)
    if flagged and o["compat"] == "imagebind":
        warnings.warn(
            _padding_message("waveform", flagged, o["target_length"]),
            AudioPaddingWarning,
            stacklevel=2,
        )
    return out


def _transform_files(paths: Sequence, out: torch.Tensor, o: dict) -> list[str]:
    """Fill ``out`` [len(paths), clips, 1, mel, target]; return padding warnings to emit."""
    signals = []
    for path in paths:
        signals.extend(_clip_signals(*read_audio(path), o, owned=True))
    flat = out.view(-1, *out.shape[2:])
    flagged = _features_into(flat, signals, o)
    if o["compat"] != "imagebind" or not flagged:
        return []
    per_file: dict[int, list[tuple[int, int]]] = {}
    for index, count in flagged:
        per_file.setdefault(index // o["num_clips"], []).append((index % o["num_clips"], count))
    return [_padding_message(paths[f], c, o["target_length"]) for f, c in per_file.items()]


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    # Reused across calls: a training loop calls this once per batch.
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="audio")
        return _POOLS[workers]


@atexit.register
def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)


def default_num_workers() -> int:
    """One worker per usable CPU, at most 8."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def load_and_transform_audio(
    paths: Sequence[str | Path], num_workers: int | None = None, **options
) -> torch.Tensor:
    """Files -> [N, num_clips, 1, num_mel_bins, target_length].

    ``options``: any of :data:`DEFAULTS` (sample_rate, num_clips, clip_duration, num_mel_bins,
    target_length, mean, std) and ``compat`` ("default" or "imagebind"). Files are decoded and
    featurised in chunks on ``num_workers`` threads (default: one per CPU, at most 8; 0 or 1
    runs inline). The fbank of a whole chunk is one batched computation whose big ops release
    the GIL, so threads overlap. Raises :class:`AudioReadError` naming the first bad file.
    """
    o = _options(options)
    paths = list(paths)
    out = torch.empty(len(paths), o["num_clips"], 1, o["num_mel_bins"], o["target_length"])
    workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
    if not paths:
        return out
    # Chunks big enough to amortise per-op overhead, small enough to balance the threads.
    chunk = max(1, min(32, math.ceil(len(paths) / (2 * workers))))
    spans = [(i, min(i + chunk, len(paths))) for i in range(0, len(paths), chunk)]
    if workers == 1 or len(spans) == 1:
        messages = [m for a, b in spans for m in _transform_files(paths[a:b], out[a:b], o)]
    else:
        pool = _pool(workers)
        futures = [pool.submit(_transform_files, paths[a:b], out[a:b], o) for a, b in spans]
        messages = [m for f in futures for m in f.result()]
    for message in messages:
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
