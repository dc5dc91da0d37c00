"""Scripts given bad input print one short line naming the problem, exit non-zero, and leave no
run folder or half-written output behind."""

import ast
import contextlib
import io
import os
import re
import runpy
import sys

import pytest
import torch
from conftest import REPO, run_script


def invoke(tmp_path, script, *args):
    """``python SCRIPT ARGS`` from ``tmp_path``, as a process of its own (forked warm)."""
    return run_script([str(REPO / script), *args], cwd=tmp_path, timeout=300)


def invoke_in_process(folder, script, *args) -> tuple[int, str]:
    """(exit status, stderr) of ``python SCRIPT ARGS`` run in this process from ``folder``:
    the script's own ``__main__`` (runpy), without paying a new interpreter's imports; an
    exception other than SystemExit (a traceback, in a real run) fails the test."""
    err, cwd, argv, path = io.StringIO(), os.getcwd(), sys.argv, list(sys.path)
    sys.argv = [str(REPO / script), *args]
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        os.chdir(cwd)
        sys.argv, sys.path[:] = argv, path
    code = exit_info.value.code
    if isinstance(code, str):  # sys.exit("message"): the interpreter prints it, status 1
        return 1, err.getvalue() + code + "\n"
    return code or 0, err.getvalue()


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
    # bench/: argument errors and missing inputs, found before any benchmarking starts
    ("bench/audio_preprocess.py", ["nowhere"], "folder: no such folder: nowhere"),
    ("bench/audio_preprocess.py", ["data"], "data: no readable audio files"),
    ("bench/audio_compare.py", ["HEAD", "nowhere"], "DIR: no such folder: nowhere"),
    ("bench/audio_compare.py", ["no-such-rev", "data"], "at revision 'no-such-rev'"),
    ("bench/make_long_audio.py", ["nowhere", "out"], "source: no such folder: nowhere"),
    ("bench/make_long_audio.py", ["data", "out"], "no WAV or FLAC files under data"),
    ("bench/encoder.py", ["--device", "nosuch"], "--device nosuch: unknown device 'nosuch'"),
    ("bench/encoder.py", ["--modality", "nosuch"], "unknown modality 'nosuch'"),
    # Without a GPU the ImageBind-size step says so rather than crawl on the CPU.
    (
        "bench/gpu_audio_step.py",
        [] if not torch.cuda.is_available() else ["--device", "cuda:99"],
        "no CUDA GPU on this machine" if not torch.cuda.is_available() else "cuda device(s)",
    ),
    ("bench/gpu_audio_step.py", ["--device", "cpu", "--precision", "fp8"], "invalid choice"),
    ("bench/loss_memory.py", ["--global-batch", "512,abc"], "--global-batch: expected a whole"),
    ("bench/train_step.py", ["--anchor", "nosuch"], "unknown open_clip model 'nosuch'"),
    ("bench/manifest_cache.py", ["--clips", "4", "--batch", "8"], "fewer than one --batch"),
    ("bench/shard_offsets.py", ["--shards", "nowhere"], "--shards: no such folder: nowhere"),
    ("bench/shard_offsets.py", ["--shards", "data"], "no shard index data/shards.json"),
]


@pytest.mark.parametrize(
    "script, args, message", CASES, ids=[" ".join([c[0], *c[1]]) for c in CASES]
)
def test_bad_invocation_prints_one_line_and_writes_nothing(inputs, script, args, message):
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    status, stderr = invoke_in_process(inputs, script, *args)
    lines = stderr.strip().splitlines()
    assert status != 0
    assert len(lines) == 1, stderr[-3000:]
    assert message in lines[0] and lines[0].startswith(("error: ", "config error: "))
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # nothing written


def test_bench_arguments_fail_in_one_line_in_process(capsys):
    """The parser the bench scripts share: a usage error is one line and exit status 2."""
    from imagebind_lite.cli import OneLineArgumentParser, positive_int

    parser = OneLineArgumentParser(prog="bench.py")
    parser.add_argument("--steps", type=positive_int, default=1)
    parser.add_argument("--mode", choices=("a", "b"), default="a")
    assert parser.parse_args(["--steps", "3"]).steps == 3
    for argv, message in [
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--steps", "two"], "argument --steps: expected a whole number, got 'two'"),
        (["--mode", "c"], "argument --mode: invalid choice: 'c'"),
        (["--nope"], "unrecognized arguments: --nope"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: bench.py: ") and message in err


# A device this machine lacks: any CUDA GPU here, else one past the last.
MISSING_GPU, MISSING_GPU_SAYS = (
    ("cuda", "no CUDA GPU on this machine")
    if not torch.cuda.is_available()
    else ("cuda:99", f"this machine has {torch.cuda.device_count()} cuda device(s)")
)
SCRIPTS = sorted(
    str(p.relative_to(REPO)) for d in ("train", "eval") for p in (REPO / d).glob("*.py")
)


def calls(script: str) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse((REPO / script).read_text())) if isinstance(n, ast.Call)]


def called(call: ast.Call) -> str:
    return getattr(call.func, "attr", None) or getattr(call.func, "id", "")


def test_every_script_parses_with_the_one_line_parser_and_checks_its_device():
    """What the two subprocess tests below show for a few scripts, read from every script's
    source: its parser is OneLineArgumentParser (directly, or through train_main/bind_main;
    plain ones only as add_help=False parents), and any --device goes through device_arg."""
    devices = 0
    for script in SCRIPTS:
        found = calls(script)
        names = {called(c) for c in found}
        assert names & {"OneLineArgumentParser", "train_main", "bind_main"}, script
        for call in found:
            if called(call) == "ArgumentParser":
                assert any(k.arg == "add_help" for k in call.keywords), script
            options = [a.value for a in call.args if isinstance(a, ast.Constant)]
            if called(call) == "add_argument" and "--device" in options:
                kinds = [k.value for k in call.keywords if k.arg == "type"]
                assert [getattr(k, "id", None) for k in kinds] == ["device_arg"], script
                devices += 1
    assert devices >= 6


@pytest.mark.parametrize("script", ["zero_shot", "space"])
def test_a_device_this_machine_lacks_is_one_line_before_any_model_loads(tmp_path, script):
    proc = invoke(tmp_path, f"eval/{script}.py", "--checkpoint", "RUN", "--device", MISSING_GPU)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {script}.py: argument --device: {MISSING_GPU_SAYS}")


def test_device_arg_passes_what_this_machine_has_and_names_what_it_lacks():
    import argparse

    from imagebind_lite.cli import available_device, device_arg

    assert device_arg("cpu") == "cpu" and available_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert device_arg("cuda:0") == "cuda:0"
    for device, message in [
        (MISSING_GPU, MISSING_GPU_SAYS),
        ("mps", "no mps device on this machine"),
        ("gpu0", "unknown device 'gpu0' (cpu, cuda, cuda:N or mps)"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            device_arg(device)
    with pytest.raises(ValueError, match=r"^--device mps: no mps device on this machine"):
        available_device("mps")


# One of each way a script builds its parser: its own, train_main's, bind_main's, subcommands.
@pytest.mark.parametrize(
    "script", ["train/write_shards.py", "train/align_audio.py", "train/bind.py", "eval/space.py"]
)
def test_a_wrong_flag_is_one_usage_line(tmp_path, script):
    proc = invoke(tmp_path, script, "--no-such-flag")
    name = script.rpartition("/")[2]
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {name}") and not any(tmp_path.iterdir())


def test_a_folder_that_is_no_model_says_what_it_holds(tmp_path):
    from imagebind_lite.checkpoint import load_run

    (tmp_path / "runs" / "a" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "model" / "config.json").write_text("{}")
    (tmp_path / "runs" / "k" / "checkpoints").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"config.json is missing \(it holds runs: \S+/a\)$"
    ):
        load_run(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=r"no model/ yet: it has not finished; --resume it"):
        load_run(tmp_path / "runs" / "k")
    with pytest.raises(FileNotFoundError, match=r"k/checkpoints/config.json is missing$"):
        load_run(tmp_path / "runs" / "k" / "checkpoints")
