"""Every recipe switch on every embedded benchmark, beside the supervised ceiling.

    python bench/recipes.py [--benchmarks audio,pen,depth,thermal] [--recipes imagebind,siglip,...]
                            [--epochs-scale 1.0] [--out docs/recipes.md]

A benchmark is a shipped config (audio: FSDD digits against the digit anchor, unseen speakers;
pen: pendigits, unseen writers; depth and thermal: the synthetic scenes). A recipe is a list of
overrides on it; every recipe of a benchmark gets the same data, steps and seed (the budget:
the config's epochs, times ``--epochs-scale``). ``imagebind`` is the config as shipped, the
encoder from scratch with InfoNCE, as ImageBind trains. The ceiling is ``eval/ceiling.py`` on
the same config and budget. A recipe a benchmark cannot take (the anchor's image tower for a
1-D modality) is listed with its one-line refusal. Each run is its own process, so the peak
memory is that run's (max RSS; the CUDA peak on a GPU).

Writes the table to ``--out`` and the results to ``--json`` (docs/bench/recipes.json beside the
default ``--out``, else ``--out`` with .json) after every run, so a stopped sweep keeps what it
measured; what those files hold for other (benchmark, recipe) pairs is kept, so one recipe can
be measured again alone (``--recipes ceiling`` places the ceiling; it runs last otherwise). The
last stdout line is this sweep's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout too

from imagebind_lite.cli import OneLineArgumentParser, one_line, one_line_errors  # noqa: E402
from imagebind_lite.files import atomic_write_json, atomic_write_text  # noqa: E402

BENCHMARKS = {"audio": "audio.yaml", "pen": "pen.yaml", "depth": "depth.yaml"}
BENCHMARKS["thermal"] = "thermal.yaml"
RECIPES = {
    "imagebind": [],
    "siglip": ["loss.kind=siglip"],
    "patch_dropout": ["encoder.patch_dropout=0.5"],
    "anchor_init": ["encoder.init=anchor"],
    "anchor_lens": ["encoder.init=anchor", "encoder.trainable=lens"],
    "anchor_lora": ["encoder.init=anchor", "encoder.trainable=lora"],
    "anchor_head": ["encoder.init=anchor", "encoder.trainable=head"],
}
CEILING = "ceiling"
DEFAULT_OUT, DEFAULT_JSON = "docs/recipes.md", "docs/bench/recipes.json"


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--epochs-scale", type=float, default=1.0, help="budget: x the epochs")
    p.add_argument("--max-steps", type=int, help="cap every run (smoke tests)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an override for every run (repeatable)")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--json", help=f"default: {DEFAULT_JSON} for the default --out, else --out "
                   "with .json")  # fmt: skip
    p.add_argument("--one", nargs=2, metavar=("BENCHMARK", "RECIPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.benchmarks, args.recipes = args.benchmarks.split(","), args.recipes.split(",")
    for name in args.benchmarks:
        if name not in BENCHMARKS:
            p.error(f"--benchmarks: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    for name in args.recipes:
        if name not in RECIPES and name != CEILING:
            p.error(f"--recipes: unknown recipe {name!r} (known: {', '.join(RECIPES)}, ceiling)")
    if CEILING not in args.recipes:
        args.recipes.append(CEILING)  # last unless placed
    if args.epochs_scale <= 0:
        p.error("--epochs-scale must be positive")
    return args


# ------------------------------------------------------------------------- one run (a child)


def run_config(benchmark: str, recipe: str, args, out_dir: str):
    from imagebind_lite.config import load_config, shipped_config

    cfg = load_config(shipped_config(BENCHMARKS[benchmark]), [*RECIPES.get(recipe, []), *args.set])
    cfg.optim.epochs = max(1, round(cfg.optim.epochs * args.epochs_scale))
    cfg.optim.warmup_epochs = cfg.optim.warmup_epochs * args.epochs_scale
    cfg.optim.max_steps = args.max_steps or cfg.optim.max_steps
    cfg.output_dir, cfg.run_name, cfg.tracker = out_dir, f"{benchmark}-{recipe}", None
    return cfg


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(benchmark: str, recipe: str, args) -> dict:
    """Train one recipe (or the ceiling) of one benchmark; its figures."""
    from imagebind_lite.ceiling import ceiling
    from imagebind_lite.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(benchmark, recipe, args, out)
        if recipe == CEILING:
            m = ceiling(cfg)
            top1 = m["supervised_top1"]
        else:
            m = train(cfg, quiet=True)
            top1 = m.get("zero_shot_top1", m.get("retrieval_r1"))
    return {
        "benchmark": benchmark,
        "recipe": recipe,
        "overrides": RECIPES.get(recipe, []),
        "top1": top1,
        "train_seconds": m["train_seconds"],
        "steps": m["steps"],
        "peak_memory_mib": peak_memory_mib(),
    }


# ------------------------------------------------------------------------- the sweep (parent)


def child(benchmark: str, recipe: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", benchmark, recipe, "--epochs-scale"]
    cmd += [str(args.epochs_scale), *(f"--set={s}" for s in args.set)]
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if not reason.startswith(("config error:", "error:")):
        raise RuntimeError(f"{benchmark}/{recipe} failed: {reason}")
    return {
        "benchmark": benchmark,
        "recipe": recipe,
        "overrides": RECIPES.get(recipe, []),
        "refused": reason,
    }


def sweep(args, save) -> dict:
    """Every run in order; ``save(summary)`` after each, so a stopped sweep keeps what it ran."""
    summary = {
        "command": " ".join(["python", "bench/recipes.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": os.getloadavg()[0],
        "epochs_scale": args.epochs_scale,
        "planned": len(args.benchmarks) * len(args.recipes),
        "results": [],
    }
    for benchmark in args.benchmarks:
        for recipe in args.recipes:
            summary["results"].append(child(benchmark, recipe, args))
            summary["ran"], summary["load_after"] = len(summary["results"]), os.getloadavg()[0]
            print(json.dumps(summary["results"][-1]), flush=True)
            save(summary)
    return summary


def merge(sweeps: list[dict], summary: dict) -> list[dict]:
    """The earlier sweeps without the (benchmark, recipe) runs ``summary`` measured again, then
    ``summary``: one recipe can be measured again alone."""
    again = {(r["benchmark"], r["recipe"]) for r in summary["results"]}
    kept = []
    for old in sweeps:
        results = [r for r in old["results"] if (r["benchmark"], r["recipe"]) not in again]
        if results:
            kept.append({**old, "results": results})
    return [*kept, summary]


def read_sweeps(path: Path) -> list[dict]:
    """The sweeps a results file holds (none if it does not exist yet)."""
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["sweeps"])
    except (ValueError, KeyError, TypeError) as err:
        raise RuntimeError(f"{path}: not a recipes results file ({one_line(err)})") from err


def sweep_line(summary: dict) -> str:
    # "ran", not the results kept: a later sweep may have measured some of them again.
    done = summary.get("ran", len(summary["results"]))
    planned = summary.get("planned", done)
    stopped = f"; stopped after {done} of {planned} runs" if done < planned else ""
    return (f"`{summary['command']}` on {summary['machine']}, {summary['started']} "
            f"(load {summary['load_before']:.1f} before, {summary['load_after']:.1f} after; "
            f"budget: the configs' epochs x {summary['epochs_scale']:g}{stopped})")  # fmt: skip


def benchmark_rows(runs: list[tuple[int, dict]], by: bool) -> list[str]:
    """One benchmark's table; ``runs`` are (sweep number, result), ``by`` adds that number."""
    ceil = next((r["top1"] for _, r in runs if r["recipe"] == CEILING and "top1" in r), None)
    head = "| recipe | overrides | top-1 | ceiling - top-1 | train s | peak MiB |"
    rows = [head + (" by |" if by else ""), "|---" * (7 if by else 6) + "|"]
    for number, r in runs:
        over = " ".join(f"`{o}`" for o in r.get("overrides", [])) or "(as shipped)"
        if "refused" in r:
            row = f"| {r['recipe']} | {over} | n/a: {r['refused']} | | | |"
        else:
            gap = "" if ceil is None or r["recipe"] == CEILING else f"{ceil - r['top1']:+.3f}"
            row = (f"| {r['recipe']} | {over} | {r['top1']:.3f} | {gap} | "
                   f"{r['train_seconds']:.0f} | {r['peak_memory_mib']:.0f} |")  # fmt: skip
        rows.append(row + (f" [{number}] |" if by else ""))
    return rows


def table(sweeps: list[dict]) -> str:
    rows = ["# Recipes against the supervised ceiling", ""]
    rows += ["Held-out top-1 (unseen speakers, writers or scenes); the ceiling is "
             "`eval/ceiling.py` on the same config and budget. Under each benchmark, the "
             "command that measured it.", ""]  # fmt: skip
    order = [*RECIPES, CEILING]
    benchmarks = dict.fromkeys(r["benchmark"] for s in sweeps for r in s["results"])
    for bench in benchmarks:
        runs = [(n, r) for n, s in enumerate(sweeps, 1) for r in s["results"]]
        runs = sorted(((n, r) for n, r in runs if r["benchmark"] == bench),
                      key=lambda nr: order.index(nr[1]["recipe"]))  # fmt: skip
        numbers = list(dict.fromkeys(n for n, _ in runs))
        rows += [f"## {bench}", ""]
        if len(numbers) == 1:
            rows += [sweep_line(sweeps[numbers[0] - 1]) + ".", ""]
        else:
            rows += [f"- [{n}] {sweep_line(sweeps[n - 1])}" for n in numbers] + [""]
        rows += [*benchmark_rows(runs, len(numbers) > 1), ""]
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.one:
        with one_line_errors():
            result = one(*args.one, args)
        print(json.dumps(result))
        return result
    out = Path(args.out)
    results = Path(
        args.json or (DEFAULT_JSON if args.out == DEFAULT_OUT else out.with_suffix(".json"))
    )
    earlier = read_sweeps(results)  # a damaged file is refused before hours of training
    out.parent.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)

    def save(summary: dict) -> None:
        sweeps = merge(earlier, summary)
        atomic_write_text(out, table(sweeps) + "\n")
        atomic_write_json(results, {"sweeps": sweeps})

    summary = sweep(args, save)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError) as err:
        sys.exit(f"error: {one_line(err)}")
