"""ESC-50-shaped test audio from short recordings: 5 s, 44.1 kHz, 16-bit mono WAV.

    python bench/make_long_audio.py ../shared/data/fsdd/recordings /tmp/esc_like [--count 200]

ESC-50 itself cannot be downloaded here. Its clips are 5 s at 44.1 kHz, which makes resampling
and three overlapping 2 s clips per file the dominant work, unlike FSDD's short 8 kHz digits.
Each output file joins consecutive input recordings until it is long enough, resamples with
torchaudio's default kernel and is written as PCM_16, as ESC-50 is. Deterministic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.cli import (  # noqa: E402
    OneLineArgumentParser,
    existing_folder,
    positive_int,
    run_script,
)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of short recordings (WAV/FLAC)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=positive_int, default=200)
    parser.add_argument("--seconds", type=positive_float, default=5.0)
    parser.add_argument("--rate", type=positive_int, default=44100)
    args = parser.parse_args(argv)
    source = existing_folder(args.source, "source")
    sources = sorted(p for p in source.rglob("*") if p.suffix.lower() in {".wav", ".flac"})
    if not sources:
        raise FileNotFoundError(f"source: no WAV or FLAC files under {source}")
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"out: {args.out} is a file, not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    position = 0
    for index in range(args.count):
        parts, length = [], 0.0
        while length < args.seconds:
            data, rate = sf.read(str(sources[position % len(sources)]), dtype="float32")
            position += 1
            if data.ndim > 1:
                data = data.mean(axis=1)
            wav = AF.resample(torch.from_numpy(data), rate, args.rate).numpy()
            parts.append(wav)
            length += len(wav) / args.rate
        joined = np.concatenate(parts)[: int(args.seconds * args.rate)]
        sf.write(args.out / f"{index:03d}.wav", np.clip(joined, -1, 1), args.rate, subtype="PCM_16")
    print(f"wrote {args.count} files of {args.seconds:g} s at {args.rate} Hz to {args.out}")


if __name__ == "__main__":
    run_script(main)
