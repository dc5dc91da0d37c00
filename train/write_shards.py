"""Write a manifest's (or a layout's) pairs as webdataset tar shards.

    python train/write_shards.py --manifest train.csv --root ROOT --out SHARDS --shard-size 1000
    python train/write_shards.py --layout sunrgbd --root ROOT --out SHARDS --split train

Each sample stores its files' raw bytes and a JSON with id, label, captions, split, fold and
meta; ``SHARDS/shards.json`` indexes the shards (and ``ROOT/stats.json`` is copied beside them).
Train with ``data.dataset=shards data.root=SHARDS`` (see ``imagebind_lite/data/shards.py``).

    python train/write_shards.py --manifest train.csv --root ROOT --out FEATS \
        --features audio --config configs/audio.yaml

``--features MODALITY`` stores that modality's model inputs (fp16, computed by the worker
pipeline without augmentation, with the config's ``data.preprocess`` and ``--preprocess
KEY=VALUE`` options) instead of its files: training then skips decoding, and a run with other
preprocessing options is refused.
"""

from __future__ import annotations

import json

from imagebind_lite.cli import OneLineArgumentParser, run_script
from imagebind_lite.config import load_config, resolve_config_arg
from imagebind_lite.data.manifest import load_records
from imagebind_lite.data.shards import feature_writer, write_shards
from imagebind_lite.files import parse_key_values
from imagebind_lite.registry import get_modality


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV or JSONL manifest (relative to --root or cwd)")
    source.add_argument("--layout", help="a standard layout (see imagebind_lite.data.adapters)")
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--split", help="keep one split (rows' split column, or the layout's)")
    parser.add_argument("--keys", help="comma-separated files to store (default: all)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="layout option (read_layout)",
    )
    parser.add_argument("--features", metavar="MODALITY", help="store MODALITY's features")
    parser.add_argument("--config", help="config whose data.preprocess --features uses")
    parser.add_argument(
        "--preprocess",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data.preprocess option for --features (after --config's)",
    )
    args = parser.parse_args(argv)
    features = _features(args)

    records, classnames, where = load_records(
        args.root, args.manifest, args.layout, args.split, parse_key_values(args.option)
    )
    index = write_shards(
        records,
        args.root,
        args.out,
        args.shard_size,
        args.keys.split(",") if args.keys else None,
        classnames,
        source=where,
        prefix=args.prefix,
        features=features,
    )
    print(
        json.dumps(
            {k: index[k] for k in ("num_samples", "keys", "skipped")}
            | {"shards": len(index["shards"]), "out": args.out}
        )
    )
    return index


def _features(args) -> dict | None:
    if not args.features:
        if args.config or args.preprocess:
            raise ValueError("--config and --preprocess only apply with --features")
        return None
    preprocess = {}
    if args.config:
        preprocess = dict(load_config(resolve_config_arg(args.config, None)).data.preprocess)
    preprocess.update(parse_key_values(args.preprocess, "--preprocess"))
    return feature_writer(get_modality(args.features), preprocess)


if __name__ == "__main__":
    run_script(main, lambda index: index["num_samples"])
