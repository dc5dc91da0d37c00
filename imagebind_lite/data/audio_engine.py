"""The fast audio engine: ``audio_reference``'s recipe computed for many clips and files at once.

Invariants:

* Every output equals ``audio_reference`` bit for bit. Each step is the same floating-point
  operation, in the same order, as ``torchaudio.functional.resample`` (or the ``Resample``
  transform) and ``kaldi.fbank`` with ImageBind's arguments; batching only changes how many
  rows one op covers. Two steps have faster forms whose bits depend on the order in which a
  library sums (the banded mel product, the wide resampling kernel); each is used only where a
  probe shows every bit unchanged, and otherwise the plain form runs.
* Features are computed on pool threads that run torch single-threaded (``waveform_to_clips``
  too), so they never depend on the caller's thread count, ``num_workers`` or batching: they
  match the reference run with ``torch.set_num_threads(1)``.
* Buffers are per thread and reused; a returned tensor never aliases one.

How: resampling kernels and mel filters are cached; torchaudio's kernel application is inlined
(its Python overhead per call rivals the convolution on short clips); the fbank runs on groups
of about 1000 frames from many clips and files in per-thread buffers (a few MB per thread), with
the mel product restricted to the bins each group of filters covers; files are spread over a
thread pool, whose decoding is serialised by a lock while the batched fbank, which releases the
GIL, overlaps it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
import torchaudio
from torchaudio.compliance import kaldi

from .audio_io import read_audio, source_name
from .audio_reference import FRAME_LENGTH_MS, FRAME_SHIFT_MS, clip_starts, imagebind_clip_bounds

# kaldi.fbank arguments that ImageBind fixes; the batched fbank below implements exactly these.
_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
_EPSILON_VALUE = float(torch.finfo(torch.float32).eps)
PAD_WARN_FRACTION = 0.2  # ImageBind logs clips padded or cropped by more than this
_GROUP_FRAMES = 1024


# ---------------------------------------------------------------------------------------------
# Resampling


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int, float32_kernel: bool) -> torchaudio.transforms.Resample:
    # The kernel is built once per rate pair, not once per file. torchaudio.functional.resample
    # (what ImageBind calls) builds it in the input's float32; the transform's default builds it
    # in float64 and rounds once, which is slightly more accurate but differs by up to 4e-5.
    return torchaudio.transforms.Resample(
        orig, new, dtype=torch.float32 if float32_kernel else None
    )


def resample(wav: torch.Tensor, orig: int, new: int, float32_kernel: bool) -> torch.Tensor:
    """``[..., samples]`` -> torchaudio's resampling, bit for bit (``orig != new``)."""
    module = _resampler(orig, new, float32_kernel)
    if not wav.is_floating_point():
        return module(wav)  # torchaudio's own error message
    shape, length = wav.shape, wav.shape[-1]
    flat = wav.reshape(-1, length)
    wide = None
    # Short signals keep torchaudio's kernel: looking for the wide one costs more than it saves.
    if flat.numel() >= _WIDE_KERNEL_MIN_SAMPLES:
        wide = _polyphase_kernel(orig, new, float32_kernel)
        if wide is not None and not _wide_kernel_exact(flat.shape, module, wide, float32_kernel):
            wide = None
    out = _convolve(flat, module, wide)
    # torchaudio rounds the output length through a float32 tensor before ceil; so does this.
    step_in, step_out = module.orig_freq // module.gcd, module.new_freq // module.gcd
    keep = math.ceil(float(np.float32(step_out * length / step_in)))
    return out[..., :keep].view(*shape[:-1], -1)


def _convolve(flat: torch.Tensor, module, wide=None) -> torch.Tensor:
    """torchaudio's kernel application: pad, strided conv1d, interleave the output phases.

    ``wide``: :func:`_polyphase_kernel`'s (kernel, steps). Each of its conv steps computes that
    many consecutive steps of torchaudio's; the input gets the extra zeros the last one reads,
    and the outputs those give lie past torchaudio's, where the caller cuts them off.
    """
    step_in = module.orig_freq // module.gcd
    length = flat.shape[-1] + 2 * module.width + step_in  # torchaudio's padded length
    kernel, stride, extra = module.kernel, step_in, 0
    if wide is not None:
        kernel, steps = wide
        conv_steps = (length - module.kernel.shape[-1]) // step_in + 1
        covered = kernel.shape[-1] + (math.ceil(conv_steps / steps) - 1) * steps * step_in
        extra, stride = max(0, covered - length), step_in * steps
    with torch.no_grad():
        padded = torch.nn.functional.pad(flat, (module.width, module.width + step_in + extra))
        out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=stride)
        return out.transpose(1, 2).reshape(flat.shape[0], -1)


# oneDNN computes a convolution's output channels in vector blocks of 16 (AVX-512) and pads a
# smaller count up to a block. torchaudio's kernel has one output channel per output phase
# (new / gcd): one for 48 or 32 -> 16 kHz, so 15/16 of that convolution is thrown away. The
# same outputs come from a kernel holding S shifted copies of torchaudio's, one per
# consecutive conv step, applied with S times the stride: its output channel
# s * phases + c at step t is torchaudio's channel c at step t * S + s, and the usual
# interleave puts it in place. The shifts add zero taps, which leave a sum unchanged (0 * x
# adds exactly 0), so the bits stay the same wherever the backend accumulates every output over
# the taps in the same order for both kernels, as oneDNN does. But torch picks a convolution
# backend per input shape (a single short signal runs on its own im2col + GEMM path, which sums
# in another order), so the wide kernel is used for an input shape only once a probe on random
# data of exactly that shape gave torchaudio's bits (_wide_kernel_exact).
_CONV_CHANNEL_BLOCK = 16
_WIDE_KERNEL_MIN_SAMPLES = 16384
# Probe verdicts per input shape and torch setting: True, False, or _SEEN. A shape is probed
# the second time it comes, not the first: files of ever new lengths would each pay for a probe
# that is never reused, while a data set of equally long files pays for one.
_SEEN = "seen"
_WIDE_SHAPES: dict[tuple, object] = {}
_WIDE_SHAPES_KEPT = 256
_WIDE_SHAPES_LOCK = threading.Lock()


def _wide_kernel_exact(shape, module, wide, float32_kernel: bool) -> bool:
    """Whether ``wide`` gives torchaudio's bits for input ``shape`` here (see above)."""
    # Everything torch's choice of convolution backend can depend on besides the shape.
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    key = (module.orig_freq, module.new_freq, float32_kernel, *shape, threads, onednn)
    with _WIDE_SHAPES_LOCK:
        verdict = _WIDE_SHAPES.get(key)
        if verdict is None:
            if len(_WIDE_SHAPES) >= _WIDE_SHAPES_KEPT:
                _WIDE_SHAPES.pop(next(iter(_WIDE_SHAPES)))
            _WIDE_SHAPES[key] = _SEEN
            return False
    if verdict is _SEEN:
        probe = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        direct = _convolve(probe, module)
        verdict = torch.equal(_convolve(probe, module, wide)[:, : direct.shape[1]], direct)
        with _WIDE_SHAPES_LOCK:
            _WIDE_SHAPES[key] = verdict
    return verdict is True


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
    return wide, steps


# ---------------------------------------------------------------------------------------------
# Clips


def clip_signals(
    wav: torch.Tensor, sample_rate: int, o: dict, owned: bool = False, lock=None
) -> list[torch.Tensor]:
    """[channels, samples] float32 -> one mean-removed 1-D signal per clip at ``o["sample_rate"]``.

    ``owned``: the caller lets imagebind mode shift ``wav`` in place (saves a copy).
    ``lock``: held while the clips are cut (after resampling), see :func:`transform_files`.
    """
    sr = int(o["sample_rate"])
    if o["compat"] == "imagebind":
        resampled = wav if sample_rate == sr else resample(wav, sample_rate, sr, True)
        wav = resampled.clone() if resampled is wav and not owned else resampled
        with lock or contextlib.nullcontext():
            return _imagebind_clips(wav, sr, o)
    mono = wav.mean(dim=0)
    if sample_rate != sr:
        mono = resample(mono, sample_rate, sr, False)
    with lock or contextlib.nullcontext():
        return _default_clips(mono, sr, o)


def _imagebind_clips(wav: torch.Tensor, sr: int, o: dict) -> list[torch.Tensor]:
    signals, previous = [], None
    bounds = imagebind_clip_bounds(wav.shape[1], sr, o["clip_duration"], o["num_clips"])
    # Clips that do not overlap (files of at least num_clips * clip_duration) are never shifted
    # again once cut, so channel 0 of each view can be used as it is, without a copy. Only while
    # the clips are at least half the waveform: a view keeps all of it alive until the chunk's
    # fbank is done, which for long recordings would be gigabytes.
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


# ---------------------------------------------------------------------------------------------
# Fbank


@functools.lru_cache(maxsize=16)
def _fbank_constants(sample_rate: int, num_mel_bins: int):
    # Same expressions as kaldi.fbank, so window sizes and filters match bit for bit.
    shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
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
# layout of the features, and are copied out row by row instead of by a transposing copy.
# That is a property of the BLAS build and CPU, so _banded_mel_plan checks it against the
# dense product at first use, trying mel-major and then frame-major products, and falls back
# to the dense product if any bit differs.
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
    Python call, which with several workers waits for the GIL.
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
    if views is not None and views.plan is plan:  # a re-probed plan needs new views
        return views
    size, _, padded, _, _ = _fbank_constants(sample_rate, num_mel_bins)
    bins = padded // 2 + 1
    v = SimpleNamespace()
    # Two buffers serve every stage, each reused once its contents are dead, which keeps a
    # group's working set small (the workers share the L3): the frames buffer later holds the
    # imaginary plane (bins <= size, since padded < 2 * size), and the FFT input, once rfft has
    # read it, holds the power spectrum and the mel energies.
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
    result is bit-identical; but once for all frames of many clips instead of once per clip.
    The returned tensor lives in the calling thread's workspace: copy it out before the next
    call.
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
    # No out=: rfft computes into a fresh tensor anyway, and out= adds a copy.
    spectrum = torch.view_as_real(torch.fft.rfft(v.fft_in))
    # |z| as torch.hypot on contiguous real and imaginary planes, which is vectorised where
    # complex abs runs element by element; both round sqrt(re^2 + im^2) correctly, so the
    # values are the same.
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


def features_into(out: torch.Tensor, signals: list[torch.Tensor], o: dict) -> list[tuple[int, int]]:
    """Write normalised fbanks of ``signals`` into ``out`` [len(signals), 1, mel, target].

    Returns ``(clip index, frames)`` for clips padded or cropped by more than 20%.
    """
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
    sr, mel = int(o["sample_rate"]), int(o["num_mel_bins"])
    size, shift, *_ = _fbank_constants(sr, mel)
    rows = list(rows)
    frames = [_frames(s, size, shift) for s in signals]
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
            flagged += _copy_group(
                out, logmel, [f.shape[0] for f in frames[first:last]], rows[first:last], o
            )
            first = last
    return flagged


def _copy_group(out, logmel, counts: list[int], rows: list[int], o: dict) -> list:
    """Copy a group's normalised log-mel [mel, sum counts] into ``out`` rows, cropped/padded."""
    target = int(o["target_length"])
    # Normalising before padding gives the same numbers as ImageBind's pad-then-normalise,
    # since padding zeros become the constant (0 - mean) / std.
    pad_value = 0.0 if o.get("utterance_norm") else _normalised_zero(o["mean"], o["std"])
    flagged, offset, i = [], 0, 0
    while i < len(counts):
        # A run of equally long clips in consecutive rows (the clips of one file, or files of
        # equal length) is copied and padded with one op each: every torch call releases and
        # retakes the GIL, which the other workers may be waiting for.
        count, end = counts[i], i + 1
        while end < len(counts) and counts[end] == count and rows[end] == rows[end - 1] + 1:
            end += 1
        n, kept = end - i, min(count, target)
        # copy_/fill_ rather than item assignment: tensor __setitem__ holds the GIL for the
        # whole copy, which would serialise the worker threads.
        block = out[rows[i] : rows[i] + n, 0]
        clips = logmel[:, offset : offset + n * count].view(logmel.shape[0], n, count)
        block[:, :, :kept].copy_(clips[:, :, :kept].transpose(0, 1))
        if o.get("utterance_norm"):
            real = block[:, :, :kept]
            real.sub_(real.mean(dim=2, keepdim=True))
        if kept < target:
            block[:, :, kept:].fill_(pad_value)
        offset += n * count
        if abs(target - count) / count > PAD_WARN_FRACTION:
            flagged.extend((rows[j], count) for j in range(i, end))
        i = end
    return flagged


# ---------------------------------------------------------------------------------------------
# Files and threads


def padding_message(name: str, flagged: list[tuple[int, int]], target: int) -> str:
    clips = ", ".join(f"clip {i}: {n} frames" for i, n in flagged)
    return f"{name}: fbank padded/cropped to {target} frames by over 20% ({clips})"


def transform_files(paths: Sequence, out: torch.Tensor, o: dict) -> list[str]:
    """Fill ``out`` [len(paths), clips, 1, mel, target]; return padding warnings to emit."""
    signals = []
    for path in paths:
        # Decoding and cutting clips are many short Python-level calls into soundfile and
        # torch, each of which drops and retakes the GIL; two workers doing that at once hand
        # the GIL back and forth and both slow down. So one worker at a time runs those phases,
        # while the others run the GIL-free batched fbank. A long file's resampling is heavy
        # GIL-free work, so it runs outside the lock; a file already at the target rate needs
        # none and keeps the lock for its clips.
        with _DECODE_LOCK:
            wav, rate = read_audio(path)
            if wav.numel() <= _SERIAL_DECODE_SAMPLES or rate == o["sample_rate"]:
                signals.extend(clip_signals(wav, rate, o, owned=True))
                continue
        signals.extend(clip_signals(wav, rate, o, owned=True, lock=_DECODE_LOCK))
    flat = out.view(-1, *out.shape[2:])
    flagged = features_into(flat, signals, o)
    if o["compat"] != "imagebind" or not flagged:
        return []
    per_file: dict[int, list[tuple[int, int]]] = {}
    for index, count in flagged:
        per_file.setdefault(index // o["num_clips"], []).append((index % o["num_clips"], count))
    target = o["target_length"]
    return [padding_message(source_name(paths[f]), c, target) for f, c in per_file.items()]


def transform_paths(paths: list, out: torch.Tensor, o: dict, workers: int) -> list[str]:
    """:func:`transform_files` over chunks of ``paths`` on ``workers`` pool threads."""
    # Chunks big enough to amortise per-op overhead, small enough to balance the threads.
    chunk = max(1, min(32, math.ceil(len(paths) / (2 * workers))))
    spans = [(i, min(i + chunk, len(paths))) for i in range(0, len(paths), chunk)]
    if getattr(_IN_WORKER, "active", False):  # called from one of our own workers
        return [m for a, b in spans for m in transform_files(paths[a:b], out[a:b], o)]
    pool = _pool(workers)
    futures = [pool.submit(transform_files, paths[a:b], out[a:b], o) for a, b in spans]
    return [m for f in futures for m in f.result()]


_DECODE_LOCK = threading.Lock()
_SERIAL_DECODE_SAMPLES = 64000
_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
# Set in pool threads, so that work submitted from inside one runs inline instead of waiting
# on a pool that may be busy running its caller.
_IN_WORKER = threading.local()


def run_single_threaded(fn, *args):
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
    shared machine). torch.set_num_threads is per thread for OpenMP and MKL but also sets the
    default for threads created later, so the caller's value is put back once every worker
    has its own.
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
    # submitting to them would wait forever. Locks are renewed: one may have been held by a
    # thread that the child does not have.
    global _POOL_LOCK, _WIDE_SHAPES_LOCK
    _POOL_LOCK, _WIDE_SHAPES_LOCK = threading.Lock(), threading.Lock()
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)
