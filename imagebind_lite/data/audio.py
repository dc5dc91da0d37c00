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
      ``torchaudio.functional.resample`` builds (in float32);
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

Resampling uses torchaudio's windowed-sinc kernel (sinc_interp_hann, width 6, rolloff 0.99),
cached per rate pair: built in float64 in default mode (as ``torchaudio.transforms.Resample``),
in float32 in imagebind mode (as ``torchaudio.functional.resample``, up to 6e-4 apart after
normalising).

Speed: integer PCM (WAV, FLAC, AIFF) is read as integers and scaled by an exact power of two,
the same float32 values libsndfile returns at a third of its conversion cost; the fbank is
computed for groups of ~1000 frames from many clips and files at once, in
per-thread reusable buffers (about 5 MB per thread), with the mel filters, window and resampling
kernels cached, and the mel product restricted to the bins each group of filters covers (a sixth
of the dense product's work) and computed mel-major, the features' layout. Rates with few output
phases (48, 32, 24, 8 kHz) resample with a kernel that computes 16 output samples per
convolution step, filling oneDNN's 16-channel blocks instead of padding one channel up to 16.
Both of those rely on the BLAS and oneDNN summing in the same order for another operand shape,
so each is used only where a probe at first use shows every bit unchanged.
:func:`load_and_transform_audio` spreads files over a thread pool. Every step is the same
floating-point operation, in the same order, as ``torchaudio.compliance.kaldi.fbank`` and
``torchaudio.functional.resample`` with ImageBind's arguments, so imagebind mode is
bit-identical to ImageBind's per-clip code (max abs diff 0 in ``bench/audio_preprocess.py``,
all 3000 FSDD files). One caveat, ImageBind's own: the clip mean over more than 32768 samples
(several channels, or clips over 2.048 s) is a parallel sum whose rounding depends on
``torch.get_num_threads()``, so ImageBind's output for such clips moves by ~1e-5 with the thread
count. The features are therefore computed on pool threads that run torch single-threaded, for
:func:`waveform_to_clips` too: they match ImageBind run with ``torch.set_num_threads(1)`` and do
not depend on the caller's thread count, ``num_workers`` or how files are batched.

Bad input: :func:`read_audio` raises :class:`AudioReadError` (a ``ValueError`` with a
``reason``) for missing, empty, corrupt, truncated or NaN/inf files; digitally silent audio
loads (check it with :func:`is_silent`) and gives the log floor, -1.2776 after normalising.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import BinaryIO

import numpy as np
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
    # Not ImageBind's: subtract each clip's mean log-mel spectrum over its real frames (cepstral
    # mean normalisation; padding becomes 0). It removes most of a speaker's and microphone's
    # fixed colouring, which a small encoder trained on few speakers otherwise memorises.
    "utterance_norm": False,
}

COMPAT_MODES = ("default", "imagebind")

# kaldi.fbank arguments that ImageBind fixes; the batched path below implements exactly these.
_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0
_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
_PAD_WARN_FRACTION = 0.2
_GROUP_FRAMES = 1024


# Integer PCM subtypes -> (dtype to read, scale to [-1, 1)): the same numbers libsndfile gives
# when asked for float32, which it computes as float(sample) * 2**-(bits - 1) of that dtype.
_INTEGER_READS = {
    "PCM_S8": ("int16", 2.0**-15),
    "PCM_U8": ("int16", 2.0**-15),
    "PCM_16": ("int16", 2.0**-15),
    "PCM_24": ("int32", 2.0**-31),
    "PCM_32": ("int32", 2.0**-31),
}


class AudioReadError(ValueError):
    """A file that cannot be used as audio; the message names the file and the problem.

    ``reason`` classifies it: "missing" (no such file), "empty" (zero bytes or no samples),
    "unreadable" (corrupt, truncated, undecodable) or "nan" (NaN or infinite samples).
    """

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Keeps the reason when the error crosses a process boundary (DataLoader workers).
        return type(self), (str(self), self.reason)


class AudioPaddingWarning(UserWarning):
    """A clip's fbank was padded or cropped by more than 20% of its frames (imagebind mode)."""


def _source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", repr(source)))


def read_audio(source: str | Path | BinaryIO) -> tuple[torch.Tensor, int]:
    """Return ``(waveform [channels, samples] float32, sample_rate)`` read with soundfile.

    ``source`` is a path or a binary file object (e.g. a member of a tar shard). Raises
    :class:`AudioReadError` for missing, unreadable, corrupt or truncated files, files with no
    samples and files containing NaN or infinite samples. Silent audio loads; see
    :func:`is_silent`.
    """
    is_path = isinstance(source, (str, os.PathLike))
    name = _source_name(source)
    try:
        # SoundFile directly: sf.read's extra bookkeeping costs a fifth of decoding a short WAV.
        with sf.SoundFile(os.fspath(source) if is_path else source) as handle:
            sample_rate = handle.samplerate
            integer = _INTEGER_READS.get(handle.subtype)
            data = handle.read(dtype=integer[0] if integer else "float32", always_2d=True)
    # soundfile raises LibsndfileError (a RuntimeError) for corrupt or truncated data, OSError
    # for missing files, and a corrupt header can ask for an impossible allocation.
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, MemoryError) as err:
        if is_path and not os.path.exists(source):
            raise AudioReadError(f"{name}: no such file", "missing") from None
        if is_path and os.path.getsize(source) == 0:
            raise AudioReadError(f"{name}: empty file (0 bytes)", "empty") from None
        raise AudioReadError(f"{name}: cannot be read as audio ({err})") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioReadError(f"{name}: contains no samples", "empty")
    if sample_rate <= 0:
        raise AudioReadError(f"{name}: invalid sample rate {sample_rate}")
    if integer:
        # Exact (see _INTEGER_READS), and integers are never NaN: no finiteness scan.
        data = np.multiply(data, np.float32(integer[1]), dtype=np.float32)
    # A float64 sum of float32 samples cannot overflow, so it is finite exactly when every
    # sample is, and costs a fraction of an elementwise check.
    elif not math.isfinite(data.sum(dtype=np.float64)):
        raise AudioReadError(f"{name}: contains NaN or infinite samples", "nan")
    # soundfile returns [samples, channels]; for mono the transpose is already contiguous.
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


def is_silent(wav: torch.Tensor, threshold: float = 0.0) -> bool:
    """True when no sample's magnitude exceeds ``threshold`` (default: digital silence).

    Digital silence turns into the log floor in every fbank bin (-1.2776 after normalising); the
    caller decides whether such a file is usable.
    """
    return wav.numel() == 0 or bool(wav.abs().max() <= threshold)


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int, float32_kernel: bool) -> torchaudio.transforms.Resample:
    # The kernel is built once per rate pair, not once per file. torchaudio.functional.resample
    # (what ImageBind calls) builds it in the input's float32; the transform's default builds it
    # in float64 and rounds once, which is slightly more accurate but differs by up to 4e-5.
    return torchaudio.transforms.Resample(
        orig, new, dtype=torch.float32 if float32_kernel else None
    )


def resample(wav: torch.Tensor, orig: int, new: int, imagebind: bool = False) -> torch.Tensor:
    """Resample ``[..., samples]`` with torchaudio's windowed-sinc defaults.

    ``imagebind=False``: as ``torchaudio.transforms.Resample`` (kernel computed in float64).
    ``imagebind=True``: bit-identical to ``torchaudio.functional.resample`` on float32 input.
    """
    if orig == new:
        return wav
    module = _resampler(int(orig), int(new), bool(imagebind))
    if not wav.is_floating_point():
        return module(wav)  # torchaudio's own error message
    shape, length = wav.shape, wav.shape[-1]
    flat = wav.reshape(-1, length)
    # Short signals keep torchaudio's kernel: choosing the wide one costs more than it saves.
    wide = flat.numel() >= _WIDE_KERNEL_MIN_SAMPLES
    polyphase = _polyphase_kernel(int(orig), int(new), bool(imagebind)) if wide else None
    out = _convolve(flat, module, polyphase)
    # torchaudio rounds the output length through a float32 tensor before ceil; so does this.
    step_in, step_out = module.orig_freq // module.gcd, module.new_freq // module.gcd
    keep = math.ceil(float(np.float32(step_out * length / step_in)))
    return out[..., :keep].view(*shape[:-1], -1)


def _convolve(flat: torch.Tensor, module, polyphase=None) -> torch.Tensor:
    """torchaudio's kernel application: pad, strided conv1d, interleave the output phases.

    Inlined from torchaudio, because its Python overhead per call rivals the convolution
    itself on short clips. ``polyphase``: :func:`_polyphase_kernel`'s (kernel, steps), used
    when both convolutions run on oneDNN; each of its conv steps computes that many
    consecutive steps of torchaudio's, and the last may read zeros past torchaudio's padding,
    giving outputs that the caller cuts off with the rest.
    """
    step_in = module.orig_freq // module.gcd
    length = flat.shape[-1] + 2 * module.width + step_in  # torchaudio's padded length
    kernel, steps, extra = module.kernel, 1, 0
    if polyphase is not None:
        wide, wide_steps = polyphase
        conv_steps = (length - kernel.shape[-1]) // step_in + 1
        covered = wide.shape[-1] + (math.ceil(conv_steps / wide_steps) - 1) * wide_steps * step_in
        extra = max(0, covered - length)
    with torch.no_grad():
        padded = torch.nn.functional.pad(flat, (module.width, module.width + step_in + extra))
        padded = padded[:, None]
        if polyphase is not None:
            direct = padded[..., :length]
            if _on_onednn(direct, kernel, step_in) and _on_onednn(
                padded, wide, step_in * wide_steps
            ):
                kernel, steps = wide, wide_steps
            else:
                padded = direct.contiguous()
        out = torch.nn.functional.conv1d(padded, kernel, stride=step_in * steps)
        return out.transpose(1, 2).reshape(flat.shape[0], -1)


# oneDNN computes a convolution's output channels in vector blocks of 16 (AVX-512) and pads a
# smaller count up to a block. torchaudio's kernel has one output channel per output phase
# (new / gcd): one for 48 or 32 -> 16 kHz, so 15/16 of that convolution is thrown away. The
# same outputs come from a kernel holding S shifted copies of torchaudio's, one per
# consecutive conv step, applied with S times the stride: its output channel
# s * phases + c at step t is torchaudio's channel c at step t * S + s, and the usual
# interleave puts it in place. The shifts add zero taps, which leave a sum unchanged (0 * x
# adds exactly 0), so the bits stay the same where oneDNN accumulates every output over the
# taps in the same order for both shapes: _polyphase_kernel checks that at first use. torch
# runs small single-signal convolutions on its own im2col + GEMM path instead, which sums
# in another order, so the wide kernel is used only where torch picks oneDNN for both.
# 48 -> 16 kHz, one thread: 1.21 -> 0.48 ms per 10 s.
_CONV_CHANNEL_BLOCK = 16
_WIDE_KERNEL_MIN_SAMPLES = 16384
_SELECT_CONV_BACKEND = getattr(torch._C, "_select_conv_backend", None)


def _on_onednn(padded: torch.Tensor, kernel: torch.Tensor, stride: int) -> bool:
    """Whether torch runs this conv1d on oneDNN (private API; False if it is missing)."""
    if _SELECT_CONV_BACKEND is None:
        return False
    try:
        backend = _SELECT_CONV_BACKEND(padded, kernel, None, [stride], [0], [1], False, [0], 1)
    except (RuntimeError, TypeError):
        return False
    return backend.name == "Mkldnn"


def _steps_per_conv_step(step_in: int, phases: int, taps: int) -> int:
    def work_per_output(s: int) -> float:  # multiply-adds, channels rounded up to a block
        block = _CONV_CHANNEL_BLOCK
        channels = math.ceil(s * phases / block) * block
        return channels * (taps + step_in * (s - 1)) / (s * phases)

    return min(range(1, _CONV_CHANNEL_BLOCK + 1), key=work_per_output)


@functools.lru_cache(maxsize=32)
def _polyphase_kernel(orig: int, new: int, float32_kernel: bool):
    """(kernel, steps) for :func:`_convolve`, or None where torchaudio's kernel is kept."""
    module = _resampler(orig, new, float32_kernel)
    kernel = module.kernel
    phases, _, taps = kernel.shape
    step_in = module.orig_freq // module.gcd
    steps = _steps_per_conv_step(step_in, phases, taps)
    if steps == 1:
        return None
    wide = kernel.new_zeros(steps * phases, 1, taps + step_in * (steps - 1))
    for s in range(steps):
        wide[s * phases : (s + 1) * phases, :, s * step_in : s * step_in + taps] = kernel
    # Random signals of lengths that take every tail path (shorter than the kernel, a few
    # steps, odd lengths, several seconds), mono and stereo; any bit that differs rejects
    # the wide kernel. (Threads split oneDNN's work by outputs, not within one output's sum.)
    generator = torch.Generator().manual_seed(0)
    for length in (1, step_in + 1, taps + 3, orig // 10 + 7, orig + 1, 3 * orig + 5):
        for channels in (1, 2):
            signal = torch.randn(channels, length, generator=generator)
            direct = _convolve(signal, module)
            if not torch.equal(
                direct, _convolve(signal, module, (wide, steps))[:, : direct.shape[1]]
            ):
                return None
    return wide, steps


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
    wav: torch.Tensor, sample_rate: int, o: dict, owned: bool = False, lock=None
) -> list[torch.Tensor]:
    """[channels, samples] -> one mean-removed 1-D signal per clip at ``o["sample_rate"]``.

    ``owned``: the caller lets imagebind mode shift ``wav`` in place (saves a copy).
    ``lock``: held while the clips are cut (after resampling), see _transform_files.
    """
    sr = int(o["sample_rate"])
    if o["compat"] == "imagebind":
        resampled = resample(wav, sample_rate, sr, imagebind=True)
        wav = resampled.clone() if resampled is wav and not owned else resampled
        with lock or contextlib.nullcontext():
            return _imagebind_clips(wav, sr, o)
    mono = resample(wav.mean(dim=0), sample_rate, sr)
    with lock or contextlib.nullcontext():
        return _default_clips(mono, sr, o)


def _imagebind_clips(wav: torch.Tensor, sr: int, o: dict) -> list[torch.Tensor]:
    signals, previous = [], None
    bounds = imagebind_clip_bounds(wav.shape[1], sr, o["clip_duration"], o["num_clips"])
    # Clips that do not overlap (files of at least num_clips * clip_duration) are never shifted
    # again once cut, so channel 0 of each view can be used as it is, without a copy (1-4% on
    # 10 s files). Only while the clips are at least half the waveform: a view keeps all of it
    # alive until the chunk's fbank is done, which for long recordings would be gigabytes.
    clip_samples = sum(end - begin for begin, end in bounds)
    apart = 2 * clip_samples >= wav.numel() and all(
        begin >= end for (_, end), (begin, _) in zip(bounds, bounds[1:])
    )
    for begin, end in bounds:
        view = wav[:, begin:end]
        # In place on purpose: ImageBind's clips are views, so overlapping clips see the
        # shift of earlier ones. The copy freezes channel 0 before the next clip shifts it.
        shift = view.mean()
        view -= shift
        if previous is not None and previous[0] == (begin, end) and shift.item() == 0.0:
            # The same samples, left exactly as they were (a file shorter than a clip gives
            # identical clips): share the signal so its fbank is computed once.
            signals.append(previous[1])
            continue
        signals.append(view[0] if apart else view[0].clone())
        previous = ((begin, end), signals[-1])
    return signals


def _default_clips(mono: torch.Tensor, sr: int, o: dict) -> list[torch.Tensor]:
    clip_samples = int(o["clip_duration"] * sr)
    signals, seen = [], {}
    for start in clip_starts(mono.numel() / sr, o["clip_duration"], o["num_clips"]):
        begin = int(start * sr)
        if begin not in seen:  # clips of a short file all start at 0: compute the fbank once
            clip = mono[begin : begin + clip_samples]
            seen[begin] = clip - clip.mean()
        signals.append(seen[begin])
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


# Mel filters are triangles a few FFT bins wide: 504 of the 32,896 entries of ImageBind's
# 257 x 128 matrix are non-zero. Multiplying each group of filters by only the bins it covers
# does a sixth of the dense product's work. Dropping zero terms leaves a sum's rounding alone
# only when the BLAS kernel accumulates the remaining terms in the same order; MKL's does, with
# its reduction split in two at bin 128 (so a group spanning the split adds two partial
# products). The products are preferably computed mel-major (filters x bins @ bins x frames),
# which MKL sums in the same order too: the energies then come out [mel bins, frames], the
# layout of the features, and are copied out row by row instead of by a transposing copy
# (55 us less per 10 s file). That is a property of the BLAS build and CPU, so
# _banded_mel_plan checks it against the dense product at first use, trying mel-major and
# then frame-major products, and falls back to the dense product if any bit differs.
_MEL_GROUP = 16
_MEL_SPLIT_CANDIDATES = (128, None, 256, 64)
_MEL_MAJOR_CANDIDATES = (True, False)  # mel-major first: no transposing copy afterwards
_MEL_MIN_ROWS = 16  # fewer rows take another BLAS path; the dense product is cheap there anyway


def _mel_steps(banks_t: torch.Tensor, split: int | None) -> list:
    """(first filter, filters, [(first bin, bins, filter block), ...]) per group of filters.

    The blocks of ``banks_t`` are sliced here once: each slice is a Python call holding the
    GIL that the other workers wait for.
    """
    covered = banks_t != 0
    steps = []
    for first in range(0, banks_t.shape[1], _MEL_GROUP):
        end = min(first + _MEL_GROUP, banks_t.shape[1])
        used = covered[:, first:end].any(dim=1).nonzero().flatten()
        if used.numel() == 0:
            steps.append((first, end - first, []))  # filters narrower than a bin: product 0
            continue
        lo, hi = int(used[0]), int(used[-1]) + 1
        cuts = [lo, *(c for c in range(split or hi, hi, split or 1) if c > lo), hi]
        spans = [(a, b - a, banks_t[a:b, first:end]) for a, b in zip(cuts[:-1], cuts[1:])]
        steps.append((first, end - first, spans))
    return steps


def _mel_ops(power: torch.Tensor, energies: torch.Tensor, steps, mel_major: bool) -> list:
    """(left, right, energies block, accumulate?) for each product of a plan.

    ``mel_major``: ``energies`` is [mel bins, frames] and each product is filter block (as
    filters x bins) @ power columns (as bins x frames); otherwise [frames, mel bins] and
    power columns @ filter block.
    """
    ops = []
    for first, filters, spans in steps:
        target = energies.narrow(0 if mel_major else 1, first, filters)
        if not spans:
            ops.append((None, None, target, False))
        for index, (lo, width, block) in enumerate(spans):
            columns = power.narrow(1, lo, width)
            pair = (block.T, columns.T) if mel_major else (columns, block)
            ops.append((*pair, target, index > 0))
    return ops


def _run_mel(ops) -> None:
    for left, right, target, accumulate in ops:
        if left is None:
            target.zero_()
        elif accumulate:
            target.addmm_(left, right)
        else:
            torch.mm(left, right, out=target)


@functools.lru_cache(maxsize=16)
def _banded_mel_plan(sample_rate: int, num_mel_bins: int):
    """(mel_major, steps) for a banded product bit-identical to ``power @ banks_t``, or None.

    Probed on spectra spanning 24 decades, at several row counts, single-threaded as the
    workers run; any difference in any bit rejects a candidate.
    """
    banks_t = _fbank_constants(sample_rate, num_mel_bins)[4]
    generator = torch.Generator().manual_seed(0)
    probe = torch.exp(torch.randn(1100, banks_t.shape[0], generator=generator) * 6)
    probe[::7, ::3] = 0.0  # silent bins occur in real spectra
    with torch.no_grad():
        for mel_major in _MEL_MAJOR_CANDIDATES:
            for split in _MEL_SPLIT_CANDIDATES:
                steps = _mel_steps(banks_t, split)
                if all(
                    _banded_equals_dense(probe[:rows], banks_t, steps, mel_major)
                    for rows in (_MEL_MIN_ROWS, 203, 1100)
                ):
                    return mel_major, steps
    return None


def _banded_equals_dense(
    power: torch.Tensor, banks_t: torch.Tensor, steps, mel_major: bool
) -> bool:
    frames, mels = power.shape[0], banks_t.shape[1]
    banded = torch.empty((mels, frames) if mel_major else (frames, mels))
    _run_mel(_mel_ops(power, banded, steps, mel_major))
    return torch.equal(banded.T if mel_major else banded, torch.mm(power, banks_t))


def _frames(signal: torch.Tensor, size: int, shift: int) -> torch.Tensor:
    if signal.numel() < size:
        signal = torch.nn.functional.pad(signal, (0, size - signal.numel()))
    count = 1 + (signal.numel() - size) // shift
    return signal.as_strided((count, size), (shift * signal.stride(0), signal.stride(0)))


class _Workspace(threading.local):
    """Per-thread scratch tensors, reused across chunks.

    Fresh multi-megabyte temporaries cost page faults on every chunk, and page faults from
    several threads serialise in the kernel; reuse keeps the fbank compute-bound. ``views``
    keeps the slices of those buffers that a group of a given size needs: each slice is a
    Python call, and with two workers a 1-4 us call that waits for the GIL takes 6-15 us.
    """

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, SimpleNamespace] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        """The first ``numel`` float32 elements of buffer ``name``, grown as needed."""
        held = self.store.get(name)
        if held is None or held.numel() < numel:
            held = self.store[name] = torch.empty(numel + numel // 4)
            self.views.clear()  # they point into the buffer just replaced
        return held[:numel]


_WORKSPACE = _Workspace()
_CACHED_GROUP_SHAPES = 8  # files of one length repeat a few group sizes; others come and go


def _log_mel_views(count: int, sample_rate: int, num_mel_bins: int) -> SimpleNamespace:
    """The workspace slices _log_mel uses for ``count`` frames, made once per group size."""
    ws = _WORKSPACE
    key = (count, sample_rate, num_mel_bins)
    plan = _banded_mel_plan(sample_rate, num_mel_bins) if count >= _MEL_MIN_ROWS else None
    views = ws.views.get(key)
    if views is not None and views.plan is plan:  # a re-probed plan (tests) needs new views
        return views
    size, _, padded, _, _ = _fbank_constants(sample_rate, num_mel_bins)
    bins = padded // 2 + 1
    v = SimpleNamespace()
    # Two buffers serve every stage, each reused once its contents are dead: the frames buffer
    # later holds the imaginary plane (bins <= size, since padded < 2 * size), and the FFT
    # input, once rfft has read it, holds the power spectrum and the mel energies. A group's
    # working set is then 30% smaller, which was 4-6% faster with two workers sharing the L3.
    frames = ws.get("frames", count * size)
    fft_buffer = ws.get("fft_in", count * padded)
    v.centred = frames.view(count, size)
    v.imag = frames[: count * bins].view(count, bins)
    fft_in = v.fft_in = fft_buffer.view(count, padded)
    v.emphasised, v.fft_padding = fft_in[:, :size], fft_in[:, size:]
    v.centred_body, v.centred_head = v.centred[:, :-1], v.centred[:, :1]
    v.emphasised_body, v.emphasised_head = v.emphasised[:, 1:], v.emphasised[:, :1]
    v.power = fft_buffer[: count * bins].view(count, bins)
    if bins + num_mel_bins <= padded:
        energies = fft_buffer[count * bins : count * (bins + num_mel_bins)]
    else:  # more mel bins than a frame's spare room (e.g. 256 bins at 8 kHz)
        energies = ws.get("energies", count * num_mel_bins)
    v.plan = plan
    mel_major = v.mel_major = plan is not None and plan[0]
    if mel_major:
        v.energies = v.by_mel = energies.view(num_mel_bins, count)
    else:
        v.energies = energies.view(count, num_mel_bins)
        v.by_mel = v.energies.T
    # None: the dense product, frame-major as kaldi computes it.
    v.mel = None if plan is None else _mel_ops(v.power, v.energies, plan[1], mel_major)
    if len(ws.views) >= _CACHED_GROUP_SHAPES:
        ws.views.pop(next(iter(ws.views)))
    ws.views[key] = v
    return v


def _log_mel(frames: list[torch.Tensor], sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """Frame views [m_i, window] of any number of clips -> kaldi log-mel [mel bins, sum m_i].

    kaldi.fbank's per-frame steps (DC removal, pre-emphasis with the first sample repeated,
    Hanning window, zero-pad to a power of two, power spectrum as ``abs() ** 2``, mel filters,
    log with an epsilon floor), each as the same elementwise operation kaldi uses, so the
    result is bit-identical; but once for all frames of many clips instead of once per clip,
    with the filters and window cached and the intermediates in reused buffers. The returned
    tensor lives in the calling thread's workspace: copy it out before the next call.
    """
    window, banks_t = _fbank_constants(sample_rate, num_mel_bins)[3:]
    v = _log_mel_views(sum(f.shape[0] for f in frames), sample_rate, num_mel_bins)
    centred = torch.cat(frames, out=v.centred)
    centred -= torch.mean(centred, dim=1, keepdim=True)
    # Zeroed on every call: the previous group's power spectrum and energies were written
    # here, and another frame length (sample rate) lays the buffer out in other rows.
    v.fft_padding.zero_()
    torch.mul(v.centred_body, _PREEMPHASIS, out=v.emphasised_body)
    torch.mul(v.centred_head, _PREEMPHASIS, out=v.emphasised_head)
    torch.sub(centred, v.emphasised, out=v.emphasised)
    v.emphasised.mul_(window)
    # No out=: rfft computes into a fresh tensor anyway and out= adds a copy (0.6 vs 0.35 ms).
    spectrum = torch.view_as_real(torch.fft.rfft(v.fft_in))
    # |z| as torch.hypot on contiguous real and imaginary planes: 4x faster than complex abs,
    # which runs element by element, and the same values (both round sqrt(re^2 + im^2)
    # correctly; no difference on 80M test values).
    v.power.copy_(spectrum[..., 0])
    v.imag.copy_(spectrum[..., 1])
    torch.hypot(v.power, v.imag, out=v.power).pow_(2.0)
    if v.mel is None:
        torch.mm(v.power, banks_t, out=v.energies)
    else:
        _run_mel(v.mel)
    if len(frames) > 1:
        _own_products_for_short_clips(v, frames, banks_t)
    v.energies.clamp_min_(_EPSILON_VALUE).log_()
    return v.by_mel  # ImageBind's layout, transposed from kaldi's; a view where not mel-major


_EPSILON_VALUE = float(torch.finfo(torch.float32).eps)


def _own_products_for_short_clips(v: SimpleNamespace, frames: list, banks_t) -> None:
    """Redo the mel product of each clip of fewer than _MEL_MIN_ROWS frames on its own rows.

    kaldi multiplies one clip's frames at a time, and for a few rows the BLAS takes another
    kernel, which sums in another order than the one it uses for a group's many rows; so such
    a clip's product is computed in kaldi's shape, into a fresh tensor as kaldi's is.
    """
    offset = 0
    for clip in frames:
        count = clip.shape[0]
        if count < _MEL_MIN_ROWS:
            energies = torch.mm(v.power[offset : offset + count], banks_t)
            if v.mel_major:
                v.energies[:, offset : offset + count].copy_(energies.T)
            else:
                v.energies[offset : offset + count].copy_(energies)
        offset += count


def _features_into(
    out: torch.Tensor, signals: list[torch.Tensor], o: dict
) -> list[tuple[int, int]]:
    """Write normalised fbanks of ``signals`` into ``out`` [len(signals), 1, mel, target].

    Returns ``(clip index, frames)`` for clips padded or cropped by more than 20%.
    """
    sr, mel = int(o["sample_rate"]), int(o["num_mel_bins"])
    size, shift, *_ = _fbank_constants(sr, mel)
    # The same signal object twice (identical clips) is computed once and copied.
    first_of: dict[int, int] = {}
    duplicates: list[tuple[int, int]] = []
    unique: list[int] = []
    for i, signal in enumerate(signals):
        if id(signal) in first_of:
            duplicates.append((i, first_of[id(signal)]))
        else:
            first_of[id(signal)] = i
            unique.append(i)
    if duplicates:
        flagged = _features_into_unique(out, [signals[i] for i in unique], unique, o)
        for i, source in duplicates:
            out[i].copy_(out[source])
            flagged += [(i, count) for j, count in flagged if j == source]
        return sorted(flagged)
    return _features_into_unique(out, signals, range(len(signals)), o)


@functools.lru_cache(maxsize=8)
def _normalised_zero(mean: float, std: float) -> float:
    # In float32, as the normalisation itself computes it.
    return torch.zeros(()).sub_(mean).div_(std).item()


def _features_into_unique(
    out: torch.Tensor, signals: list[torch.Tensor], rows, o: dict
) -> list[tuple[int, int]]:
    sr, mel, target = int(o["sample_rate"]), int(o["num_mel_bins"]), int(o["target_length"])
    size, shift, *_ = _fbank_constants(sr, mel)
    rows = list(rows)
    frames = [_frames(s, size, shift) for s in signals]
    # Normalising before padding gives the same numbers as ImageBind's pad-then-normalise,
    # since padding zeros become the constant (0 - mean) / std.
    pad_value = _normalised_zero(o["mean"], o["std"])
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
            offset, i = 0, first
            while i < last:
                # A run of equally long clips in consecutive rows (the clips of one file, or
                # files of equal length) is copied and padded with one op each: every torch
                # call releases and retakes the GIL, which the other worker may be waiting for.
                count = frames[i].shape[0]
                end = i + 1
                while (
                    end < last and frames[end].shape[0] == count and rows[end] == rows[end - 1] + 1
                ):
                    end += 1
                n, kept = end - i, min(count, target)
                # copy_/fill_ rather than item assignment: tensor __setitem__ holds the GIL
                # for the whole copy, which would serialise the worker threads.
                block = out[rows[i] : rows[i] + n, 0]
                clips = logmel[:, offset : offset + n * count].view(mel, n, count)
                block[:, :, :kept].copy_(clips[:, :, :kept].transpose(0, 1))
                clip_pad = pad_value
                if o.get("utterance_norm"):
                    real = block[:, :, :kept]
                    real.sub_(real.mean(dim=2, keepdim=True))
                    clip_pad = 0.0
                if kept < target:
                    block[:, :, kept:].fill_(clip_pad)
                offset += n * count
                if abs(target - count) / count > _PAD_WARN_FRACTION:
                    flagged.extend((rows[j], count) for j in range(i, end))
                i = end
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
    waveform = waveform.to(torch.float32)
    _features_into(out, [waveform - waveform.mean()], o)
    return out[0]


def _padding_message(path, flagged: list[tuple[int, int]], target: int) -> str:
    clips = ", ".join(f"clip {i}: {n} frames" for i, n in flagged)
    return f"{path}: fbank padded/cropped to {target} frames by over 20% ({clips})"


def waveform_to_clips(
    wav: torch.Tensor, sample_rate: int, options: dict | None = None
) -> torch.Tensor:
    """[channels, samples] (or [samples]) at any rate -> [num_clips, 1, mel bins, target_length].

    ``options`` may hold any of :data:`DEFAULTS` plus ``compat`` ("default" or "imagebind");
    other keys are ignored. See the module docstring for how the modes differ.
    """
    o = _options(options)
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dtype != torch.float32:
        wav = wav.to(torch.float32)
    out = torch.empty(o["num_clips"], 1, o["num_mel_bins"], o["target_length"])
    flagged = _single_threaded(lambda: _features_into(out, _clip_signals(wav, sample_rate, o), o))
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
        # Decoding and cutting clips are many short Python-level calls into soundfile and
        # torch, each of which drops and retakes the GIL; two workers doing that at once hand
        # the GIL back and forth (a 1-4 us torch call takes 6-15 us) and both slow down. One
        # worker at a time in those phases, while the other runs the GIL-free batched fbank,
        # was 15% faster on FSDD and 11% on 10 s 16 kHz files. A long file's resampling is heavy
        # GIL-free work, so it runs outside the lock (holding it cost 20% on 5 s files); a file
        # already at the target rate needs none and keeps the lock for its clips (3-4%).
        with _DECODE_LOCK:
            wav, rate = read_audio(path)
            if wav.numel() <= _SERIAL_DECODE_SAMPLES or rate == o["sample_rate"]:
                signals.extend(_clip_signals(wav, rate, o, owned=True))
                continue
        signals.extend(_clip_signals(wav, rate, o, owned=True, lock=_DECODE_LOCK))
    flat = out.view(-1, *out.shape[2:])
    flagged = _features_into(flat, signals, o)
    if o["compat"] != "imagebind" or not flagged:
        return []
    per_file: dict[int, list[tuple[int, int]]] = {}
    for index, count in flagged:
        per_file.setdefault(index // o["num_clips"], []).append((index % o["num_clips"], count))
    target = o["target_length"]
    return [_padding_message(_source_name(paths[f]), c, target) for f, c in per_file.items()]


_DECODE_LOCK = threading.Lock()
_SERIAL_DECODE_SAMPLES = 64000
_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
# Set in pool threads, so that work submitted from inside one runs inline instead of waiting
# on a pool that may be busy running its caller.
_IN_WORKER = threading.local()


def _single_threaded(fn, *args):
    """Run ``fn(*args)`` on a pool thread whose torch ops are single-threaded.

    Features then never depend on the caller's torch thread count (see the module docstring),
    and a lone call is not slowed by OpenMP threads spinning against other jobs.
    """
    if getattr(_IN_WORKER, "active", False):
        return fn(*args)
    return _pool(1).submit(fn, *args).result()


def _pool(workers: int) -> ThreadPoolExecutor:
    # Reused across calls: a training loop calls this once per batch.
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = _start_pool(workers)
        return _POOLS[workers]


def _start_pool(workers: int) -> ThreadPoolExecutor:
    """A pool whose threads run torch ops single-threaded.

    Two reasons: results that do not depend on the caller's thread count (see the module
    docstring), and no oversubscription, since the workers already keep the cores busy and
    OpenMP teams inside each would spin against each other (and against other jobs on a
    shared machine, which made single calls 10-50x slower in our measurements).
    torch.set_num_threads is per thread for OpenMP and MKL but also sets the default for
    threads created later, so the caller's value is put back once every worker has its own.
    """
    pool = ThreadPoolExecutor(workers, thread_name_prefix="audio")
    caller_threads = torch.get_num_threads()
    ready = threading.Barrier(workers)

    def single_threaded() -> None:
        torch.get_num_threads()  # torch's lazy per-thread init would undo a setting made before
        torch.set_num_threads(1)
        _IN_WORKER.active = True
        ready.wait(timeout=60)  # one task per thread: no thread can take two

    try:
        for future in [pool.submit(single_threaded) for _ in range(workers)]:
            future.result()
    finally:
        torch.set_num_threads(caller_threads)
    return pool


@atexit.register
def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)


def _forget_pools_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) inherits pool objects but not their threads;
    # submitting to them would wait forever.
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


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
    target_length, mean, std) and ``compat`` ("default" or "imagebind"; see the module
    docstring). Files are decoded and featurised in chunks on ``num_workers`` threads (default:
    :func:`default_num_workers`; at least 1). Each worker runs torch single-threaded and
    computes the fbank of its chunk as a few batched ops that release the GIL, so the threads
    overlap. The output does not depend on ``num_workers``. Raises :class:`AudioReadError`
    naming the first bad file; emits :class:`AudioPaddingWarning` (imagebind mode) per file.
    """
    o = _options(options)
    paths = list(paths)
    # Plain memory: MADV_HUGEPAGE here once saved page faults, but made whole calls 21% slower
    # on 10 s files later, on the same kind of machine (docs/speed.md).
    out = torch.empty(len(paths), o["num_clips"], 1, o["num_mel_bins"], o["target_length"])
    workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
    if not paths:
        return out
    # Chunks big enough to amortise per-op overhead, small enough to balance the threads.
    chunk = max(1, min(32, math.ceil(len(paths) / (2 * workers))))
    spans = [(i, min(i + chunk, len(paths))) for i in range(0, len(paths), chunk)]
    if getattr(_IN_WORKER, "active", False):  # called from one of our own workers
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
