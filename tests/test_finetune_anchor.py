"""Domain fine-tuning of the anchor: full / last_n / LoRA, manifest domains, the new identity."""

import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from imagebind_lite.anchor import Anchor, resolve_asset, validate_anchor_config
from imagebind_lite.anchor_finetune import (
    FinetuneConfig,
    finetune_anchor,
    load_manifest_domain,
    validate_finetune_config,
)
from imagebind_lite.cache import StaleCacheError, anchor_fingerprint, check_anchor
from imagebind_lite.config import AnchorConfig, ConfigError, load_config
from imagebind_lite.data import avmnist
from imagebind_lite.lora import LoRALinear, apply_lora, lora_parameters, merge_lora

SHIPPED = "imagebind_lite:tiny-clip-digits-scenes"
TARGETS = ("out_proj", "c_fc", "c_proj")


def tiny(tmp_path, name, **kw):
    """Two steps on a few synthetic scenes: seconds on a CPU."""
    fields = dict(
        anchor=AnchorConfig(pretrained=SHIPPED),
        domains=["scenes"],
        epochs=1,
        max_steps=2,
        batch_size=16,
        scene_train_size=32,
        scene_test_size=16,
        save_dtype="fp32",
        output=str(tmp_path / f"{name}.safetensors"),
    )
    fields.update(kw)
    return FinetuneConfig(**fields)


def shipped_state():
    return load_file(resolve_asset(SHIPPED, (".safetensors",)))


def changed_keys(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()  # a plain open_clip state dict, whatever trained
    return {k for k in before if not torch.equal(before[k].float(), after[k].float())}


# ------------------------------------------------------------------------------ LoRA unit


def test_lora_starts_at_the_base_model_and_merges_into_plain_weights():
    validate_anchor_config(AnchorConfig(pretrained=None))  # registers tiny-clip-32
    torch.manual_seed(0)
    # Frozen like an anchor: with an attention mask, PyTorch picks its attention kernel by
    # requires_grad even under no_grad, which changes the last bits of the text tower.
    model = open_clip.create_model("tiny-clip-32").eval().requires_grad_(False)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.get_tokenizer("tiny-clip-32")(["a b", "c"])
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(images), model.encode_text(tokens)

    names = apply_lora(model, TARGETS, rank=4, alpha=8.0)
    # Every block of both towers: attention out_proj (read as .weight by nn.MultiheadAttention)
    # and both MLP layers.
    assert len(names) == 3 * (3 + 2)
    assert isinstance(model.visual.transformer.resblocks[0].attn.out_proj, LoRALinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{ab}" for n in names for ab in "AB"
    }
    with torch.no_grad():  # B = 0: the adapted model computes exactly the base model
        assert torch.equal(model.encode_image(images), ref_image)
        assert torch.equal(model.encode_text(tokens), ref_text)

    # Gradients reach the adapters through the MultiheadAttention path too.
    model.train()
    model.encode_image(images).sum().backward()
    out_proj = model.visual.transformer.resblocks[0].attn.out_proj
    assert out_proj.lora_B.grad is not None and out_proj.lora_B.grad.abs().sum() > 0

    for p in lora_parameters(model):
        nn.init.normal_(p, std=0.02)
    layer = model.transformer.resblocks[1].mlp.c_fc
    x = torch.randn(5, layer.in_features)
    expected = layer.base(x) + x @ (layer.lora_B @ layer.lora_A).T * layer.scaling
    torch.testing.assert_close(layer(x), expected)
    model.eval()
    with torch.no_grad():
        adapted_image = model.encode_image(images)
    assert merge_lora(model) == names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.visual.transformer.resblocks[0].attn.out_proj).__name__ == (
        "NonDynamicallyQuantizableLinear"
    )
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), adapted_image, rtol=1e-5, atol=1e-5)
    assert changed_keys(base_state, model.state_dict()) == {f"{n}.weight" for n in names}

    with pytest.raises(ValueError, match="no nn.Linear layer named"):
        apply_lora(model, ["qkv"])


# ------------------------------------------------------------------------------ runs


def test_defaults_keep_the_shipped_recipe():
    cfg = FinetuneConfig()
    assert (cfg.trainable, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (
        "full",
        30,
        128,
        1e-3,
        0.05,
    )
    assert cfg.domains == ["digits", "scenes"] and cfg.seed == 0 and cfg.max_steps is None
    assert cfg.anchor.pretrained is None and cfg.save_dtype == "fp16"


def test_bad_configs_fail_in_one_line(tmp_path):
    for overrides, match in [
        (["trainable=half"], "trainable: expected full, last_n, lora"),
        (["domains=[mnist]"], "neither a built-in domain"),
        (["domains=[{manifest: a.csv, captions: x}]"], "unknown key 'captions'"),
        (["output=anchor.pt"], "must end in .safetensors"),
        (["domains=[digits, digits]"], "names must be unique"),
    ]:
        cfg = load_config(None, overrides, cls=FinetuneConfig)
        with pytest.raises(ConfigError, match=match):
            validate_finetune_config(cfg)


def test_full_run_reports_before_after_and_changes_the_anchor_identity(tmp_path):
    result = finetune_anchor(tiny(tmp_path, "full"), quiet=True)
    out = Path(result["output"])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps"] == 2 and report["trainable"] == "full"
    for key in ("image_to_text_before", "image_to_text_after"):
        assert 0.0 <= report[key]["scenes"]["top1"] <= 1.0
    assert (
        report["image_to_text_top1_before"]["scenes"]
        == report["image_to_text_before"]["scenes"]["top1"]
    )
    assert report["eval_sizes"] == {"scenes": 16}
    assert changed_keys(shipped_state(), load_file(str(out)))  # everything may move

    # The new weights are a new anchor: a new identity, and caches of the old one are refused.
    old = Anchor(AnchorConfig(pretrained=SHIPPED))
    new = Anchor(AnchorConfig(pretrained=str(out)))
    assert new.identity()["sha256"] == report["sha256"] != old.identity()["sha256"]
    assert new.encode_text(["a photo of a ring."]).shape == (1, new.embed_dim)
    check_anchor({"anchor_fingerprint": anchor_fingerprint(old)}, old, "anchor.cache")
    with pytest.raises(StaleCacheError, match="stale anchor cache.*weights differ"):
        check_anchor({"anchor_fingerprint": anchor_fingerprint(old)}, new, "anchor.cache")


def test_last_n_moves_only_the_last_blocks_and_heads(tmp_path):
    result = finetune_anchor(tiny(tmp_path, "last1", trainable="last_n", last_n=1), quiet=True)
    changed = changed_keys(shipped_state(), load_file(result["output"]))
    allowed = (
        "visual.transformer.resblocks.2.",
        "transformer.resblocks.1.",
        "visual.ln_post.",
        "ln_final.",
        "visual.proj",
        "text_projection",
        "logit_scale",
    )
    assert changed and all(k.startswith(allowed) for k in changed), sorted(changed)
    assert any(k.startswith("visual.transformer.resblocks.2.") for k in changed)
    assert any(k.startswith("transformer.resblocks.1.") for k in changed)


def test_lora_run_changes_only_adapted_weights(tmp_path):
    result = finetune_anchor(tiny(tmp_path, "lora", trainable="lora", lora_rank=2), quiet=True)
    base, merged = shipped_state(), load_file(result["output"])
    changed = changed_keys(base, merged)
    targets = {k for k in base if k.endswith(tuple(f"{t}.weight" for t in TARGETS))}
    assert len(targets) == 15 and changed and changed <= targets
    assert result["lora"]["adapted_layers"] == 15 and result["lora"]["merged"]
    # rank-2 adapters: a small fraction of the 2M weights train
    assert result["trainable_parameters"] < 0.05 * result["total_parameters"]
    # the merged update of one layer has rank <= 2
    key = next(iter(sorted(changed)))
    delta = merged[key].double() - base[key].double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-3) <= 2


# ------------------------------------------------------------------------------ manifest domains


def write_digit_manifest(root: Path, n_train: int = 48, n_test: int = 20) -> Path:
    """UCI digit images as PNG files, with captions, class labels and a split column."""
    images, labels = avmnist.load_digit_images()
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n_train + n_test):
        pixels = (images[i].numpy() * 255).astype("uint8")
        Image.fromarray(pixels).resize((16, 16)).save(root / "img" / f"{i}.png")
        name = avmnist.DIGIT_NAMES[int(labels[i])]
        rows.append(
            {
                "image": f"img/{i}.png",
                "caption": f"a handwritten {name}, sample {i}.",
                "label": name,
                "split": "train" if i < n_train else "test",
            }
        )
    path = root / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(avmnist.DIGIT_NAMES))
    return path


def test_manifest_domain_trains_and_reports_classes_and_retrieval(tmp_path):
    manifest = write_digit_manifest(tmp_path / "data")
    cfg = tiny(
        tmp_path, "mine", domains=[{"name": "mine", "manifest": str(manifest)}], trainable="last_n"
    )
    result = finetune_anchor(cfg, quiet=True)
    for key in ("image_to_text_before", "image_to_text_after"):
        scores = result[key]["mine"]
        assert set(scores) == {"top1", "R@1", "R@5"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    # The shipped anchor knows digits: its zero-shot on these unseen PNGs is far above chance.
    assert result["image_to_text_before"]["mine"]["top1"] > 0.5
    assert result["domains"]["mine"]["train_pairs"] == 48
    assert result["eval_sizes"] == {"mine": 20}


def test_manifest_domain_from_a_second_manifest_is_retrieval_only(tmp_path):
    root = tmp_path / "data"
    write_digit_manifest(root, 8, 4)
    rows = list(csv.DictReader((root / "pairs.csv").read_text().splitlines()))
    (root / "classes.txt").unlink()
    for name, part in (("train.jsonl", rows[:8]), ("test.jsonl", rows[8:])):
        lines = [
            json.dumps({"image": r["image"], "caption": [r["caption"], "a digit."]}) for r in part
        ]
        (root / name).write_text("\n".join(lines))
    domain = load_manifest_domain(
        {"manifest": str(root / "train.jsonl"), "eval_manifest": "test.jsonl"}, 32
    )
    assert domain.name == "train" and domain.eval_labels is None
    assert domain.eval_captions[0] == [rows[8]["caption"], "a digit."]
    assert domain.train_images[0].shape == (3, 32, 32)
    assert domain.train_captions(0, torch.Generator().manual_seed(0)) in (
        rows[0]["caption"],
        "a digit.",
    )
    (root / "img" / "9.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 4 image files not found"):
        load_manifest_domain(
            {"manifest": str(root / "train.jsonl"), "eval_manifest": str(root / "test.jsonl")}, 32
        )
    with pytest.raises(ValueError, match="no held-out pairs"):
        load_manifest_domain({"manifest": str(root / "train.jsonl")}, 32)
