"""Reading audio files with soundfile, and the errors bad files raise.

Integer PCM (WAV, FLAC, AIFF) is read as integers and scaled by an exact power of two: the
same float32 values libsndfile returns when asked for float32, for less than its own
conversion costs. Bad input raises :class:`AudioReadError` (a ``ValueError`` with a ``reason``) for
missing, empty, corrupt, truncated or NaN/inf files; digitally silent audio loads (check it
with :func:`is_silent`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

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


def source_name(source) -> str:
    """A path's string, or a file object's ``name`` (e.g. a tar member's)."""
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
    name = source_name(source)
    try:
        # SoundFile directly: sf.read's bookkeeping per call is a visible part of decoding a
        # short WAV.
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
