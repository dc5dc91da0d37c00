"""``encoder.init=anchor`` (the new tower starts as the anchor's open_clip image tower) and
``encoder.trainable`` (all, lens, lora, head): the mapping reproduces the anchor, the positions
fit the modality's grid, each mode trains exactly its parts, frozen parts stay bit-identical
through real optimizer steps, the model folder loads without the anchor, and what cannot map is
refused in one line."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from imagebind_lite.anchor import Anchor
from imagebind_lite.checkpoint import load_model, save_model
from imagebind_lite.config import AnchorConfig, ConfigError, load_config
from imagebind_lite.lora import lora_layers
from imagebind_lite.models.anchor_init import (
    anchor_architecture,
    init_architecture,
    setup_encoder,
)
from imagebind_lite.models.build import build_encoder
from imagebind_lite.models.trainable import trainable_counts
from imagebind_lite.train import (
    AlignmentModule,
    AlignmentObjective,
    StepContext,
    param_groups,
    train,
    train_step,
    validate_config,
)

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
AUDIO = {"num_mel_bins": 64, "target_length": 112}


def _register(folder: Path, name: str, vision: dict, **extra) -> AnchorConfig:
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps({"embed_dim": 48, "vision_cfg": vision, "text_cfg": TEXT_CFG, **extra})
    )
    return AnchorConfig(model=name, model_config=str(path), pretrained=None)


@pytest.fixture(scope="module")
def anchor():
    return Anchor(AnchorConfig())  # tiny-clip-32 with its shipped weights


@pytest.fixture(scope="module")
def other_anchor(tmp_path_factory):
    """A random open_clip ViT of another width, patch, head count, MLP ratio and activation."""
    vision = {"image_size": 48, "layers": 2, "width": 96, "head_width": 32, "mlp_ratio": 3.0}
    cfg = _register(
        tmp_path_factory.mktemp("vit"),
        "test-vit-96-p8",
        {**vision, "patch_size": 8},
        quick_gelu=True,
    )
    torch.manual_seed(0)
    return Anchor(cfg)


def _cfg(modality="depth", *overrides):
    return load_config(None, [f"modality={modality}", "encoder.init=anchor", *overrides])


def _encoder(anchor, modality="depth", preprocess=None, *overrides):
    cfg = _cfg(modality, *overrides)
    encoder = build_encoder(
        modality,
        anchor.embed_dim,
        cfg.encoder.size,
        cfg.encoder.overrides,
        preprocess,
        architecture=init_architecture(cfg, anchor),
    )
    setup_encoder(encoder, cfg, anchor)
    return encoder


@pytest.mark.parametrize("which", ["anchor", "other_anchor"])
def test_an_equal_channel_image_through_the_new_tower_is_the_anchors_embedding(which, request):
    anchor = request.getfixturevalue(which)
    size = anchor.image_size[0]
    torch.manual_seed(1)
    grey = torch.randn(4, 1, size, size)  # already normalised: the anchor sees 3 equal channels
    rgb = torch.randn(4, 3, size, size)
    for chans, x, seen in (
        (1, grey, grey.expand(-1, 3, -1, -1)),
        (2, grey.repeat(1, 2, 1, 1), grey.expand(-1, 3, -1, -1)),
        (3, rgb, rgb),
    ):
        encoder = _encoder(anchor, "depth", {"image_size": size, "in_chans": chans}).eval()
        with torch.no_grad():
            ours = encoder(x)
        assert torch.allclose(ours, anchor.encode_image(seen), rtol=1e-5, atol=1e-6), chans
    arch = encoder.architecture
    if which == "other_anchor":
        read = {k: arch[k] for k in ("width", "depth", "heads", "mlp_width", "patch", "act")}
        assert read == dict(
            width=96, depth=2, heads=3, mlp_width=288, patch=[8, 8], act="quick_gelu"
        )


def test_each_mapped_block_computes_what_the_open_clip_block_does(other_anchor):
    encoder = _encoder(other_anchor, "depth", {"image_size": 48}).eval()
    x = torch.randn(2, 37, 96)
    with torch.no_grad():
        for theirs, ours in zip(
            other_anchor.model.visual.transformer.resblocks, encoder.trunk.blocks, strict=True
        ):
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_audio_positions_are_the_anchor_grid_resized_to_the_fbank_grid(anchor):
    encoder = _encoder(anchor, "audio", AUDIO)
    visual = anchor.model.visual
    assert encoder.stem.grid == (64 // 4, 112 // 4) and encoder.pos_embed.shape == (
        1,
        1 + 16 * 28,
        128,
    )
    expected = resample_abs_pos_embed(visual.positional_embedding[None], [16, 28], old_size=[8, 8])
    torch.testing.assert_close(encoder.pos_embed, expected, rtol=0, atol=1e-6)
    assert torch.equal(encoder.pos_embed[0, 0], visual.positional_embedding[0])  # CLS kept
    assert encoder(torch.randn(2, 1, 1, 64, 112)).shape == (2, 64)  # [B, clips, 1, mel, frames]


def _hand_counts(width, depth, mlp, patch, chans, tokens, embed, rank=8):
    stem = width * chans * patch * patch + width + (tokens + 1) * width + 2 * width
    block = 2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width
    block += (width * mlp + mlp) + (mlp * width + width)
    lora = rank * (2 * width) + rank * (width + mlp) + rank * (mlp + width)
    head = 2 * width + width * embed
    return {
        "all": {"stem": stem, "trunk": depth * block, "head": head},
        "lens": {"stem": stem, "trunk": 0, "head": head},
        "lora": {"stem": stem, "trunk": depth * lora, "head": head},
        "head": {"stem": 0, "trunk": 0, "head": head},
    }


@pytest.mark.parametrize("mode", ["all", "lens", "lora", "head"])
def test_trainable_parameters_per_mode_are_the_hand_count(anchor, mode):
    counts = {
        "audio": _hand_counts(128, 3, 256, 4, 1, 16 * 28, 64),
        "depth": _hand_counts(128, 3, 256, 4, 1, 8 * 8, 64),
    }
    for modality, preprocess in (("audio", AUDIO), ("depth", {"image_size": 32})):
        encoder = _encoder(anchor, modality, preprocess, f"encoder.trainable={mode}")
        expected = counts[modality][mode]
        assert trainable_counts(encoder) == {**expected, "total": sum(expected.values())}
    # Random init, the tiny depth size: the same shapes, but a stem LayerNorm (ImageBind's) in
    # place of ln_pre, and each block's extra key/value token (2 x width).
    cfg = load_config(None, ["modality=depth", f"encoder.trainable={mode}"])
    encoder = build_encoder("depth", 64, "tiny", None, {"image_size": 32})
    setup_encoder(encoder, cfg, None)
    random = _hand_counts(128, 3, 256, 4, 1, 64, 64)[mode]
    random["trunk"] += 3 * 2 * 128 if mode == "all" else 0
    assert trainable_counts(encoder) == {**random, "total": sum(random.values())}


def _steps(encoder, modality, inputs, steps=3):
    accelerator = Accelerator(cpu=True)
    model = AlignmentModule(encoder)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in encoder.parameters() if p.requires_grad}
    model, optimizer = accelerator.prepare(model, optimizer)
    anchor = Anchor(AnchorConfig(pretrained=None))
    objective = AlignmentObjective(anchor, modality, temperature=0.2)
    ctx = StepContext(accelerator, model, optimizer, objective, grad_clip=1.0)
    torch.manual_seed(0)
    for _ in range(steps):
        train_step(ctx, {"vision": torch.randn(8, 3, 32, 32), modality: inputs()})


@pytest.mark.parametrize(
    "init, modality, size, mode",
    [
        ("anchor", "depth", "tiny", "lens"),
        ("anchor", "depth", "tiny", "lora"),
        ("anchor", "depth", "tiny", "head"),
        ("random", "audio", "tiny-conv", "head"),  # a BatchNorm stem: its statistics too
        ("random", "audio", "tiny", "lora"),
    ],
)
def test_after_real_steps_frozen_parts_are_bit_identical_and_trained_ones_moved(
    anchor, init, modality, size, mode
):
    cfg = load_config(
        None,
        [
            f"modality={modality}",
            f"encoder.init={init}",
            f"encoder.size={size}",
            f"encoder.trainable={mode}",
        ],
    )
    preprocess = {"image_size": 32} if modality == "depth" else AUDIO
    encoder = build_encoder(
        modality,
        anchor.embed_dim,
        size,
        None,
        preprocess,
        architecture=init_architecture(cfg, anchor),
    )
    setup_encoder(encoder, cfg, anchor)
    shape = (8, 1, 32, 32) if modality == "depth" else (8, 1, 64, 112)
    trained = {n for n, p in encoder.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    _steps(encoder, modality, lambda: torch.randn(shape))
    after = encoder.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved - {"log_logit_scale"} == trained  # every trained tensor moved, nothing else
    if mode == "lora":
        assert trained and all(".lora_" in n or not n.startswith("trunk.") for n in trained)


def test_short_lens_training_keeps_the_anchor_trunk_and_its_model_folder_loads(anchor, tmp_path):
    overrides = [
        f"output_dir={tmp_path}",
        "tracker=null",
        "encoder.init=anchor",
        "encoder.trainable=lens",
        "data.preprocess={image_size: 32}",
        "data.options={train_size: 64, test_size: 32}",
        "data.batch_size=16",
        "optim.max_steps=3",
        "eval.batch_size=32",
    ]
    cfg = load_config(REPO / "configs/depth.yaml", overrides)
    metrics = train(cfg, quiet=True)
    folder = Path(metrics["run_dir"]) / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["init"] == "anchor" and config["trainable"] == "lens"
    assert config["architecture"]["width"] == 128
    saved = load_file(str(folder / "model.safetensors"))
    start = _encoder(anchor, "depth", {"image_size": 32}).state_dict()
    for key, value in start.items():
        same = torch.equal(saved[key], value)
        assert same == key.startswith("trunk.") or key == "log_logit_scale", key
    encoder, _ = load_model(folder)
    assert set(encoder.state_dict()) == set(saved)


def test_a_lora_tower_saves_merged_and_loads_without_the_anchor(anchor, tmp_path, monkeypatch):
    encoder = _encoder(anchor, "audio", AUDIO, "encoder.trainable=lora", "encoder.lora_rank=4")
    with torch.no_grad():
        for layer in lora_layers(encoder).values():
            layer.lora_B.normal_(std=0.05)  # as if trained
    config = {
        "modality": "audio",
        "size": "tiny",
        "overrides": {},
        "preprocess": AUDIO,
        "temperature": 0.05,
        "embed_dim": 64,
        "anchor": {},
    }
    save_model(encoder, config, tmp_path / "model")
    assert lora_layers(encoder)  # the training model keeps its adapters

    def no_anchor(*args, **kwargs):
        raise AssertionError("load_model built an open_clip model")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_anchor)
    monkeypatch.setattr(open_clip, "create_model", no_anchor)
    loaded, saved = load_model(tmp_path / "model")
    assert saved["lora"] == {"layers": 9, "rank": 4, "alpha": 16.0, "merged": True}
    assert not any("lora" in k or ".base." in k for k in loaded.state_dict())
    x = torch.randn(3, 1, 64, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder.eval()(x), rtol=1e-5, atol=1e-6)
    # Without adapters the round trip is exact.
    lens = _encoder(anchor, "depth", {"image_size": 32}, "encoder.trainable=lens").eval()
    save_model(
        lens, {**config, "modality": "depth", "preprocess": {"image_size": 32}}, tmp_path / "lens"
    )
    again, _ = load_model(tmp_path / "lens")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), lens(x))


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "encoder.init" in message, message
    return message


@pytest.mark.parametrize("modality", ["imu", "pen"])
def test_a_time_series_modality_is_refused_in_one_line(modality):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(modality))
    assert "is not image-shaped" in _one_line(err)


def test_towers_that_cannot_map_are_refused_in_one_line(tmp_path):
    resnet = _register(
        tmp_path, "test-rn-16", {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}
    )
    cfg = _cfg(
        "depth",
        f"anchor.model={resnet.model}",
        f"anchor.model_config={resnet.model_config}",
        "anchor.pretrained=null",
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "ModifiedResNet image tower" in _one_line(err)
    tower = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=32, width=16)
    with pytest.raises(ConfigError) as err:
        anchor_architecture(tower)
    assert "ModifiedResNet, not an open_clip VisionTransformer" in _one_line(err)
    vision = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    scaled = Anchor(_register(tmp_path, "test-vit-ls", {**vision, "ls_init_value": 0.1}))
    with pytest.raises(ConfigError) as err:
        anchor_architecture(scaled.model.visual)
    assert "layer scale" in _one_line(err)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["encoder.overrides={width: 64}"], "may only set drop_path, not width"),
        (["anchor.cache=somewhere", "anchor.pretrained=null"], "no anchor weights to start from"),
        (["encoder.init=imagenet"], "encoder.init: expected random or anchor"),
    ],
)
def test_bad_init_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg("depth", *overrides))
    assert message in _one_line(err)
    with pytest.raises(ConfigError, match="encoder.trainable: expected all, lens, lora, head"):
        validate_config(load_config(None, ["encoder.trainable=everything"]))
