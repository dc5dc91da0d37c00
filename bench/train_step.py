"""Training throughput with and without the anchor embedding cache, in one process.

    python bench/train_step.py [--batch 16] [--steps 3] [--repeats 5] [--images 96]

The anchor is an open_clip ViT-B-32 at 224x224 with random weights (built offline; weights do
not change the cost), the trained encoder the tiny audio ViT on 64x112 fbank. Both runs use the
same data (AV-MNIST-style pairing, ``PairedAudioImages``: each clip with a random image of its
digit), the same initial weights and the same shuffling, through ``train_step`` with Accelerate. The
cached run reads the embeddings written by ``write_anchor_cache`` (timed as well) instead of
stacking 224x224 images and running the anchor.

Checks first that the two runs follow the same loss curve (``--check-steps`` steps from the same
start on the same views), then times ``--steps`` steps per repeat, alternating uncached and cached
repeats so that load from other processes hits both alike. Samples per second are medians over
repeats; since other processes may share the CPUs, the median of per-repeat ratios and the
process CPU time per sample are reported too. The last stdout line is a JSON object:
``cached_samples_per_second``, ``uncached_samples_per_second``, ``speedup``, ``max_loss_diff``,
those robust figures and the configuration.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.anchor import Anchor
from imagebind_lite.cache import attach_anchor_cache, write_anchor_cache
from imagebind_lite.cli import OneLineArgumentParser, positive_int, run_script
from imagebind_lite.config import AnchorConfig
from imagebind_lite.data.avmnist import PairedAudioImages
from imagebind_lite.data.datasets import collate
from imagebind_lite.modalities import build_encoder
from imagebind_lite.train import (
    AlignmentModule,
    AlignmentObjective,
    StepContext,
    param_groups,
    train_step,
)

FBANK = {"num_mel_bins": 64, "target_length": 112}  # configs/audio.yaml
TEMPERATURE = 0.05


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor", default="ViT-B-32", help="open_clip model (random weights)")
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--check-steps", type=int, default=3, help="steps of the loss check")
    parser.add_argument(
        "--images", type=positive_int, default=96, help="distinct images (cache size)"
    )
    parser.add_argument("--clips", type=positive_int, default=256, help="training clips")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clips < args.batch:
        parser.error(f"--clips {args.clips} is fewer than one --batch {args.batch}")
    if args.anchor not in open_clip.list_models():
        parser.error(f"--anchor: unknown open_clip model {args.anchor!r}")
    return args


def make_datasets(anchor: Anchor, images: int, clips: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pixels = anchor.normalize_pixels(torch.rand(images, 3, *anchor.image_size, generator=g))
    image_labels = torch.arange(images) % 10
    features = torch.randn(clips, 1, FBANK["num_mel_bins"], FBANK["target_length"], generator=g)
    labels = torch.arange(clips) % 10
    ids = [f"clip-{i}" for i in range(clips)]
    image_ids = [f"image-{i}" for i in range(images)]

    def build():
        return PairedAudioImages(
            features, labels, ids, pixels, image_labels, "audio", seed=seed, image_ids=image_ids
        )

    return build(), build()  # two instances: one stays in normal mode, one goes to cache mode


class Run:
    """One training setup: model copy, optimizer, loader with its own seeded shuffling."""

    def __init__(self, accelerator, encoder, dataset, batch: int, seed: int):
        self.accelerator = accelerator
        model = AlignmentModule(copy.deepcopy(encoder))
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.loader = DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = iter(())

    def next_batch(self) -> dict:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step(self, anchor) -> float:
        objective = AlignmentObjective(anchor, "audio", TEMPERATURE)
        ctx = StepContext(self.accelerator, self.model, self.optimizer, objective, grad_clip=1.0)
        return train_step(ctx, self.next_batch())

    def timed(self, anchor, steps: int, batch: int) -> tuple[float, float]:
        """(samples per wall-clock second, CPU seconds of this process per sample)."""
        _sync(self.accelerator.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(anchor)
        _sync(self.accelerator.device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return steps * batch / wall, cpu / (steps * batch)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(args, runs: dict, anchor) -> tuple[dict, dict, float]:
    """Loss check, then alternating timed repeats: (rates, CPU time per sample, max loss diff)."""
    # Same start, same order, same views: the loss curves must coincide. The encoder's own
    # draws (SpecAugment masks) come from the global generator: seeded per step, as in training.
    losses = {name: [] for name in runs}
    for name, run in runs.items():
        for step in range(args.check_steps):
            torch.manual_seed(args.seed * 1_000_003 + step)
            losses[name].append(run.step(anchor))
    diffs = [abs(a - b) for a, b in zip(losses["uncached"], losses["cached"])]
    max_diff = max(diffs) if diffs else 0.0
    print(f"loss check over {args.check_steps} steps: max |diff| = {max_diff:.2e}")
    print(f"  uncached {[f'{v:.6f}' for v in losses['uncached']]}")
    print(f"  cached   {[f'{v:.6f}' for v in losses['cached']]}")

    rates = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            rate, cpu_per_sample = run.timed(anchor, args.steps, args.batch)
            rates[name].append(rate)
            cpu[name].append(cpu_per_sample)
        print(
            f"repeat {repeat}: uncached {rates['uncached'][-1]:.1f} samples/s, "
            f"cached {rates['cached'][-1]:.1f} samples/s"
        )
    return rates, cpu, max_diff


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    anchor = Anchor(
        AnchorConfig(model=args.anchor, pretrained=None, model_config=None),
        device=accelerator.device,
    )
    plain_set, cache_set = make_datasets(anchor, args.images, args.clips, args.seed)
    encoder = build_encoder("audio", anchor.embed_dim, "tiny", None, FBANK, TEMPERATURE)

    with tempfile.TemporaryDirectory(prefix="bench-anchor-cache-") as folder:
        start = time.perf_counter()
        report = write_anchor_cache(
            anchor, cache_set, folder, dataset_info={"name": "bench"}, batch_size=32
        )
        cache_seconds = time.perf_counter() - start
        cached_set = attach_anchor_cache(cache_set, folder, anchor)
        runs = {
            "uncached": Run(accelerator, encoder, plain_set, args.batch, args.seed),
            "cached": Run(accelerator, encoder, cached_set, args.batch, args.seed),
        }
        rates, cpu, max_diff = measure(args, runs, anchor)
    result = speed_summary(rates, cpu, max_diff) | {
        "cache_write_images_per_second": report["entries"] / cache_seconds,
        "config": {
            "anchor": args.anchor,
            "anchor_image_size": list(anchor.image_size),
            "anchor_weights": "random",
            "encoder": "audio tiny",
            "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "fbank": [FBANK["num_mel_bins"], FBANK["target_length"]],
            "batch": args.batch,
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "check_steps": args.check_steps,
            "images": args.images,
            "clips": args.clips,
            "device": str(accelerator.device),
            "torch_threads": torch.get_num_threads(),
            "machine": _machine(accelerator.device),
            "torch": torch.__version__,
        },
    }
    if max_diff > 1e-5:
        print(f"WARNING: cached and uncached losses differ by {max_diff:.2e} (> 1e-5)")
    print(json.dumps(result))
    return result


def speed_summary(rates: dict, cpu: dict, max_diff: float) -> dict:
    """Medians of the cached and uncached runs; ratios robust to load from other processes."""
    uncached = statistics.median(rates["uncached"])
    cached = statistics.median(rates["cached"])
    ratios = [c / u for c, u in zip(rates["cached"], rates["uncached"])]
    cpu_median = {name: statistics.median(v) for name, v in cpu.items()}
    return {
        "cached_samples_per_second": cached,
        "uncached_samples_per_second": uncached,
        "speedup": cached / uncached,
        "speedup_median_of_repeat_ratios": statistics.median(ratios),
        "cached_cpu_ms_per_sample": 1e3 * cpu_median["cached"],
        "uncached_cpu_ms_per_sample": 1e3 * cpu_median["uncached"],
        "speedup_cpu_time": cpu_median["uncached"] / cpu_median["cached"],
        "max_loss_diff": max_diff,
        "same_loss_curve": max_diff <= 1e-5,
        "cached_samples_per_second_all": rates["cached"],
        "uncached_samples_per_second_all": rates["uncached"],
    }


def _machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    run_script(main)
