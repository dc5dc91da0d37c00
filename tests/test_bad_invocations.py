"""Scripts given bad input print one short line naming the problem, exit non-zero, and leave no
run folder or half-written output behind."""

import subprocess
import sys

import pytest
from conftest import REPO


def invoke(tmp_path, script, *args):
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.csv").write_text("id,audio,vision,label\n")
    (tmp_path / "data" / "bad.csv").write_text("name,colour\nx,red\n")
    return tmp_path


TRAIN = ["tracker=null", "optim.max_steps=1"]
CASES = [
    (
        "train/write_shards.py",
        ["--manifest", "nope.csv", "--root", "data", "--out", "shards"],
        "manifest not found",
    ),
    (
        "train/align_audio.py",
        [*TRAIN, "data.dataset=manifest", "data.options.manifest=nope.csv"],
        "set data.root",
    ),
    (
        "train/align_audio.py",
        [*TRAIN, "data.dataset=manifest", "data.root=data", "data.options.manifest=nope.csv"],
        "nope.csv",
    ),
    (
        "train/align_audio.py",
        [*TRAIN, "data.dataset=manifest", "data.root=data", "data.options.manifest=bad.csv"],
        "bad.csv",
    ),
    (
        "train/align_audio.py",
        [*TRAIN, "data.dataset=manifest", "data.root=data", "data.options.manifest=empty.csv"],
        "empty.csv",
    ),
    ("train/align_depth.py", [*TRAIN, "data.dataset=sunrgbd"], "set data.root"),
    ("train/align_depth.py", [*TRAIN, "data.dataset=sunrgbd", "data.root=nowhere"], "nowhere"),
    ("train/align_audio.py", [*TRAIN, "data.dataset=nosuch"], "unknown dataset 'nosuch'"),
    ("train/align.py", [*TRAIN, "modality=nosuch"], "unknown modality 'nosuch'"),
    ("train/align_audio.py", ["--resume", "runs/none"], "no run folder found at runs/none"),
    ("eval/zero_shot.py", ["--checkpoint", "runs/none"], "runs/none"),
    (
        "train/compute_stats.py",
        ["--modality", "depth", "--layout", "nyud", "--root", "nowhere"],
        "nowhere",
    ),
    (
        "train/cache_anchor.py",
        ["--config", "nope.yaml", "--out", "cache"],
        "no shipped config 'nope.yaml'",
    ),
]


@pytest.mark.parametrize("script, args, message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_invocation_prints_one_line_and_writes_nothing(inputs, script, args, message):
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    proc = invoke(inputs, script, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert message in lines[0] and lines[0].startswith(("error: ", "config error: "))
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # nothing written
