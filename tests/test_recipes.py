"""bench/recipes.py: every recipe of a benchmark under one budget, the ceiling beside them."""

import importlib.util
import json

import pytest
from conftest import REPO, run_script

TINY = "encoder.overrides={depth: 1, width: 32, heads: 2}"


def test_a_sweep_writes_the_table_and_refuses_what_a_modality_cannot_take(tmp_path):
    out = tmp_path / "recipes.md"
    cmd = ["bench/recipes.py", "--benchmarks", "pen", "--recipes"]
    cmd += ["imagebind,anchor_init", "--max-steps", "2", "--set", TINY, "--out", str(out)]
    proc = run_script(cmd, cwd=REPO, timeout=600)  # its runs are real subprocesses
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.with_suffix(".json").read_text()) == {"sweeps": [summary]}
    runs = {r["recipe"]: r for r in summary["results"]}
    assert list(runs) == ["imagebind", "anchor_init", "ceiling"]
    assert runs["imagebind"]["steps"] == runs["ceiling"]["steps"] == 2  # one budget
    assert 0 <= runs["imagebind"]["top1"] <= 1 and runs["imagebind"]["peak_memory_mib"] > 0
    assert "not image-shaped" in runs["anchor_init"]["refused"]  # pen is 1-D
    text = out.read_text()
    assert "## pen" in text and "| imagebind | (as shipped) |" in text
    assert "| anchor_init | `encoder.init=anchor` | n/a: config error:" in text


def test_an_unknown_recipe_is_one_line():
    proc = run_script(["bench/recipes.py", "--recipes", "magic"], cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--recipes: unknown recipe 'magic'" in proc.stderr


def recipes_module():
    spec = importlib.util.spec_from_file_location("recipes", REPO / "bench/recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_sweep(command, benchmarks, top1):
    results = [
        {"benchmark": b, "recipe": r, "overrides": [], "top1": top1, "train_seconds": 1.0,
         "steps": 2, "peak_memory_mib": 9.0}
        for b in benchmarks for r in ("imagebind", "ceiling")
    ]  # fmt: skip
    return {"command": command, "started": "now", "machine": "m", "load_before": 0.0,
            "load_after": 0.0, "epochs_scale": 1.0, "planned": len(results),
            "results": results}  # fmt: skip


def test_measuring_one_recipe_again_keeps_the_other_runs(tmp_path):
    recipes = recipes_module()
    first = fake_sweep("python bench/recipes.py", ["pen", "depth"], 0.5)
    again = fake_sweep("python bench/recipes.py --benchmarks depth", ["depth"], 0.75)
    again["results"] = again["results"][:1]  # depth/imagebind only, stopped before its ceiling
    sweeps = recipes.merge([first], again)
    kept = [(r["benchmark"], r["recipe"]) for r in sweeps[0]["results"]]
    assert kept == [("pen", "imagebind"), ("pen", "ceiling"), ("depth", "ceiling")]
    text = recipes.table(sweeps)
    pen, depth = text.index("## pen"), text.index("## depth")
    assert pen < text.index("`python bench/recipes.py` on m") < depth
    assert "| imagebind | (as shipped) | 0.500 | +0.000 | 1 | 9 |" in text[pen:depth]
    # depth: rows from two sweeps, each marked; the gap is to the ceiling that was kept
    assert "[1] `python bench/recipes.py` on m" in text[depth:]
    assert "[2] `python bench/recipes.py --benchmarks depth` on m" in text[depth:]
    assert "stopped after 1 of 2 runs" in text[depth:]
    assert "| imagebind | (as shipped) | 0.750 | -0.250 | 1 | 9 | [2] |" in text[depth:]
    assert "| ceiling | (as shipped) | 0.500 |  | 1 | 9 | [1] |" in text[depth:]
    bad = tmp_path / "recipes.json"
    bad.write_text('{"results": []}')
    with pytest.raises(RuntimeError, match="recipes.json: not a recipes results file"):
        recipes.read_sweeps(bad)
