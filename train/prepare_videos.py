"""A folder of videos -> (middle frame JPG, 16 kHz mono audio) pairs and a manifest.

    python train/prepare_videos.py VIDEOS --out OUT [--audio-format flac] [--label-from-folder]

Writes ``OUT/frames/<relative path>.jpg`` (the frame at the middle of the video stream),
``OUT/audio/<relative path>.flac`` (all of the first audio stream, downmixed to mono and
resampled to ``--sample-rate`` Hz, 16-bit) and ``OUT/manifest.csv`` with ``id, vision, audio``
(and ``label``: the first folder under VIDEOS, with ``--label-from-folder``), ready for
``data.dataset=manifest data.root=OUT data.options.manifest=manifest.csv``. Videos that cannot
be used (no video or audio stream, undecodable) are listed with the reason in
``OUT/failures.csv`` and left out; outputs that already exist are kept unless ``--overwrite``,
so an interrupted run continues where it stopped. Decoding uses PyAV (``pip install av``).
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from imagebind_lite.cli import OneLineArgumentParser, run_script
from imagebind_lite.files import VIDEO_EXTS


def _av():
    try:
        import av
    except ImportError:
        raise SystemExit("prepare_videos.py needs PyAV: pip install av") from None
    return av


def middle_frame(path: Path):
    """The first decoded frame at or after the middle of the first video stream (PIL image)."""
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        base = stream.time_base
        start = float(stream.start_time * base) if stream.start_time is not None else 0.0
        if stream.duration is not None:
            duration = float(stream.duration * base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        target = start + duration / 2
        if duration > 0:
            # Seek to the keyframe before the middle, then decode forward to it.
            container.seek(int(target / base), stream=stream, backward=True, any_frame=False)
        last = None
        for frame in container.decode(stream):
            last = frame
            if frame.time is None or frame.time + 1e-6 >= target:
                return frame.to_image().convert("RGB")
        if last is None:
            raise ValueError("no decodable video frame")
        return last.to_image().convert("RGB")


def audio_track(path: Path, sample_rate: int) -> np.ndarray:
    """The first audio stream, mono float32 at ``sample_rate``."""
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise ValueError("empty audio stream")
    wav = np.concatenate(chunks).astype(np.float32)
    if not np.isfinite(wav).all():
        raise ValueError("audio contains NaN or infinite samples")
    return wav


def prepare_one(
    video: Path, rel: Path, out: Path, sample_rate: int, audio_format: str, overwrite: bool
) -> tuple[str, str]:
    """-> (frame path, audio path) relative to ``out``; raises ValueError/av errors."""
    frame_rel = Path("frames") / rel.with_suffix(".jpg")
    audio_rel = Path("audio") / rel.with_suffix(f".{audio_format}")
    if overwrite or not (out / frame_rel).is_file():
        image = middle_frame(video)
        (out / frame_rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / frame_rel, quality=95)
    if overwrite or not (out / audio_rel).is_file():
        wav = audio_track(video, sample_rate)
        (out / audio_rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out / audio_rel, wav, sample_rate, subtype="PCM_16", format=audio_format.upper())
    return frame_rel.as_posix(), audio_rel.as_posix()


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("videos", help="folder of videos (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--audio-format", choices=["flac", "wav"], default="flac")
    parser.add_argument(
        "--label-from-folder", action="store_true", help="label = the first folder under VIDEOS"
    )
    parser.add_argument("--workers", type=int, default=1, help="videos decoded in parallel")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    source, out = Path(args.videos), Path(args.out)
    if not source.is_dir():
        raise SystemExit(f"not a folder: {source}")
    videos = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    if not videos:
        raise SystemExit(f"no videos ({', '.join(VIDEO_EXTS)}) under {source}")
    out.mkdir(parents=True, exist_ok=True)
    rels = [v.relative_to(source) for v in videos]

    def work(item):
        video, rel = item
        try:
            return prepare_one(
                video, rel, out, args.sample_rate, args.audio_format, args.overwrite
            ), None
        # PyAV raises av.error.* (OSError/ValueError subclasses) for broken containers/codecs.
        except (ValueError, OSError, RuntimeError) as err:
            return None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        results = list(pool.map(work, zip(videos, rels)))

    rows, failures = [], []
    for rel, (paths, error) in zip(rels, results):
        if error is not None:
            failures.append({"video": rel.as_posix(), "error": error})
            continue
        row = {"id": rel.with_suffix("").as_posix(), "vision": paths[0], "audio": paths[1]}
        if args.label_from_folder:
            row["label"] = rel.parts[0] if len(rel.parts) > 1 else ""
        rows.append(row)
    fields = ["id", "vision", "audio"] + (["label"] if args.label_from_folder else [])
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with (out / "failures.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "error"])
        writer.writeheader()
        writer.writerows(failures)
    summary = {
        "videos": len(videos),
        "pairs": len(rows),
        "failed": len(failures),
        "manifest": str(out / "manifest.csv"),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_script(main, lambda result: result["pairs"])
