"""Packaging: configs are package data found the same way from a checkout and an installed
wheel, and every config field is read somewhere (a field nothing reads is a silent no-op)."""

import ast
import dataclasses
import os
import subprocess
import sys
import typing

import pytest
from conftest import REPO

from imagebind_lite.anchor_finetune import FinetuneConfig
from imagebind_lite.cli import resolve_config_arg, shipped_config
from imagebind_lite.config import ConfigError, TrainConfig, load_config


def test_shipped_configs_resolve_by_name_and_file():
    assert shipped_config("depth").read_text() == (REPO / "configs" / "depth.yaml").read_text()
    assert resolve_config_arg(None, "thermal.yaml").name == "thermal.yaml"
    assert resolve_config_arg("audio", None).name == "audio.yaml"
    assert resolve_config_arg(None, None) is None
    assert load_config(resolve_config_arg(None, "depth.yaml")).modality == "depth"
    with pytest.raises(ConfigError, match="no shipped config 'nope.yaml'; shipped: audio.yaml"):
        resolve_config_arg("nope.yaml", None)


def test_non_editable_install_trains_depth_with_its_own_config(tmp_path):
    """pip install --target (not editable), then a script run from outside the checkout finds
    configs/depth.yaml inside the installed package and trains depth, not the audio defaults."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(REPO)],
        check=True,
        capture_output=True,
    )
    assert (target / "imagebind_lite" / "configs" / "depth.yaml").is_file()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = outside / "align_depth.py"
    script.write_text((REPO / "train" / "align_depth.py").read_text())
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import imagebind_lite, sys; sys.stdout.write(imagebind_lite.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=outside, env=env, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(target))  # the installed copy, not the checkout
    run = subprocess.run(
        [sys.executable, str(script), "optim.max_steps=2", "tracker=null", "output_dir=runs"]
        + ["data.batch_size=16", "encoder.overrides={depth: 1}", "eval.batch_size=64"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (run_dir,) = (outside / "runs").iterdir()
    assert run_dir.name == "depth-synthetic_scenes"
    assert load_config(run_dir / "config.yaml").modality == "depth"


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix, f.name


def _attribute_reads() -> set[tuple[str, str]]:
    """(section, field) for every ``x.section.field`` read in the package and scripts, and
    ("", field) for every ``x.field`` and ``getattr(x, "field")``."""
    reads = set()
    files = [
        p for d in ("imagebind_lite", "train", "eval", "bench") for p in (REPO / d).rglob("*.py")
    ]
    for file in files:
        if file.name == "config.py" and file.parent.name == "imagebind_lite":
            continue  # the definitions and the generic validator
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute):
                reads.add(("", node.attr))
                if isinstance(node.value, ast.Attribute):
                    reads.add((node.value.attr + ".", node.attr))
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "getattr"
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                reads.add(("", node.args[1].value))
    return reads


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
def test_every_config_field_is_read(cls):
    reads = _attribute_reads()
    unread = [
        f"{section}{name}"
        for section, name in _fields(cls)
        if (section.split(".")[-2] + "." if section else "", name) not in reads
    ]
    assert not unread, f"config fields nothing reads: {unread}"


def test_scale_recipe_config_and_multi_node_launchers():
    from accelerate.commands.config.config_args import load_config_from_file

    from imagebind_lite.train import validate_config

    cfg = load_config(shipped_config("audio_imagebind"))
    validate_config(cfg)  # the anchor name and the encoder size exist; nothing downloads
    assert (cfg.anchor.model, cfg.encoder.size, cfg.data.dataset) == (
        "ViT-H-14",
        "imagebind",
        "audioset",
    )
    assert cfg.data.batch_size * 8 == 2048 and cfg.optim.lr == 1.6e-3
    scale = REPO / "examples" / "scale"
    launch = load_config_from_file(str(scale / "accelerate_multinode.yaml"))
    assert (launch.num_machines, launch.num_processes, launch.mixed_precision) == (4, 32, "bf16")
    assert subprocess.run(["bash", "-n", str(scale / "slurm_align_audio.sbatch")]).returncode == 0
