"""Normalisation statistics of depth or thermal from the training set -> ``ROOT/stats.json``.

    python train/compute_stats.py --modality depth --manifest train.csv --root ROOT
    python train/compute_stats.py --modality depth --layout sunrgbd --root ROOT
    python train/compute_stats.py --modality thermal --layout llvip --root ROOT \
        --option crops=none --set scaling=per_image

``--set KEY=VALUE`` gives preprocessing options exactly as ``data.preprocess`` will (depth:
layout, max_depth, representation, baseline, fx; thermal: scaling, rgb_policy): the statistics
record them, and a dataset refuses statistics computed under other options. Rows of the split
``--split`` (default ``train``) are used when the manifest has a split column; a layout whose
split file is missing (SUN RGB-D without ``allsplit.mat``) is refused rather than measured on
its test frames too, and ``--split all`` measures every record on purpose. The result is
merged into the JSON under the modality's name, so depth and thermal can share one file.
"""

from __future__ import annotations

import json
from pathlib import Path

from imagebind_lite.cli import OneLineArgumentParser, run_script
from imagebind_lite.data.manifest import compute_sensor_stats, load_records
from imagebind_lite.data.transforms import STATS_FILE, write_stats
from imagebind_lite.files import parse_key_values
from imagebind_lite.registry import get_modality, list_modalities


def modalities_with_stats() -> list[str]:
    """The modalities normalised by training-set statistics (``ModalitySpec.stats_options``)."""
    return [m for m in list_modalities() if get_modality(m).stats_options is not None]


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modality", required=True, choices=modalities_with_stats())
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV or JSONL manifest (relative to --root or cwd)")
    source.add_argument("--layout", help="a standard layout: sunrgbd, nyud, llvip")
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument(
        "--split", default="train", help="split to measure (default: train; all: every record)"
    )
    parser.add_argument("--out", help=f"output JSON (default: ROOT/{STATS_FILE})")
    parser.add_argument("--max-files", type=int, help="measure a seeded random subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="preprocessing option, as in data.preprocess",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="layout option (read_layout), e.g. crops=none",
    )
    args = parser.parse_args(argv)

    split = None if args.split == "all" else args.split
    records, _, where = load_records(
        args.root, args.manifest, args.layout, split, parse_key_values(args.option)
    )
    entry = compute_sensor_stats(
        args.modality, records, args.root, parse_key_values(args.set), args.max_files, args.seed
    )
    entry["source"] = f"{where} --split {args.split}"
    out = write_stats(
        Path(args.out) if args.out else Path(args.root) / STATS_FILE, args.modality, entry
    )
    print(
        json.dumps(
            {
                "stats": str(out),
                **{k: entry[k] for k in ("mean", "std", "files", "pixels", "skipped")},
            }
        )
    )
    return entry


if __name__ == "__main__":
    run_script(main, bool)
