"""Audio preprocessing throughput: project pipeline vs ImageBind's per-file recipe.

    python bench/audio_preprocess.py DIR [--limit N] [--batch-size B] [--workers W] [--repeat R]
                                         [--torch-threads T]

Both pipelines run in the same process on the same files (page cache warmed first), in
ImageBind-compatible mode; each is timed R times, interleaved, and the best time counts (noise on a
shared machine only ever adds time). The median of the R per-round ratios is reported beside it.
The outputs are compared. The reference is the recipe ImageBind applies file by file: decode
(soundfile here: torchaudio.load needs torchcodec, which is absent), torchaudio.functional.resample
(which rebuilds its kernel on every call), per clip an in-place mean shift, one kaldi fbank, pad,
normalise, then stack. It leaves out ImageBind's per-clip padding log line, which would only slow
it down. The project pipeline is ``load_and_transform_audio`` on batches of files: worker
threads, cached resampler kernels, one batched fbank per group of about 1000 frames.

The last line of stdout is a JSON object: clips_per_second, reference_clips_per_second, ratio,
max_abs_diff, files (plus ratio_median_of_rounds, clips, batch_size, workers, torch_threads,
load_average_before).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF
from torchaudio.compliance import kaldi

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.cli import OneLineArgumentParser, existing_folder, positive_int, run_script
from imagebind_lite.data import audio

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff"}
SAMPLE_RATE, NUM_CLIPS, CLIP_SECONDS = 16000, 3, 2
NUM_MEL_BINS, TARGET_LENGTH = 128, 204


def reference_transform(path: Path) -> torch.Tensor:
    """One file -> [3, 1, 128, 204], step by step as ImageBind's loader does it."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(data.T.copy())
    if sr != SAMPLE_RATE:
        waveform = AF.resample(waveform, orig_freq=sr, new_freq=SAMPLE_RATE)
    duration = waveform.shape[1] / SAMPLE_RATE
    step = Fraction(max(duration - CLIP_SECONDS, 0)) / (NUM_CLIPS - 1)
    mean = torch.tensor([audio.IMAGEBIND_MEAN]).view(1, 1, 1)
    std = torch.tensor([audio.IMAGEBIND_STD]).view(1, 1, 1)
    clips = []
    for i in range(NUM_CLIPS):
        start = step * i
        clip = waveform[:, int(start * SAMPLE_RATE) : int((start + CLIP_SECONDS) * SAMPLE_RATE)]
        clip -= clip.mean()
        feats = kaldi.fbank(
            clip,
            htk_compat=True,
            sample_frequency=SAMPLE_RATE,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=NUM_MEL_BINS,
            dither=0.0,
            frame_length=25,
            frame_shift=10,
        ).transpose(0, 1)
        gap = TARGET_LENGTH - feats.shape[1]
        if gap > 0:
            feats = torch.nn.functional.pad(feats, (0, gap))
        else:
            feats = feats[:, :TARGET_LENGTH]
        clips.append(feats.unsqueeze(0).sub_(mean).div_(std))
    return torch.stack(clips)


def find_files(folder: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    usable = []
    for path in files:
        if limit is not None and len(usable) >= limit:
            break
        # Also warms the page cache, so neither pipeline pays for cold reads.
        try:
            wav, sr = audio.read_audio(path)
        except audio.AudioReadError as err:
            print(f"skipping {err}", file=sys.stderr)
            continue
        if wav.shape[1] * SAMPLE_RATE // sr >= 400:  # ImageBind's fbank needs one 25 ms window
            usable.append(path)
    return usable


def run_reference(files: list[Path]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = torch.stack([reference_transform(p) for p in files])
    return time.perf_counter() - start, out


def run_project(
    files: list[Path], batch_size: int, workers: int | None
) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    batches = [
        audio.load_and_transform_audio(
            files[i : i + batch_size], num_workers=workers, compat="imagebind"
        )
        for i in range(0, len(files), batch_size)
    ]
    elapsed = time.perf_counter() - start
    return elapsed, torch.cat(batches)


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="use the first N audio files"
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="files per call")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="threads for the project pipeline (one per CPU)",
    )
    parser.add_argument("--repeat", type=positive_int, default=5, help="best of R timed runs each")
    parser.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads for both pipelines (default: torch's own, as ImageBind runs)."
        " On a machine shared with other jobs, OpenMP threads spinning against them slow the"
        " per-clip reference far more than usual; 1 gives a fairer comparison there.",
    )
    args = parser.parse_args(argv)
    existing_folder(args.folder, "folder")
    if args.workers is None:
        # Not default_num_workers(): that follows torch's thread count, which --torch-threads sets.
        args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    # Other jobs on the machine skew both figures (the reference far more): report the load.
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    files = find_files(args.folder, args.limit)
    if not files:
        raise FileNotFoundError(f"{args.folder}: no readable audio files")
    clips = len(files) * NUM_CLIPS
    # ImageBind warns about every short clip; that would flood the output here.
    warnings.simplefilter("ignore", audio.AudioPaddingWarning)

    # Untimed warm-up: first-call costs (FFT plans, thread start) are not throughput.
    reference_transform(files[0])
    run_project(files[:1], args.batch_size, args.workers)

    ref_times, project_times = [], []
    for _ in range(max(1, args.repeat)):
        elapsed, ref_out = run_reference(files)
        ref_times.append(elapsed)
        elapsed, out = run_project(files, args.batch_size, args.workers)
        project_times.append(elapsed)
    ref_time, project_time = min(ref_times), min(project_times)
    round_ratios = [r / p for r, p in zip(ref_times, project_times)]

    max_abs_diff = (out - ref_out).abs().max().item()
    result = {
        "clips_per_second": round(clips / project_time, 1),
        "reference_clips_per_second": round(clips / ref_time, 1),
        "ratio": round(ref_time / project_time, 2),
        "ratio_median_of_rounds": round(statistics.median(round_ratios), 2),
        "max_abs_diff": max_abs_diff,
        "files": len(files),
        "clips": clips,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load,
    }
    print(f"files: {len(files)} ({clips} clips) from {args.folder}; load average before: {load}")
    print(f"project   (load_and_transform_audio): {result['clips_per_second']:.1f} clips/s")
    print(
        f"reference (per file, ImageBind steps): {result['reference_clips_per_second']:.1f} clips/s"
    )
    print(
        f"ratio: {result['ratio']:.2f}x (median of rounds {result['ratio_median_of_rounds']:.2f}x)"
        f"  max abs diff: {max_abs_diff:.3g}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
