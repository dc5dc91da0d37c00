"""End-to-end training throughput with the real input pipeline, beside the encoder-only ceiling.

    python bench/feed.py [--feed worker|device|features] [--workers 2] [--device cuda]
                         [--encoder-size imagebind] [--batch B] [--steps 3] [--warmup 1]
                         [--repeats 1] [--precision bf16] [--clips 256] [--config CONFIG]
                         [--preprocess KEY=VALUE ...] [--shards DIR]
    python bench/feed.py --encoder-size tiny --steps 2 --batch 4 --clips 16   # smoke run

Fed: DataLoader workers (``--workers``; 0 decodes in the training process) read webdataset
shards of real audio through the shards dataset's sampler, and every step trains the audio
encoder against anchor embeddings read from an anchor cache (``imagebind_lite/cache.py``, written
here by ``write_anchor_cache`` from the shards' images; the images are not decoded while
training). Without ``--shards`` the shards are written here from the shipped FSDD clips
(``--clips`` of them, each with a UCI image of its digit) by ``write_shards``. Feature paths:

``worker``    raw audio shards; workers decode, resample and take the fbank (the default path)
``device``    raw audio shards; workers decode and cut clips, the step computes the fbank and
              the masking on the device (``data.preprocess.features_on: device``)
``features``  feature shards (``write_shards.py --features``): workers read fp16 features and
              mask them; no decoding (with ``--shards``, the folder must hold such shards)

Preprocessing: the audio modality's defaults (ImageBind's 3 clips of 128 x 204), then a config's
``data.preprocess`` (``--config configs/audio.yaml``: the default recipe's 1 clip of 64 x 112
with per-utterance normalisation) and ``--preprocess`` options.

Ceiling: the same model and step (forward, InfoNCE, backward, clip, AdamW; bf16 autocast on a
GPU) on one fed batch's finished features and embeddings, already on the device. Each of
``--repeats`` rounds times ``--steps`` ceiling steps, then ``--steps`` fed steps, each after
untimed steps (``--warmup``; for the fed steps at least two per worker, which drain the batches
prefetched meanwhile); figures are medians over rounds and ``fed_ratio`` the median of the
rounds' fed / ceiling. On a shared CPU the workers compete with the step for the same cores,
which is part of what is measured; the load average is recorded.

The last stdout line is a JSON object: fed_samples_per_second, ceiling_samples_per_second,
fed_ratio, workers, device, feed, batch, steps, encoder, shards, preprocess and more.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_audio_step import TEMPERATURE, _sync  # noqa: E402
from train_step import _machine  # noqa: E402

from imagebind_lite.anchor import Anchor  # noqa: E402
from imagebind_lite.cache import attach_anchor_cache, write_anchor_cache  # noqa: E402
from imagebind_lite.cli import OneLineArgumentParser, device_arg, run_script  # noqa: E402
from imagebind_lite.config import AnchorConfig, load_config, resolve_config_arg  # noqa: E402
from imagebind_lite.data import avmnist  # noqa: E402
from imagebind_lite.data.adapters import Record  # noqa: E402
from imagebind_lite.data.datasets import collate  # noqa: E402
from imagebind_lite.data.shards import (  # noqa: E402
    ShardDataset,
    feature_writer,
    read_index,
    sampler_for,
    write_shards,
)
from imagebind_lite.files import parse_key_values  # noqa: E402
from imagebind_lite.modalities import build_encoder, get_modality  # noqa: E402
from imagebind_lite.train import (  # noqa: E402
    AlignmentModule,
    AlignmentObjective,
    StepContext,
    adamw,
    param_groups,
    train_step,
)

MODALITY = "audio"
FEEDS = ("worker", "device", "features")


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="a shards folder (default: written here from FSDD)")
    parser.add_argument("--feed", choices=FEEDS, default=None, help="default: from the shards")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: inline)")
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--encoder-size", default="imagebind", help="audio encoder size")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=1, help="alternating timed rounds")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="GPU only")
    parser.add_argument("--clips", type=int, default=256, help="FSDD clips in written shards")
    parser.add_argument("--config", help="a config whose data.preprocess to use")
    parser.add_argument(
        "--preprocess",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data.preprocess option (after --config's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.workers, args.warmup) < 0 or min(args.steps, args.clips, args.repeats) < 1:
        raise ValueError("--workers, --warmup must be >= 0 and --steps, --clips, --repeats >= 1")
    if args.batch is None:
        args.batch = 64 if torch.device(args.device).type == "cuda" else 2
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    return args


def anchor_for_bench(device) -> Anchor:
    """The shipped tiny digit CLIP: the anchor's cost is out of the step (its cache is read)."""
    config = AnchorConfig(
        model="tiny-clip-32",
        model_config="imagebind_lite:tiny-clip-32",
        pretrained="imagebind_lite:tiny-clip-digits-scenes",
    )
    return Anchor(config, device=device)


def write_fsdd_shards(root: Path, out: Path, clips: int, features: dict | None) -> None:
    """``clips`` FSDD recordings (every speaker and digit in turn), each with a digit image."""
    from PIL import Image

    files = avmnist.audio_files()
    step = max(1, len(files) // clips)
    images, labels = avmnist.load_digit_images()
    pixels = avmnist.digits_to_pixels(images, 32)
    (root / "vision").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (path, digit, _) in enumerate(files[::step][:clips]):
        row = int(torch.nonzero(labels == digit).flatten()[i % 50])
        image = root / "vision" / f"{row}.png"
        if not image.exists():
            array = (pixels[row].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(array).save(image)
        audio = root / MODALITY / path.name  # files must lie under the shards' root
        audio.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, audio)
        paths = {MODALITY: audio, "vision": image}
        records.append(Record(path.stem, paths, digit, [], "train", None, {}))
    write_shards(records, root, out, 64, classnames=avmnist.DIGIT_NAMES, features=features)


def open_shards(args, spec, preprocess: dict, work: Path) -> tuple[Path, str]:
    """(shards folder, feed): the given folder, checked, or shards written here from FSDD."""
    if args.shards:
        directory = Path(args.shards)
        if not directory.is_dir():
            raise FileNotFoundError(f"--shards {directory}: no such folder")
        stored = read_index(directory).get("features") is not None
        feed = args.feed or ("features" if stored else "worker")
        if stored != (feed == "features"):
            kind = "feature" if stored else "raw audio"
            raise ValueError(
                f"--shards {directory} holds {kind} shards; --feed {feed} needs the other"
            )
        return directory, feed
    feed = args.feed or "worker"
    features = None
    if feed == "features":
        features = feature_writer(spec, {k: v for k, v in preprocess.items() if k != "features_on"})
    directory = work / "shards"
    write_fsdd_shards(work / "root", directory, args.clips, features)
    return directory, feed


def fed_loader(dataset, args, device) -> DataLoader:
    """The training loop's loader settings: shuffled, pinned on GPUs, persistent workers."""
    return DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )


def batches(loader):
    while True:
        yield from loader


def timed(step, batches_iter, steps: int, device) -> float:
    """Seconds for ``steps`` steps, each on the next batch, fetched (and moved) inside."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches_iter))
    _sync(device)
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the DataLoader workers), from /proc.

    Robust to other load on a shared machine where wall time is not: it is what feeding
    costs, whoever else runs."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == os.getpid():  # ppid; utime and stime follow at 11 and 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def pipeline_cost(dataset, prepare, args, device) -> dict:
    """The input pipeline alone, no step: CPU ms per sample of reading samples inline on one
    thread (what one worker spends per sample), and ms per sample of ``prepare`` (the device
    features) on one batch, synchronised. One thread and no step make these figures far less
    sensitive to other load than the fed/ceiling rates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        count = min(len(dataset), 4 * args.batch)
        for i in range(min(count, 8)):  # warm: tar header scans, kernel and filter caches
            dataset[i]
        start = time.process_time()
        samples = [dataset[i] for i in range(count)]
        worker = 1e3 * (time.process_time() - start) / count
        device_ms = None
        if prepare is not None:
            batch = collate(samples[: args.batch])[MODALITY].to(device)
            with torch.no_grad():
                prepare(batch)
                device_ms = 1e3 * timed(prepare, itertools.repeat(batch), 3, device) / 3
            device_ms /= args.batch
    finally:
        torch.set_num_threads(threads)
    return {"worker_cpu_ms_per_sample": worker, "device_features_ms_per_sample": device_ms}


def time_rounds(args, ceiling_step, fixed, fed_step, stream, device):
    """Per round, samples/s and CPU ms per sample of the ceiling, then of the fed step.

    Alternating rounds lets load from other processes hit both alike. While the ceiling runs,
    the workers fill their prefetch queue and then idle; the fed round first runs untimed
    steps that drain it (at least 2 per worker, the DataLoader's prefetch), so that only
    steady-state feeding is timed.
    """
    settle = max(args.warmup, 2 * args.workers)
    samples = args.steps * args.batch
    rates = {"ceiling": [], "fed": []}
    cpu = {"ceiling": [], "fed": []}
    for _ in range(args.repeats):
        for name, step, source, untimed in (
            ("ceiling", ceiling_step, fixed, args.warmup),
            ("fed", fed_step, stream, settle),
        ):
            timed(step, source, untimed, device)
            start = cpu_seconds()
            rates[name].append(samples / timed(step, source, args.steps, device))
            cpu[name].append(1e3 * (cpu_seconds() - start) / samples)
    return rates, cpu


def on_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def build_step(args, accelerator, anchor, preprocess: dict, feed: str):
    """(fed step context, ceiling step context, device-feature fn or None, encoder params)."""
    spec = get_modality(MODALITY)
    torch.manual_seed(args.seed)
    encoder = build_encoder(
        MODALITY, anchor.embed_dim, args.encoder_size, None, preprocess, TEMPERATURE
    )
    params = sum(p.numel() for p in encoder.parameters())
    model = AlignmentModule(encoder)
    optimizer = adamw(param_groups(model, 0.2), 1e-4, (0.9, 0.95), accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    prepare = None
    if feed == "device":
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        prepare = functools.partial(
            spec.device_features, options=preprocess, train=True, generator=generator
        )
    fed = AlignmentObjective(None, MODALITY, TEMPERATURE, prepare=prepare)
    ceiling = AlignmentObjective(None, MODALITY, TEMPERATURE)
    contexts = [StepContext(accelerator, model, optimizer, o, 1.0) for o in (fed, ceiling)]
    return *contexts, prepare, params


def measure(args, directory: Path, feed: str, preprocess: dict, work: Path) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    accelerator = Accelerator(cpu=not gpu, mixed_precision=args.precision if gpu else "no")
    device = accelerator.device
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    anchor = anchor_for_bench(device)
    spec = get_modality(MODALITY)
    sampler = sampler_for(read_index(directory), spec, preprocess, anchor, directory)
    shards = ShardDataset(directory, sampler, True, args.seed)
    write_anchor_cache(anchor, shards, work / "cache", batch_size=64)
    dataset = attach_anchor_cache(shards, work / "cache", anchor)
    if len(dataset) < args.batch:
        raise ValueError(f"{directory}: {len(dataset)} samples, fewer than --batch {args.batch}")
    fed_ctx, ceiling_ctx, prepare, params = build_step(args, accelerator, anchor, preprocess, feed)
    stream = batches(fed_loader(dataset, args, device))
    first = on_device(next(stream), device)
    with torch.no_grad():
        features = prepare(first[MODALITY]) if prepare else first[MODALITY]
    ceiling_batch = {MODALITY: features, "anchor_embedding": first["anchor_embedding"]}
    fixed = itertools.repeat(ceiling_batch)

    def fed_step(batch):
        return train_step(fed_ctx, on_device(batch, device))

    def ceiling_step(batch):
        return train_step(ceiling_ctx, batch)

    load_before = os.getloadavg()[0]
    pipeline = pipeline_cost(dataset, prepare, args, device)
    rates, cpu = time_rounds(args, ceiling_step, fixed, fed_step, stream, device)
    ceiling, fed = rates["ceiling"], rates["fed"]
    cpu_fed, cpu_ceiling = statistics.median(cpu["fed"]), statistics.median(cpu["ceiling"])
    return {
        "fed_samples_per_second": statistics.median(fed),
        "ceiling_samples_per_second": statistics.median(ceiling),
        "fed_ratio": statistics.median(f / c for f, c in zip(fed, ceiling)),
        "fed_samples_per_second_all": fed,
        "ceiling_samples_per_second_all": ceiling,
        # CPU time (this process and its workers) per sample: the step's, and what feeding
        # adds to it (the cores a GPU host needs per sample/s of the pipeline).
        "ceiling_cpu_ms_per_sample": cpu_ceiling,
        "fed_cpu_ms_per_sample": cpu_fed,
        "feeding_cpu_ms_per_sample": cpu_fed - cpu_ceiling,
        "pipeline": pipeline,
        "repeats": args.repeats,
        "workers": args.workers,
        "device": str(device),
        "machine": _machine(device),
        "feed": feed,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "encoder": args.encoder_size,
        "encoder_params": params,
        "input_shape": list(features.shape[1:]),
        "precision": accelerator.mixed_precision,
        "shards": args.shards or f"FSDD x {len(dataset)} (written here)",
        "preprocess": {k: v for k, v in preprocess.items()},
        "torch_threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()[0]],
        "command": "python bench/feed.py " + shlex.join(sys.argv[1:]),
        "torch": torch.__version__,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu)")
    spec = get_modality(MODALITY)
    base = dict(spec.preprocess)
    if args.config:
        base.update(load_config(resolve_config_arg(args.config, None)).data.preprocess)
    base.update(parse_key_values(args.preprocess, "--preprocess"))
    base.pop("features_on", None)  # --feed says where features are made
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as folder:
        work = Path(folder)
        directory, feed = open_shards(args, spec, base, work)
        preprocess = {**base, "features_on": "device"} if feed == "device" else base
        result = measure(args, directory, feed, preprocess, work)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
