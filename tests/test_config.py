"""Configs: YAML + dataclasses + command-line overrides; bad configs fail with one clear line."""

import os

import pytest
import torch
from conftest import REPO, run_script
from safetensors.torch import save_file

from imagebind_lite.anchor import Anchor
from imagebind_lite.config import AnchorConfig, ConfigError, TrainConfig, load_config
from imagebind_lite.train import validate_config


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modality: depth\noptim:\n  lr: 0.01\ndata:\n  preprocess: {image_size: 32}\n")
    cfg = load_config(
        path, ["optim.epochs=3", "data.preprocess={in_chans: 1}", "encoder.temperature=0.5"]
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.modality == "depth" and cfg.optim.lr == 0.01 and cfg.optim.epochs == 3
    assert cfg.data.preprocess == {"image_size": 32, "in_chans": 1}  # dict fields merge
    assert cfg.encoder.temperature == 0.5
    assert cfg.optim.betas == (0.9, 0.95)  # untouched defaults stay


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config field optim.'lrr'"),
        ("optim.epochs=ten", "optim.epochs: expected an integer"),
        ("tracker=[1]", "tracker: expected a string"),
        ("optim.lr", "not of the form"),
        ("bogus=1", "unknown config field 'bogus'"),
    ],
)
def test_bad_fields_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("anchor.model=ViT-Nope-99", "open_clip does not know 'ViT-Nope-99'"),
        ("anchor.pretrained=/no/such/anchor.safetensors", "checkpoint file not found"),
        ("anchor.pretrained=not_a_tag", "neither a file nor an open_clip tag"),
        ("modality=smell", "unknown modality 'smell'"),
        ("encoder.size=huge", "has no size 'huge'"),
        ("data.dataset=nope", "unknown dataset 'nope'"),
        ("data.root=/no/such/folder", "data.root: folder not found"),
        ("modality_file=/no/such/modality.py", "modality file not found"),
        ("eval.every_epochs=-1", "eval.every_epochs: must be 0"),
        ("loss.kind=clip", "loss.kind: expected infonce or siglip, got 'clip'"),
        ("loss.init_scale=0", "loss.init_scale: must be positive"),
        ("encoder.patch_dropout=1.0", "encoder.patch_dropout: expected a probability in"),
        ("encoder.patch_dropout=-0.1", "encoder.patch_dropout: expected a probability in"),
    ],
)
def test_semantic_errors_before_data(override, message):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)


def test_script_prints_one_clear_line_and_reads_no_data(tmp_path):
    script = [str(REPO / "train/align_audio.py"), "optim.lrr=1", f"output_dir={tmp_path}"]
    proc = run_script(script, cwd=os.getcwd(), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: unknown config field optim.'lrr'; known: betas, epochs, grad_accum, "
        "grad_clip, lr, max_steps, warmup_epochs, weight_decay"
    )
    assert not any(tmp_path.iterdir())  # no run folder, nothing read or written


def test_exponent_floats_without_a_dot_are_numbers():
    """README's `optim.lr=1e-3`: PyYAML 1.1 reads it as a string; float fields take it."""
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5E-2"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.05


def test_siglip_refuses_loss_local_in_one_line():
    cfg = load_config(None, ["loss.kind=siglip", "loss.local=true"])
    with pytest.raises(ConfigError, match="loss.local: siglip always scores") as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)
    validate_config(load_config(None, ["loss.kind=siglip"]))
    validate_config(load_config(None, ["loss.local=true"]))


def test_patch_dropout_refuses_a_stem_with_one_token():
    # IMU's stem with one window of the whole 2000 steps: a single token, none to drop.
    one = ["modality=imu", "data.dataset=synthetic_scenes", "encoder.overrides={window: 2000}"]
    validate_config(load_config(None, one))
    cfg = load_config(None, [*one, "encoder.patch_dropout=0.5"])
    with pytest.raises(ConfigError, match="encoder.patch_dropout: the imu encoder at this size"):
        validate_config(cfg)
    validate_config(load_config(None, ["encoder.patch_dropout=0.5"]))


def _anchor_weights(tmp_path, drop: str | None = None):
    """The shipped tiny anchor's weights as a plain open_clip checkpoint file."""
    weights = Anchor(AnchorConfig()).model.state_dict()
    if drop:
        weights = {k: v for k, v in weights.items() if not k.startswith(drop)}
    path = tmp_path / "anchor.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def test_an_anchor_checkpoint_file_loads_and_one_that_does_not_fit_is_one_line(tmp_path):
    path = _anchor_weights(tmp_path)
    loaded = Anchor(AnchorConfig(pretrained=str(path)))
    shipped = Anchor(AnchorConfig())
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), shipped.state_dict().values())
    )
    path = _anchor_weights(tmp_path, drop="visual.proj")
    with pytest.raises(ConfigError) as err:
        Anchor(AnchorConfig(pretrained=str(path)))
    message = str(err.value)
    assert message.startswith(f"anchor.pretrained: {path} does not fit open_clip's tiny-clip-32: ")
    assert "visual.proj" in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_an_unreadable_anchor_checkpoint_is_one_line(tmp_path, suffix):
    path = tmp_path / f"anchor{suffix}"
    path.write_bytes(b"not a checkpoint\n" * 4)
    with pytest.raises(ConfigError) as err:
        Anchor(AnchorConfig(pretrained=str(path)))
    assert str(err.value).startswith(f"anchor.pretrained: {path}: not a readable checkpoint (")
    assert "\n" not in str(err.value)


def test_weights_that_cannot_be_fetched_are_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no route to host\nmore")

    monkeypatch.setattr("open_clip.create_model_and_transforms", offline)
    with pytest.raises(ConfigError) as err:
        Anchor(AnchorConfig(model="ViT-B-32", pretrained="openai", model_config=None))
    assert str(err.value) == (
        "anchor.pretrained: could not fetch open_clip's 'openai' weights of ViT-B-32 (offline? a "
        "downloaded checkpoint file works too): Failed to download weights for tag 'openai': "
        "no route to host"
    )
