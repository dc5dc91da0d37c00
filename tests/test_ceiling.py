"""eval/ceiling.py: the same encoder trained on labels, scored on the same held-out split."""

import json

import pytest
import torch
from conftest import REPO, run_script, tiny_overrides

from imagebind_lite.ceiling import CosineClassifier, ceiling
from imagebind_lite.config import load_config
from imagebind_lite.train import train

PEN = [
    "anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes",
    "data.batch_size=64",
    "optim.max_steps=25",
    "optim.warmup_epochs=0.1",
]


def pen_config(tmp_path, *extra):
    return load_config(REPO / "configs" / "pen.yaml", tiny_overrides(tmp_path, *PEN, *extra))


@pytest.fixture(scope="module")
def pen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pen")
    train(pen_config(out), quiet=True)
    return out / "pen-pendigits"


def test_the_classifier_is_cosine_over_the_temperature():
    encoder = torch.nn.Linear(4, 3)
    model = CosineClassifier(encoder, num_classes=5, dim=3, temperature=0.1)
    x = torch.randn(2, 4)
    emb = torch.nn.functional.normalize(encoder(x), dim=-1)
    classes = torch.nn.functional.normalize(model.classes, dim=-1)
    assert torch.allclose(model(x), emb @ classes.T / 0.1, atol=1e-6)


def test_labels_train_the_same_encoder_and_the_gap_is_against_the_run(tmp_path, pen_run):
    metrics = ceiling(pen_config(tmp_path), checkpoint=str(pen_run))
    saved = json.loads((tmp_path / "ceiling-pen-pendigits" / "metrics.json").read_text())
    assert saved["steps"] == 25 and saved["num_eval"] == 3498  # the 14 held-out writers
    assert metrics["supervised_top1"] > 0.5  # 25 steps of labels; chance is 0.1
    assert saved["supervised_top1"] == metrics["supervised_top1"]
    # The aligned run scored on the ceiling's split is the run's own held-out figure.
    run = json.loads((pen_run / "metrics.json").read_text())
    assert metrics["emergent_top1"] == pytest.approx(run["zero_shot_top1"], abs=1e-6)
    gap = metrics["supervised_top1"] - metrics["emergent_top1"]
    assert metrics["emergence_gap"] == pytest.approx(gap)


def test_a_run_read_with_other_preprocessing_is_refused(tmp_path, pen_run):
    cfg = pen_config(tmp_path, "optim.max_steps=1", "data.preprocess={length: 48}")
    with pytest.raises(ValueError, match="trained with other preprocessing"):
        ceiling(cfg, checkpoint=str(pen_run))


def test_the_script_ends_with_one_json_line(tmp_path):
    args = [f"{a}" for a in tiny_overrides(tmp_path, *PEN, "optim.max_steps=2")]
    cmd = ["eval/ceiling.py", "--config", "configs/pen.yaml", *args]
    proc = run_script(cmd, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) >= {"supervised_top1", "supervised_top5", "train_seconds", "run_dir"}
    bad = run_script([*cmd, "--checkpoint", str(tmp_path / "nope")], cwd=REPO)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: --checkpoint: run not found: {tmp_path / 'nope'}"
    ]
