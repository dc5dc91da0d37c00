"""Training throughput with and without the anchor cache on a manifest dataset of real files.

    python bench/manifest_cache.py [--clips 128] [--batch 16] [--steps 3] [--repeats 5]
                                   [--image-size 224] [field=value ...]

Writes an image+audio manifest of the repository's shipped data into a temporary folder: FSDD
recordings (``imagebind_lite/assets/avmnist/audio``, FLAC) each paired with a UCI digit image of
its digit, saved as a PNG of ``--image-size`` pixels, and a ``pairs.csv``. Both runs read it
through the registered ``manifest`` dataset (``configs/audio.yaml`` with
``data.dataset=manifest``), so every step decodes and augments the audio files; the uncached run
also decodes the images and runs the anchor, the cached one reads the embeddings that
``write_anchor_cache`` wrote (timed too). The anchor is an open_clip ViT-B-32 at 224x224 with
random weights (as in ``bench/train_step.py``), the encoder the tiny audio ViT; config
overrides (``anchor.model=...``) change either.

The same loss check, alternation and load-robust figures as ``bench/train_step.py``; the last
stdout line is a JSON object: ``cached_samples_per_second``, ``uncached_samples_per_second``,
``speedup``, ``speedup_median_of_repeat_ratios``, ``speedup_cpu_time``, ``max_loss_diff`` and
the configuration.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .` too
sys.path.insert(0, str(REPO / "bench"))

from train_step import Run, _machine, measure, speed_summary  # noqa: E402

from imagebind_lite.anchor import Anchor  # noqa: E402
from imagebind_lite.cache import attach_anchor_cache, write_anchor_cache  # noqa: E402
from imagebind_lite.cli import OneLineArgumentParser, positive_int, run_script  # noqa: E402
from imagebind_lite.config import ConfigError, load_config  # noqa: E402
from imagebind_lite.data.avmnist import DEFAULT_ROOT, load_digit_images  # noqa: E402
from imagebind_lite.data.datasets import get_dataset_builder  # noqa: E402
from imagebind_lite.modalities import build_encoder, get_modality  # noqa: E402

DEFAULTS = [  # the bench's anchor and encoder; overrides given on the command line come after
    "data.dataset=manifest",
    "data.options={manifest: pairs.csv}",
    "anchor.model=ViT-B-32",
    "anchor.model_config=null",
    "anchor.pretrained=null",
    "encoder.size=tiny",
    "encoder.overrides={}",
    "data.num_workers=0",
]


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=positive_int, default=128, help="pairs in the manifest")
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--check-steps", type=int, default=2, help="steps of the loss check")
    parser.add_argument(
        "--image-size", type=positive_int, default=224, help="pixels of the PNG files"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config section.field=value")
    args = parser.parse_args(argv)
    if args.clips < args.batch:
        parser.error(f"--clips {args.clips} is fewer than one --batch {args.batch}")
    return args


def write_manifest(root: Path, clips: int, image_size: int) -> Path:
    """FSDD clips (copied FLAC files) with digit images of their digits (PNG) and pairs.csv."""
    files = sorted((DEFAULT_ROOT / "audio").glob("*.flac"))
    if len(files) < clips:
        raise ValueError(f"--clips {clips}: {DEFAULT_ROOT / 'audio'} holds {len(files)} clips")
    images, labels = load_digit_images()
    by_digit = {d: (labels == d).nonzero().flatten().tolist() for d in range(10)}
    (root / "audio").mkdir(parents=True)
    (root / "frames").mkdir()
    rows = []
    for i, clip in enumerate(files[:: max(1, len(files) // clips)][:clips]):
        digit = int(clip.name.split("_")[0])
        pick = by_digit[digit][i % len(by_digit[digit])]
        pixels = (images[pick].numpy() * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)
        image.convert("RGB").save(root / f"frames/{i}.png")
        (root / "audio" / clip.name).write_bytes(clip.read_bytes())
        rows.append({"id": f"clip{i}", "audio": f"audio/{clip.name}", "vision": f"frames/{i}.png"})
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "audio", "vision"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def build(root: Path, overrides: list[str], accelerator):
    """(config, anchor, two training sets of the manifest: plain and for cache mode, encoder)."""
    cfg = load_config(REPO / "configs/audio.yaml", [*DEFAULTS, f"data.root={root}", *overrides])
    if cfg.modality != "audio":
        raise ConfigError(f"modality: this bench pairs audio files, not {cfg.modality!r}")
    anchor = Anchor(cfg.anchor, device=accelerator.device)
    spec = get_modality(cfg.modality)
    builder = get_dataset_builder(cfg.data.dataset)
    plain, for_cache = (builder(cfg, anchor, spec).train for _ in range(2))
    preprocess = {**spec.preprocess, **cfg.data.preprocess}
    encoder = build_encoder(
        "audio", anchor.embed_dim, cfg.encoder.size, cfg.encoder.overrides, preprocess, 0.05
    )
    return cfg, anchor, plain, for_cache, encoder


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-manifest-cache-") as folder:
        root = write_manifest(Path(folder) / "data", args.clips, args.image_size)
        cfg, anchor, plain, for_cache, encoder = build(root, args.overrides, accelerator)
        start = time.perf_counter()
        report = write_anchor_cache(
            anchor, for_cache, Path(folder) / "cache", dataset_info={"name": "manifest"}
        )
        cache_seconds = time.perf_counter() - start
        cached = attach_anchor_cache(for_cache, Path(folder) / "cache", anchor, "manifest")
        runs = {
            "uncached": Run(accelerator, encoder, plain, args.batch, args.seed),
            "cached": Run(accelerator, encoder, cached, args.batch, args.seed),
        }
        rates, cpu, max_diff = measure(args, runs, anchor)
    result = summarise(args, cfg, anchor, encoder, rates, cpu, max_diff)
    result["cache_write_images_per_second"] = report["entries"] / cache_seconds
    result["config"].update(device=str(accelerator.device), load_average_start=list(load))
    result["config"]["load_average_end"] = list(os.getloadavg())
    if max_diff > 1e-5:
        print(f"WARNING: cached and uncached losses differ by {max_diff:.2e} (> 1e-5)")
    print(json.dumps(result))
    return result


def summarise(args, cfg, anchor, encoder, rates, cpu, max_diff) -> dict:
    return speed_summary(rates, cpu, max_diff) | {
        "config": {
            "dataset": "manifest: FSDD FLAC clips + UCI digit PNGs",
            "clips": args.clips,
            "image_size": args.image_size,
            "anchor": cfg.anchor.model,
            "anchor_image_size": list(anchor.image_size),
            "encoder": f"audio {cfg.encoder.size}",
            "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "batch": args.batch,
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "machine": _machine("cpu" if not torch.cuda.is_available() else "cuda"),
            "torch": torch.__version__,
        },
    }


if __name__ == "__main__":
    run_script(main)
