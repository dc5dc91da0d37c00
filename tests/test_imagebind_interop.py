"""ImageBind checkpoint interop: small hand-made checkpoints in ImageBind's key layout, checked
against reference maths written here from the published architecture (never through our modules).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagebind_lite.interop.imagebind import (
    ImageBindCheckpointError,
    MissingModalityError,
    export_imagebind_state_dict,
    load_imagebind_encoders,
)
from imagebind_lite.modalities import build_encoder

torch.set_num_threads(1)

# Small stand-ins for imagebind_huge's branches, same layout. Audio keeps ImageBind's real input
# (128x204 fbank, kernel 16, stride 10 -> 12x19 patches) so that the stride must be inferred.
SPECS = {
    "audio": {"width": 32, "depth": 2, "heads": 4, "embed": 16, "kernel": 16, "tokens": 12 * 19},
    "depth": {"width": 24, "depth": 2, "heads": 3, "embed": 16, "kernel": 16, "tokens": 4},
    "thermal": {"width": 32, "depth": 1, "heads": 4, "embed": 16, "kernel": 16, "tokens": 9},
    "imu": {"width": 16, "depth": 2, "heads": 2, "embed": 16, "window": 8, "tokens": 250},
}
# imagebind_huge's fixed output scales (1 / temperature).
for _m, _scale in (("audio", 20.0), ("depth", 5.0), ("thermal", 10.0), ("imu", 5.0)):
    SPECS[_m]["scale"] = _scale
HEADS = {m: s["heads"] for m, s in SPECS.items()}
STEM = {"audio": "rgbt_stem", "thermal": "rgbt_stem", "depth": "depth_stem", "imu": "imu_stem"}
INPUT = {
    "audio": (1, 128, 204),
    "depth": (1, 32, 32),
    "thermal": (1, 48, 48),
    "imu": (6, 2000),
}
STRIDE = {"audio": 10, "depth": 16, "thermal": 16}


def _pos_key(m):
    pre = f"modality_preprocessors.{m}"
    return f"{pre}.pos_embed" if m == "imu" else f"{pre}.pos_embedding_helper.pos_embed"


def _head_key(m):
    return f"modality_heads.{m}.{3 if m == 'imu' else 2}.weight"


def make_branch(m: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = SPECS[m]
    d = s["width"]

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    pre = f"modality_preprocessors.{m}"
    stem = f"{pre}.{STEM[m]}"
    sd = {}
    if m == "imu":
        sd[f"{stem}.proj.weight"] = rnd(d, 6 * s["window"], scale=0.2)
    else:
        sd[f"{stem}.proj.weight"] = rnd(d, 1, s["kernel"], s["kernel"], scale=0.1)
    sd[f"{stem}.norm_layer.weight"] = 1 + rnd(d, scale=0.1)
    sd[f"{stem}.norm_layer.bias"] = rnd(d, scale=0.1)
    sd[f"{pre}.cls_token"] = rnd(1, 1, d, scale=d**-0.5)
    sd[_pos_key(m)] = rnd(1, s["tokens"] + 1, d, scale=d**-0.5)
    for i in range(s["depth"]):
        b = f"modality_trunks.{m}.blocks.{i}"
        sd[f"{b}.attn.in_proj_weight"] = rnd(3 * d, d, scale=d**-0.5)
        sd[f"{b}.attn.in_proj_bias"] = rnd(3 * d, scale=0.1)
        sd[f"{b}.attn.bias_k"] = rnd(1, 1, d, scale=0.5)
        sd[f"{b}.attn.bias_v"] = rnd(1, 1, d, scale=0.5)
        sd[f"{b}.attn.out_proj.weight"] = rnd(d, d, scale=d**-0.5)
        sd[f"{b}.attn.out_proj.bias"] = rnd(d, scale=0.1)
        for n in ("norm_1", "norm_2"):
            sd[f"{b}.{n}.weight"] = 1 + rnd(d, scale=0.1)
            sd[f"{b}.{n}.bias"] = rnd(d, scale=0.1)
        sd[f"{b}.mlp.fc1.weight"] = rnd(4 * d, d, scale=d**-0.5)
        sd[f"{b}.mlp.fc1.bias"] = rnd(4 * d, scale=0.1)
        sd[f"{b}.mlp.fc2.weight"] = rnd(d, 4 * d, scale=(4 * d) ** -0.5)
        sd[f"{b}.mlp.fc2.bias"] = rnd(d, scale=0.1)
    sd[f"modality_heads.{m}.0.weight"] = 1 + rnd(d, scale=0.1)
    sd[f"modality_heads.{m}.0.bias"] = rnd(d, scale=0.1)
    sd[_head_key(m)] = rnd(s["embed"], d, scale=d**-0.5)
    sd[f"modality_postprocessors.{m}.1.log_logit_scale"] = torch.tensor(math.log(s["scale"]))
    return sd


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for m in SPECS:
        sd.update(make_branch(m, gen))
    # Another tower's keys must not disturb the branches we load.
    sd["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    return sd


def reference_single(sd: dict, m: str, x: torch.Tensor) -> torch.Tensor:
    """ImageBind's forward for one clip per item: stem, CLS + learned positions, pre-norm blocks
    with nn.MultiheadAttention(add_bias_kv=True), LN -> CLS -> Linear, L2 x fixed scale."""
    s = SPECS[m]
    d = s["width"]
    pre = f"modality_preprocessors.{m}"
    stem = f"{pre}.{STEM[m]}"
    if m == "imu":
        b, c, t = x.shape
        k = s["window"]
        windows = x.reshape(b, c, t // k, k).transpose(1, 2).reshape(b, t // k, c * k)
        tokens = windows @ sd[f"{stem}.proj.weight"].T
    else:
        patches = F.conv2d(x, sd[f"{stem}.proj.weight"], stride=STRIDE[m])
        tokens = patches.flatten(2).transpose(1, 2)
    tokens = F.layer_norm(
        tokens, (d,), sd[f"{stem}.norm_layer.weight"], sd[f"{stem}.norm_layer.bias"], eps=1e-5
    )
    cls = sd[f"{pre}.cls_token"].expand(tokens.shape[0], -1, -1)
    h = torch.cat([cls, tokens], dim=1) + sd[_pos_key(m)]
    for i in range(s["depth"]):
        blk = f"modality_trunks.{m}.blocks.{i}"
        mha = nn.MultiheadAttention(d, s["heads"], bias=True, add_bias_kv=True, batch_first=True)
        mha.load_state_dict(
            {
                n: sd[f"{blk}.attn.{n}"]
                for n in (
                    "in_proj_weight",
                    "in_proj_bias",
                    "bias_k",
                    "bias_v",
                    "out_proj.weight",
                    "out_proj.bias",
                )
            }
        )
        mha.eval()
        y = F.layer_norm(h, (d,), sd[f"{blk}.norm_1.weight"], sd[f"{blk}.norm_1.bias"], eps=1e-6)
        h = h + mha(y, y, y, need_weights=False)[0]
        y = F.layer_norm(h, (d,), sd[f"{blk}.norm_2.weight"], sd[f"{blk}.norm_2.bias"], eps=1e-6)
        y = F.linear(y, sd[f"{blk}.mlp.fc1.weight"], sd[f"{blk}.mlp.fc1.bias"])
        y = F.gelu(y, approximate="none")
        h = h + F.linear(y, sd[f"{blk}.mlp.fc2.weight"], sd[f"{blk}.mlp.fc2.bias"])
    head = f"modality_heads.{m}"
    h = F.layer_norm(h, (d,), sd[f"{head}.0.weight"], sd[f"{head}.0.bias"], eps=1e-6)[:, 0]
    emb = F.normalize(h @ sd[_head_key(m)].T, dim=-1)
    return emb * sd[f"modality_postprocessors.{m}.1.log_logit_scale"].exp()


def reference(sd: dict, m: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == len(INPUT[m]) + 2:  # [B, clips, ...]: clips averaged after scaling
        return reference_single(sd, m, x.flatten(0, 1)).unflatten(0, x.shape[:2]).mean(dim=1)
    return reference_single(sd, m, x)


def sample(m: str, batch: int = 2, clips: int | None = None, seed: int = 1) -> torch.Tensor:
    shape = (batch,) if clips is None else (batch, clips)
    return torch.randn(*shape, *INPUT[m], generator=torch.Generator().manual_seed(seed))


ALL = tuple(SPECS)


@pytest.fixture(scope="module")
def scaled(checkpoint):
    return load_imagebind_encoders(checkpoint, ALL, num_heads=HEADS, imagebind_scaling=True)


@pytest.mark.parametrize("m", ALL)
def test_matches_reference_maths(checkpoint, scaled, m):
    x = sample(m)
    with torch.no_grad():
        out, ref = scaled[m](x), reference(checkpoint, m, x)
    assert out.shape == (2, SPECS[m]["embed"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # ImageBind's outputs are not unit length: they carry the fixed logit scale.
    torch.testing.assert_close(out.norm(dim=-1), torch.full((2,), SPECS[m]["scale"]))


def test_audio_clips_averaged_after_scaling(checkpoint, scaled):
    x = sample("audio", batch=2, clips=3)
    with torch.no_grad():
        out = scaled["audio"](x)
    torch.testing.assert_close(out, reference(checkpoint, "audio", x), atol=1e-5, rtol=0)
    assert (out.norm(dim=-1) < 20.0 - 1e-3).all()  # mean of scaled vectors, not renormalised


@pytest.mark.parametrize("m", ALL)
def test_unit_vectors_without_imagebind_scaling(checkpoint, m):
    enc = load_imagebind_encoders(checkpoint, [m], num_heads=HEADS)[m]
    x = sample(m)
    with torch.no_grad():
        out = enc(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(
        out, reference(checkpoint, m, x) / SPECS[m]["scale"], atol=1e-6, rtol=0
    )


def test_inferred_shapes_and_eval_mode(scaled):
    audio = scaled["audio"]
    assert audio.stem.proj.stride == (10, 10) and audio.stem.grid == (12, 19)
    assert scaled["depth"].stem.input_size == (32, 32)
    assert scaled["thermal"].stem.input_size == (48, 48)
    assert scaled["imu"].stem.kernel == 8 and scaled["imu"].stem.length == 2000
    for m, enc in scaled.items():
        assert len(enc.trunk.blocks) == SPECS[m]["depth"]
        assert enc.trunk.blocks[0].attn.num_heads == SPECS[m]["heads"]
        assert enc.trunk.blocks[0].attn.bias_k is not None
        assert math.isclose(enc.temperature, 1 / SPECS[m]["scale"], rel_tol=1e-6)
        assert not enc.training


def test_load_from_pth_and_safetensors(checkpoint, scaled, tmp_path):
    from safetensors.torch import save_file

    pth, st = tmp_path / "imagebind.pth", tmp_path / "imagebind.safetensors"
    torch.save(checkpoint, pth)
    save_file(checkpoint, str(st))
    x = sample("depth")
    with torch.no_grad():
        expected = scaled["depth"](x)
        for path in (pth, str(pth), st):
            enc = load_imagebind_encoders(path, ["depth"], num_heads=3, imagebind_scaling=True)
            assert list(enc) == ["depth"]
            torch.testing.assert_close(enc["depth"](x), expected, atol=0, rtol=0)


def test_num_heads_int_dict_and_defaults(checkpoint):
    # An int applies to every requested modality; a dict falls back to imagebind_huge's counts.
    enc = load_imagebind_encoders(checkpoint, ["audio", "thermal"], num_heads=4)
    assert {m: e.trunk.blocks[0].attn.num_heads for m, e in enc.items()} == {
        "audio": 4,
        "thermal": 4,
    }
    enc = load_imagebind_encoders(checkpoint, ["depth"], num_heads={"depth": 3, "audio": 4})
    assert enc["depth"].trunk.blocks[0].attn.num_heads == 3
    enc = load_imagebind_encoders(checkpoint, ["depth"])  # huge's 8 heads divide width 24
    assert enc["depth"].trunk.blocks[0].attn.num_heads == 8


def test_heads_not_dividing_width(checkpoint):
    with pytest.raises(ImageBindCheckpointError, match=r"audio: width 32 .* 5 attention heads"):
        load_imagebind_encoders(checkpoint, ["audio"], num_heads={"audio": 5})
    # imagebind_huge's 12 audio heads cannot split our 32-wide stand-in either.
    with pytest.raises(ImageBindCheckpointError, match="num_heads"):
        load_imagebind_encoders(checkpoint, ["audio"])


def test_export_round_trip(checkpoint, scaled):
    exported = export_imagebind_state_dict(scaled)
    branch = {k: v for k, v in checkpoint.items() if ".vision." not in k}
    assert set(exported) == set(branch)
    for k, v in branch.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k], v), k
    # Copies: changing a module afterwards does not change the exported tensors.
    assert exported[_pos_key("audio")].data_ptr() != scaled["audio"].pos_embed.data_ptr()

    again = load_imagebind_encoders(exported, ALL, num_heads=HEADS, imagebind_scaling=True)
    for m in ALL:
        x = sample(m, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(again[m](x), scaled[m](x), atol=0, rtol=0)
    assert export_imagebind_state_dict(again).keys() == exported.keys()


def test_export_of_our_own_encoder_loads_back():
    enc = build_encoder("thermal", 16, "tiny", preprocess={"image_size": 32}).eval()
    exported = export_imagebind_state_dict({"thermal": enc})
    assert exported["modality_preprocessors.thermal.rgbt_stem.proj.weight"].shape == (128, 1, 4, 4)
    loaded = load_imagebind_encoders(exported, ["thermal"], num_heads=4)["thermal"]
    assert loaded.stem.input_size == (32, 32)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc(x), atol=0, rtol=0)


def test_missing_branch_names_modality_and_keys(checkpoint):
    without_imu = {k: v for k, v in checkpoint.items() if ".imu." not in k}
    with pytest.raises(MissingModalityError) as err:
        load_imagebind_encoders(without_imu, ["depth", "imu"], num_heads=HEADS)
    message = str(err.value)
    assert "'imu'" in message and "modality_trunks.imu." in message
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize("name", ["vision", "smell"])
def test_unknown_or_anchor_modality(checkpoint, name):
    with pytest.raises(ValueError, match=name):
        load_imagebind_encoders(checkpoint, [name])


def test_strict_keys_and_shapes(checkpoint):
    broken = dict(checkpoint)
    del broken["modality_trunks.depth.blocks.1.norm_2.bias"]
    broken["modality_trunks.depth.blocks.1.attn.extra"] = torch.zeros(1)
    broken["modality_trunks.depth.blocks.0.mlp.fc2.weight"] = torch.zeros(24, 95)
    with pytest.raises(ImageBindCheckpointError) as err:
        load_imagebind_encoders(broken, ["depth"], num_heads=3)
    message = str(err.value)
    assert "missing keys: modality_trunks.depth.blocks.1.norm_2.bias" in message
    assert "unexpected keys: modality_trunks.depth.blocks.1.attn.extra" in message
    assert "modality_trunks.depth.blocks.0.mlp.fc2.weight: checkpoint [24, 95]" in message


def test_audio_stride_override_and_checks(checkpoint):
    enc = load_imagebind_encoders(checkpoint, ["audio"], num_heads=4, stride=10)["audio"]
    assert enc.stem.grid == (12, 19)
    with pytest.raises(ImageBindCheckpointError, match="stride"):
        load_imagebind_encoders(checkpoint, ["audio"], num_heads=4, stride=16)
    with pytest.raises(ImageBindCheckpointError, match="64x64 image .* 16 tokens"):
        load_imagebind_encoders(
            checkpoint, ["depth"], num_heads=3, preprocess={"depth": {"image_size": 64}}
        )


def test_imu_stem_bias_is_accepted(checkpoint):
    # ImageBind's IMU projection is bias-free; a port that added one must still load exactly.
    with_bias = dict(checkpoint)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(5))
    with_bias["modality_preprocessors.imu.imu_stem.proj.bias"] = bias
    enc = load_imagebind_encoders(with_bias, ["imu"], num_heads=2)["imu"]
    torch.testing.assert_close(enc.stem.proj.bias.detach(), bias, atol=0, rtol=0)
    exported = export_imagebind_state_dict({"imu": enc})
    assert torch.equal(exported["modality_preprocessors.imu.imu_stem.proj.bias"], bias)


def test_per_modality_options_must_be_keyed_by_modality(checkpoint):
    # A flat dict would otherwise be silently ignored in favour of the defaults.
    with pytest.raises(ValueError, match="keyed by modality"):
        load_imagebind_encoders(checkpoint, ["audio"], num_heads=4, preprocess={"num_mel_bins": 64})
    with pytest.raises(ValueError, match="keyed by modality"):
        load_imagebind_encoders(checkpoint, ["depth"], num_heads={"detph": 3})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"imagebind_huge{suffix}"
    path.write_bytes(b"not a checkpoint\n" * 8)
    with pytest.raises(ImageBindCheckpointError) as err:
        load_imagebind_encoders(path, modalities=("audio",))
    assert str(err.value).startswith(f"{path}: not a readable checkpoint (")
    assert "\n" not in str(err.value)
