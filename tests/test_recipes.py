"""bench/recipes.py: every recipe of a benchmark under one budget, the ceiling beside them."""

import json
import subprocess
import sys

from conftest import REPO

TINY = "encoder.overrides={depth: 1, width: 32, heads: 2}"


def test_a_sweep_writes_the_table_and_refuses_what_a_modality_cannot_take(tmp_path):
    out = tmp_path / "recipes.md"
    cmd = [sys.executable, "bench/recipes.py", "--benchmarks", "pen", "--recipes"]
    cmd += ["imagebind,anchor_init", "--max-steps", "2", "--set", TINY, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.with_suffix(".json").read_text())
    runs = {r["recipe"]: r for r in summary["results"]}
    assert list(runs) == ["imagebind", "anchor_init", "ceiling"]
    assert runs["imagebind"]["steps"] == runs["ceiling"]["steps"] == 2  # one budget
    assert 0 <= runs["imagebind"]["top1"] <= 1 and runs["imagebind"]["peak_memory_mib"] > 0
    assert "not image-shaped" in runs["anchor_init"]["refused"]  # pen is 1-D
    text = out.read_text()
    assert "## pen" in text and "| imagebind | (as shipped) |" in text
    assert "| anchor_init | `encoder.init=anchor` | n/a: config error:" in text


def test_an_unknown_recipe_is_one_line():
    cmd = [sys.executable, "bench/recipes.py", "--recipes", "magic"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--recipes: unknown recipe 'magic'" in proc.stderr
