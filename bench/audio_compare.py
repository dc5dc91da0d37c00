"""Audio preprocessing: this checkout's pipeline against an earlier revision's, interleaved.

    python bench/audio_compare.py REV DIR [DIR ...] [--limit N] [--rounds R] [--workers W]
                                  [--compat default|imagebind]

Loads the audio modules (``imagebind_lite/data/audio*.py``) as they were at git revision REV
(a commit, tag or branch) beside the current ones, in the same process, and times
``load_and_transform_audio`` on the files of each folder (``--compat``, imagebind mode by
default; one call per folder), alternating the two and swapping which runs first every round,
since this machine's speed drifts within minutes. Each call's output must equal the earlier
revision's bit for bit, or the run stops. Reported per folder: the median time per file of
each, and the median of the per-round speedups (old / new). This is how the per-change
figures in docs/speed.md were measured. The last line of stdout is a
JSON object mapping each folder to {new_ms_per_file, old_ms_per_file, speedup, files}.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .` too

from imagebind_lite.cli import (  # noqa: E402
    OneLineArgumentParser,
    existing_folder,
    positive_int,
    run_script,
)
from imagebind_lite.data import audio as current  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_preprocess import find_files  # noqa: E402


def load_revision(rev: str):
    """The audio module as it was at ``rev``, imported as ``audio_at_revision.audio``.

    Every ``imagebind_lite/data/audio*.py`` of that revision is copied into a package of that
    name, so the module's relative imports of its sibling audio modules find theirs.
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"cannot read the audio modules at revision {rev!r}: {done.stderr}")
        return done.stdout

    names = git("ls-tree", "--name-only", rev, "imagebind_lite/data/").split()
    sources = [n for n in names if Path(n).name.startswith("audio") and n.endswith(".py")]
    if "imagebind_lite/data/audio.py" not in sources:
        raise ValueError(f"no imagebind_lite/data/audio.py at revision {rev!r}")
    package = Path(tempfile.mkdtemp()) / "audio_at_revision"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in sources:
        (package / Path(name).name).write_text(git("show", f"{rev}:{name}"))
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("audio_at_revision.audio")


def compare(
    old, files: list[Path], rounds: int, workers: int | None, compat: str = "imagebind"
) -> dict:
    def run(module) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = module.load_and_transform_audio(files, num_workers=workers, compat=compat)
        return time.perf_counter() - start, out

    expected = run(old)[1]  # also the warm-up: first-use probes, pools, page cache
    run(current)
    times: dict[str, list[float]] = {"new": [], "old": []}
    for round_index in range(rounds):
        order = [("new", current), ("old", old)]
        for name, module in order if round_index % 2 else order[::-1]:
            elapsed, out = run(module)
            if not torch.equal(out, expected):
                raise SystemExit(f"{name} output differs from the earlier revision's")
            times[name].append(elapsed / len(files) * 1e3)
    speedups = [o / n for o, n in zip(times["old"], times["new"])]
    return {
        "new_ms_per_file": round(statistics.median(times["new"]), 4),
        "old_ms_per_file": round(statistics.median(times["old"]), 4),
        "speedup": round(statistics.median(speedups), 3),
        "files": len(files),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="git revision to compare against, e.g. HEAD~1")
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument(
        "--limit", type=positive_int, default=128, help="first N audio files per folder"
    )
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--workers", type=positive_int, default=None, help="threads (one per CPU)")
    parser.add_argument("--compat", choices=("imagebind", "default"), default="imagebind")
    args = parser.parse_args(argv)
    for folder in args.folders:  # before the slow part: a typo fails at once
        existing_folder(folder, "DIR")
    old = load_revision(args.rev)
    warnings.simplefilter("ignore")  # ImageBind's padding warnings would flood the output
    results = {}
    for folder in args.folders:
        files = find_files(folder, args.limit)
        if not files:
            raise FileNotFoundError(f"{folder}: no readable audio files")
        r = results[str(folder)] = compare(old, files, args.rounds, args.workers, args.compat)
        print(
            f"{folder}: {r['files']} files, {r['new_ms_per_file']:.3f} ms per file now vs "
            f"{r['old_ms_per_file']:.3f} at {args.rev}: {r['speedup']:.3f}x (median of "
            f"{args.rounds} rounds), outputs identical"
        )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    run_script(main)
