"""Precompute the frozen anchor's image embeddings of a training set (see imagebind_lite/cache.py).

    accelerate launch [--multi_gpu --num_processes N] train/cache_anchor.py \\
        --config configs/audio.yaml --out DIR [--views K] [field=value ...]

Then train with ``anchor.cache=DIR``. The config and overrides are a training config: the same
anchor, dataset and data options must be given when training. ``--views K`` caches K views per
image (default: every view the dataset can draw, which keeps cached training identical to
uncached training). Shards go round-robin to the processes; rerunning the same command after an
interruption computes only the shards that are missing or damaged. The last stdout line is a
JSON summary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.anchor import Anchor
from imagebind_lite.cache import DTYPES, write_anchor_cache
from imagebind_lite.cli import (
    OneLineArgumentParser,
    one_line_errors,
    resolve_config_arg,
    run_script,
)
from imagebind_lite.config import ConfigError, config_to_dict, load_config
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.modalities import get_modality


def parse_args(argv=None):
    parser = OneLineArgumentParser(
        description="Cache the frozen anchor's image embeddings of a training set.",
        epilog="Any config field can be overridden: section.field=value",
    )
    parser.add_argument(
        "--config", help="training YAML config or a shipped name (default: config.py defaults)"
    )
    parser.add_argument("--out", required=True, help="cache folder (then anchor.cache=OUT)")
    parser.add_argument("--views", type=int, default=None, help="views per image (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument("--shard-size", type=int, default=4096, help="entries per shard file")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a cache of another anchor or dataset"
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with one_line_errors():
        cfg = load_config(resolve_config_arg(args.config, None), args.overrides)
        from imagebind_lite.train import validate_config

        validate_config(cfg)
        if cfg.anchor.pretrained is None:
            raise ConfigError(
                "anchor.pretrained: null builds a random anchor that differs on every run, so "
                "its cache could never be used; name a checkpoint file or an open_clip tag"
            )
        set_seed(cfg.seed, device_specific=False)
        anchor = Anchor(cfg.anchor, device=accelerator.device)
        spec = get_modality(cfg.modality)
        bundle = get_dataset_builder(cfg.data.dataset)(cfg, anchor, spec)
        data = config_to_dict(cfg)["data"]
        start = time.perf_counter()
        report = write_anchor_cache(
            anchor,
            bundle.train,
            args.out,
            views=args.views,
            dataset_info={
                "name": cfg.data.dataset,
                "root": data["root"],
                "options": data["options"],
                "preprocess": data["preprocess"],
                "modality": cfg.modality,
                "split": "train",
                "num_samples": len(bundle.train),
            },
            batch_size=args.batch_size or cfg.eval.batch_size,
            shard_size=args.shard_size,
            dtype=args.dtype,
            num_workers=cfg.data.num_workers,
            accelerator=accelerator,
            overwrite=args.overwrite,
            progress=True,
        )
    report["seconds"] = time.perf_counter() - start
    report["world_size"] = accelerator.num_processes
    # Each process reports its own shards; the main one prints the summary last.
    summaries = _gather(accelerator, report)
    if accelerator.is_main_process:
        summary = {
            **{k: report[k] for k in ("out", "shards", "entries", "views", "complete")},
            "world_size": accelerator.num_processes,
            "computed_by_rank": {r["rank"]: r["computed"] for r in summaries},
            "skipped_by_rank": {r["rank"]: r["skipped"] for r in summaries},
            "seconds": round(report["seconds"], 3),
        }
        if not report["complete"]:
            print(f"cache at {args.out} is incomplete; rerun this command to finish it")
        print(json.dumps(summary))
    return report


def _gather(accelerator, report: dict) -> list[dict]:
    mine = {"rank": accelerator.process_index, **report}
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


if __name__ == "__main__":
    run_script(main)
