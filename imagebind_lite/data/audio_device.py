"""Log-mel features computed on the accelerator, in batches: ``features_on: device``.

The CPU path (:mod:`imagebind_lite.data.audio_engine`) decodes, resamples, cuts clips and takes
the kaldi fbank in DataLoader workers. With ``data.preprocess.features_on: device`` the workers
stop after cutting the clips: they emit *packed clips*, ``[num_clips, 1 + clip_samples]``
float32 rows holding each clip's length in samples followed by its mean-removed 16 kHz signal
(zero-padded), which collate into a plain batch tensor. The training step then calls
:func:`log_mel_batch` on that batch on the device: kaldi's per-frame steps (DC removal,
pre-emphasis, Hann window, power spectrum, mel filters, log floor), normalisation, crop/pad to
``target_length`` and ``utterance_norm``, all as batched tensor ops. The result equals the CPU
path's within 1e-4 (not bit for bit: FFT and matmul kernels sum in other orders). Frequency and
time masking then run on the device too (:func:`spec_augment_batch`).

The whole recipe is supported (both ``compat`` modes, ``utterance_norm``). Dataset-level feature
augmentations (AV-MNIST's ``time_shift``, ``freq_warp``, ``time_warp``) belong to a dataset that
holds its features in memory and so has no decoding to move: it refuses ``features_on: device``
in one line.
"""

from __future__ import annotations

import functools

import torch
from torchaudio.compliance import kaldi

from . import audio_engine as _engine
from .audio_reference import FRAME_LENGTH_MS, FRAME_SHIFT_MS
from .audio_reference import resolve_options as _options

FEATURES_ON = ("worker", "device")
_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
_EPSILON = float(torch.finfo(torch.float32).eps)


def features_on(options: dict) -> str:
    """``options["features_on"]`` ("worker", the default, or "device"), validated."""
    where = options.get("features_on") or "worker"
    if where not in FEATURES_ON:
        raise ValueError(
            f"data.preprocess.features_on: expected one of {FEATURES_ON}, got {where!r}"
        )
    return where


def clip_samples(options: dict) -> int:
    """Samples of one packed clip: a clip's length, at least one 25 ms window."""
    o = _options(options)
    window = int(o["sample_rate"] * FRAME_LENGTH_MS * 0.001)
    return max(int(o["clip_duration"] * o["sample_rate"]), window)


def pack_clips(wav: torch.Tensor, sample_rate: int, options: dict) -> torch.Tensor:
    """[channels, samples] at any rate -> packed clips [num_clips, 1 + clip_samples] (CPU)."""
    o = _options(options)
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    wav = wav.to(torch.float32)
    signals = _engine.run_single_threaded(_engine.clip_signals, wav, int(sample_rate), o)
    width = clip_samples(o)
    out = torch.zeros(len(signals), 1 + width)
    for row, signal in zip(out, signals):
        kept = min(signal.numel(), width)
        row[0] = kept
        row[1 : 1 + kept] = signal[:kept]
    return out


@functools.lru_cache(maxsize=16)
def _constants(sample_rate: int, num_mel_bins: int, device: str):
    size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    banks, _ = kaldi.get_mel_banks(
        num_mel_bins, padded, float(sample_rate), _LOW_FREQ, 0.0, 100.0, -500.0, 1.0
    )
    banks = torch.nn.functional.pad(banks.to(torch.float64), (0, 1)).T.contiguous()
    window = torch.hann_window(size, periodic=False, dtype=torch.float32)
    return size, shift, padded, window.to(device), banks.to(device)


def log_mel_batch(packed: torch.Tensor, options: dict) -> torch.Tensor:
    """Packed clips [..., 1 + samples] on any device -> normalised log-mel [..., 1, mel, target].

    The same features as :func:`imagebind_lite.data.audio.waveform_to_clips` within 1e-4. The
    mel product runs in float64, so TF32 settings do not move it.
    """
    o = _options(options)
    sr, mel, target = int(o["sample_rate"]), int(o["num_mel_bins"]), int(o["target_length"])
    size, shift, padded, window, banks = _constants(sr, mel, str(packed.device))
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, packed.shape[-1]).to(torch.float32)
    lengths, signals = flat[:, 0].round().long(), flat[:, 1:]
    if signals.shape[1] < size:
        signals = torch.nn.functional.pad(signals, (0, size - signals.shape[1]))
    frames = signals.unfold(1, size, shift)  # [clips, F, window]
    frames = frames - frames.mean(dim=2, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)
    frames = (frames - _PREEMPHASIS * previous) * window
    spectrum = torch.fft.rfft(frames, n=padded)
    power = (spectrum.real.square() + spectrum.imag.square()).to(torch.float64)
    energies = (power @ banks).to(torch.float32).clamp_min_(_EPSILON).log_()  # [clips, F, mel]
    feats = energies.transpose(1, 2)[:, :, :target]
    feats = (feats - o["mean"]) / o["std"]
    valid = 1 + (lengths.clamp_min(size) - size) // shift  # real frames per clip
    kept = valid.clamp_max(target)
    positions = torch.arange(feats.shape[2], device=feats.device)
    real = positions[None, None, :] < kept[:, None, None]
    if o.get("utterance_norm"):
        mean = (feats * real).sum(dim=2, keepdim=True) / kept[:, None, None]
        feats, pad_value = feats - mean, 0.0
    else:
        pad_value = (0.0 - o["mean"]) / o["std"]
    feats = torch.where(real, feats, torch.full_like(feats, pad_value))
    if feats.shape[2] < target:
        feats = torch.nn.functional.pad(feats, (0, target - feats.shape[2]), value=pad_value)
    return feats.reshape(*lead, 1, mel, target)


def spec_augment_batch(
    feats: torch.Tensor, freq_mask: int = 12, time_mask: int = 0, generator=None
) -> torch.Tensor:
    """:func:`imagebind_lite.data.audio.spec_augment` for a whole batch on its device: one
    random band of up to ``freq_mask`` bins (and ``time_mask`` frames) per clip set to 0.
    ``generator`` lives on the batch's device (None: torch's default one)."""
    *lead, bins, frames = feats.shape
    flat = feats.reshape(-1, bins, frames)
    keep = torch.ones_like(flat, dtype=torch.bool)
    for size, extent, axis in ((freq_mask, bins, 1), (time_mask, frames, 2)):
        if size <= 0:
            continue
        shape, dev = (flat.shape[0], 1, 1), flat.device
        width = torch.randint(0, size + 1, shape, device=dev, generator=generator)
        start = (
            torch.rand(shape, device=dev, generator=generator) * (extent - width + 1).clamp_min(1)
        ).long()
        index = torch.arange(extent, device=dev).view((1, -1, 1) if axis == 1 else (1, 1, -1))
        keep &= ~((index >= start) & (index < start + width))
    return (flat * keep).reshape(feats.shape)
