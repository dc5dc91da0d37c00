"""Random access to tar shards: scanning each tar's headers against reading its offsets file.

    python bench/shard_offsets.py [--clips 3000] [--repeats 5] [--shards DIR]

Without ``--shards`` it writes ``--clips`` FSDD pairs as shards (``bench/feed.py``'s writer: 64
samples per shard) into a temporary folder. Each round times, over every shard, what a
DataLoader worker needs before its first random read of it: ``scan_tar_keyed`` (Python's
``tarfile`` over the headers, what every worker of every epoch did before offsets files) and
``read_offsets`` (the ``SHARD.offsets.json`` written with the shard). Rounds alternate the two;
figures are medians over ``--repeats`` rounds, with the files in the page cache (a network file
system only widens the gap). The last stdout line is a JSON object: ``samples``, ``shards``,
``scan_us_per_sample``, ``offsets_us_per_sample``, ``ratio`` and the configuration.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .` too
sys.path.insert(0, str(REPO / "bench"))

from feed import write_fsdd_shards  # noqa: E402
from train_step import _machine  # noqa: E402

from imagebind_lite.cli import (  # noqa: E402
    OneLineArgumentParser,
    existing_folder,
    positive_int,
    run_script,
)
from imagebind_lite.data.shards import read_index, read_offsets, scan_tar_keyed  # noqa: E402


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=positive_int, default=3000, help="FSDD pairs to write")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds")
    parser.add_argument("--shards", help="a folder of shards (shards.json) instead")
    return parser.parse_args(argv)


def seconds(read, tars) -> float:
    start = time.perf_counter()
    for tar in tars:
        read(tar)
    return time.perf_counter() - start


def measure(directory: Path, repeats: int) -> dict:
    tars = [directory / name for name in read_index(directory)["shards"]]
    samples = sum(len(scan_tar_keyed(t)) for t in tars)  # also fills the page cache
    if any(read_offsets(t) != scan_tar_keyed(t) for t in tars):
        raise ValueError(f"{directory}: an offsets file disagrees with its tar")
    scans, reads = [], []
    for _ in range(repeats):
        scans.append(seconds(scan_tar_keyed, tars))
        reads.append(seconds(read_offsets, tars))
    scan, offsets = statistics.median(scans), statistics.median(reads)
    return {
        "samples": samples,
        "shards": len(tars),
        "scan_us_per_sample": scan / samples * 1e6,
        "offsets_us_per_sample": offsets / samples * 1e6,
        "ratio": scan / offsets,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            directory = existing_folder(args.shards, "--shards")
            read_index(directory)
        else:
            directory = Path(tmp) / "shards"
            write_fsdd_shards(Path(tmp) / "root", directory, args.clips, None)
        result = measure(directory, args.repeats)
    result.update(
        shards_from=args.shards or f"FSDD x {args.clips} (written here)",
        repeats=args.repeats,
        machine=_machine("cpu"),
        command="python bench/shard_offsets.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
