"""The evaluation scripts end to end on a tiny trained run (3 steps on 60 real FSDD clips)."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, run_script
from PIL import Image
from test_protocols import make_clotho, make_esc50

from imagebind_lite.anchor import ASSETS, Anchor
from imagebind_lite.checkpoint import save_model
from imagebind_lite.config import AnchorConfig, config_to_dict, load_config
from imagebind_lite.evaluation.space import load_embeddings
from imagebind_lite.modalities import build_encoder
from imagebind_lite.train import train


def script(name):
    """Import eval/NAME.py as a module so that its main(argv) runs in this process."""
    path = REPO / "eval" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eval_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A 3-step audio run on 2 clips per digit of three speakers (theo held out), with
    TensorBoard logs for the training curve."""
    base = tmp_path_factory.mktemp("evalrun")
    root = base / "avmnist"
    (root / "audio").mkdir(parents=True)
    for speaker in ("jackson", "nicolas", "theo"):
        for digit in range(10):
            for take in range(2):
                name = f"{digit}_{speaker}_{take}.flac"
                shutil.copy(ASSETS / "avmnist" / "audio" / name, root / "audio" / name)
    shutil.copy(ASSETS / "avmnist" / "digits.csv.gz", root / "digits.csv.gz")
    cfg = load_config(
        REPO / "configs" / "audio.yaml",
        [
            f"output_dir={base / 'runs'}",
            f"data.root={root}",
            "data.options={test_speakers: [theo]}",
            "optim.max_steps=3",
            "log_every=1",
            "data.batch_size=16",
            "encoder.overrides={depth: 1, width: 32, heads: 2}",
        ],
    )
    metrics = train(cfg, quiet=True)
    return metrics["run_dir"]


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory, one_thread):
    """An untrained depth encoder saved as a model folder against the same anchor."""
    anchor = Anchor(AnchorConfig())
    pre = {"image_size": 32, "mean": 20.0, "std": 10.0}
    encoder = build_encoder(
        "depth", anchor.embed_dim, "tiny", {"depth": 1, "width": 32, "heads": 2}, pre
    )
    folder = tmp_path_factory.mktemp("depthmodel") / "model"
    save_model(
        encoder,
        {
            "modality": "depth",
            "modality_file": None,
            "size": "tiny",
            "overrides": {"depth": 1, "width": 32, "heads": 2},
            "preprocess": pre,
            "temperature": 0.2,
            "embed_dim": anchor.embed_dim,
            "anchor": {**anchor.identity(), "config": config_to_dict(AnchorConfig())},
        },
        folder,
    )
    return folder


def test_zero_shot_default_and_esc50(run, tmp_path):
    zero_shot = script("zero_shot")
    result = zero_shot.main(["--checkpoint", run, "--no-progress"])
    saved = json.loads(open(f"{run}/eval/zero_shot_run.json").read())
    assert saved["num_evaluated"] == 20 and saved["headline"]["top1"] == result["metrics"]["top1"]
    # The training loop's own evaluation of the same split agrees.
    trained = json.loads(open(f"{run}/metrics.json").read())
    assert result["metrics"]["top1"] == pytest.approx(trained["zero_shot_top1"])
    root = make_esc50(tmp_path / "ESC-50-master")
    out = tmp_path / "esc.json"
    cache = tmp_path / "esc.safetensors"
    zero_shot.main(
        [
            "--checkpoint",
            run,
            "--dataset",
            "esc50",
            "--root",
            str(root),
            "--out",
            str(out),
            "--embeddings-cache",
            str(cache),
            "--no-progress",
        ]
    )
    esc = json.loads(out.read_text())
    assert set(esc["metrics"]["per_group"]) == {"1", "2", "3", "4", "5"}
    assert esc["references"][0] == {
        "model": "ImageBind",
        "metric": "top1",
        "value": 66.9,
        "note": "",
    }
    again = zero_shot.main(
        [
            "--checkpoint",
            run,
            "--dataset",
            "esc50",
            "--root",
            str(root),
            "--out",
            str(out),
            "--embeddings-cache",
            str(cache),
            "--no-progress",
        ]
    )
    assert again["embeddings_cache_used"]


def test_retrieval_run_split_captions_and_emergent_pairs(run, depth_model, tmp_path):
    retrieval = script("retrieval")
    results = retrieval.main(["--checkpoint", run, "--no-progress"])
    assert {"audio->vision", "vision->audio", "audio->text"} <= set(results)
    assert results["audio->vision"]["positives"] == "class"  # digits pair by class
    assert json.loads(open(f"{run}/eval/retrieval_run.json").read())["retrieval"]
    clotho = retrieval.main(
        [
            "--checkpoint",
            run,
            "--dataset",
            "clotho",
            "--root",
            str(make_clotho(tmp_path / "clotho")),
            "--directions",
            "text:audio,audio:text",
            "--no-progress",
        ]
    )
    assert clotho["text->audio"]["queries"] == 15 and clotho["audio->text"]["gallery"] == 15
    assert clotho["text->audio"]["positives"] == "instance"
    # Emergent audio<->depth: two encoders that never saw each other, joined on a manifest.
    data = tmp_path / "paired"
    from test_protocols import INTRINSICS, _clip, _depth_png

    rows = ["id,audio,depth,intrinsics,layout"]  # layout mm: plain millimetre PNGs
    for i in range(4):
        _clip(data / f"a{i}.flac", i)
        _depth_png(data / f"d{i}.png", i, rotate=False)
        rows.append(f"p{i},a{i}.flac,d{i}.png,K.txt,mm")
    (data / "K.txt").write_text(INTRINSICS)
    (data / "pairs.csv").write_text("\n".join(rows) + "\n")
    argv = [
        "--checkpoint",
        run,
        "--checkpoint",
        str(depth_model),
        "--manifest",
        str(data / "pairs.csv"),
        "--directions",
        "audio:depth,depth:audio",
        "--out",
        str(tmp_path / "e.json"),
        "--embeddings-cache",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    emergent = retrieval.main(argv)
    assert emergent["audio->depth"]["positives"] == "instance"
    assert emergent["audio->depth"]["queries"] == 4 and emergent["audio->depth"]["R@10"] == 1.0
    assert (tmp_path / "cache.depth.safetensors").is_file()
    assert retrieval.main(argv) == emergent  # the second time from the cache


def test_report_writes_metrics_markdown_and_plots(run, tmp_path):
    report = script("report")
    out = tmp_path / "report"
    metrics = report.main(
        [
            "--checkpoint",
            run,
            "--out",
            str(out),
            "--linear-probe",
            "--shots",
            "1,all",
            "--no-progress",
        ]
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["zero_shot"]["top1"] == metrics["zero_shot"]["top1"]
    expected = {
        "confusion",
        "per_class",
        "similarity_text",
        "similarity_vision",
        "projection",
        "training_curves",
    }
    assert set(saved["plots"]) == expected
    for name in saved["plots"].values():
        with Image.open(out / name) as image:  # every plot is a real PNG
            image.verify()
            assert image.format == "PNG"
    md = (out / "report.md").read_text()
    for heading in (
        "Zero-shot",
        "Cross-modal retrieval",
        "Limitation probes",
        "linear probe",
        "Training",
    ):
        assert heading in md
    assert "| not Y vs not X | negation | audio |" in md
    assert saved["training"]["steps"] == 3
    assert set(saved["linear_probe"]) == {"1", "all"}
    gap = saved["geometry"]["modality_gap"]
    assert set(gap) == {"audio-vision", "audio-text", "vision-text"}
    examples = saved["retrieval_examples"]["audio->text"]
    assert len(examples[0]["top"]) == 5


def test_probes_and_linear_probe_scripts(run, tmp_path):
    results = script("probes").main(["--checkpoint", run, "--scenes", "20", "--no-progress"])
    families = {r.family for r in results}
    assert families == {"control", "negation", "counting", "spatial", "abstract", "rare"}
    saved = json.loads(open(f"{run}/eval/probes.json").read())
    assert all(0 <= p["accuracy"] <= 1 for p in saved["probes"])
    lp = script("linear_probe").main(
        [
            "--checkpoint",
            run,
            "--shots",
            "1,all",
            "--seeds",
            "2",
            "--grid",
            "0.001,0.1",
            "--no-progress",
        ]
    )
    assert set(lp) == {"1", "all"} and len(lp["1"]["runs"]) == 2
    assert lp["all"]["train_items"] == 30  # 40 training clips less one per class to validate
    esc = make_esc50(tmp_path / "esc", per_class=2)
    folded = script("linear_probe").main(
        [
            "--checkpoint",
            run,
            "--dataset",
            "esc50",
            "--root",
            str(esc),
            "--shots",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "lp.json"),
            "--no-progress",
        ]
    )
    assert set(folded["per_fold"]) == {"1", "2", "3", "4", "5"}
    assert folded["mean"]["1"]["top1"] == pytest.approx(
        sum(f["1"]["top1"] for f in folded["per_fold"].values()) / 5
    )


def test_space_embed_search_arithmetic_compare(run, tmp_path, capsys):
    space_cli = script("space")
    images = tmp_path / "images"
    images.mkdir()
    from imagebind_lite.data.avmnist import DIGIT_NAMES, load_digit_images

    digits, labels = load_digit_images()
    for i in range(6):
        pixels = (digits[i].numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(
            images / f"{int(labels[i])}_{i}.png"
        )
    collection = tmp_path / "images.safetensors"
    space_cli.main(
        ["--checkpoint", run, "embed", "--out", str(collection), str(images), "--no-progress"]
    )
    emb, items, info = load_embeddings(collection)
    assert emb.shape[0] == 6 and info["modality"] == "vision" and items[0].endswith(".png")
    query = f"text:the digit {DIGIT_NAMES[int(labels[3])]}."
    hits = space_cli.main(
        [
            "--checkpoint",
            run,
            "search",
            "--collection",
            str(collection),
            "--query",
            query,
            "-k",
            "3",
        ]
    )
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]
    clip = ASSETS / "avmnist" / "audio" / "3_theo_0.flac"
    mixed = space_cli.main(
        [
            "--checkpoint",
            run,
            "search",
            "--collection",
            str(collection),
            "--query",
            items[0],
            "--plus",
            str(clip),
            "-k",
            "6",
        ]
    )
    assert {h[0] for h in mixed} == set(items)
    value = space_cli.main(["--checkpoint", run, "compare", items[0], items[0]])
    assert value == pytest.approx(1.0, abs=1e-5)
    clips = tmp_path / "clips.safetensors"
    space_cli.main(["--checkpoint", run, "embed", "--out", str(clips), str(clip), "--no-progress"])
    assert load_embeddings(clips)[2]["modality"] == "audio"
    # README's form: the options after the command give the same collection and hits.
    after = tmp_path / "after.safetensors"
    space_cli.main(["embed", "--checkpoint", run, str(clip), "--out", str(after), "--no-progress"])
    assert torch.equal(load_embeddings(after)[0], load_embeddings(clips)[0])
    hits_after = space_cli.main(
        [
            "search",
            "--checkpoint",
            run,
            "--query",
            query,
            "--collection",
            str(collection),
            "-k",
            "3",
        ]
    )
    assert hits_after == hits
    with pytest.raises(SystemExit, match="no depth encoder"):
        space_cli.main(["--checkpoint", run, "compare", f"depth:{items[0]}", items[0]])
    # The script runs as a script too.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["eval/space.py", "--checkpoint", run, "compare", str(clip), "text:the digit three."]
    proc = run_script(command, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("cosine(audio, text) = ")


@pytest.fixture(scope="module")
def scene_runs(tmp_path_factory, one_thread):
    """3-step depth and thermal runs on the same synthetic test scenes (paired by id)."""
    base = tmp_path_factory.mktemp("sceneruns")
    runs = {}
    for modality in ("depth", "thermal"):
        cfg = load_config(
            REPO / "configs" / f"{modality}.yaml",
            [
                f"output_dir={base}",
                "tracker=null",
                "optim.max_steps=3",
                "data.batch_size=32",
                "data.options={train_size: 64, test_size: 48}",
                "encoder.overrides={depth: 1, width: 32, heads: 2}",
            ],
        )
        runs[modality] = train(cfg, quiet=True)["run_dir"]
    return runs


def test_emergent_depth_thermal_retrieval_and_a_depth_report(scene_runs, tmp_path):
    results = script("retrieval").main(
        [
            "--checkpoint",
            scene_runs["depth"],
            "--checkpoint",
            scene_runs["thermal"],
            "--no-progress",
        ]
    )
    # Neither encoder saw the other modality: depth<->thermal pairs only through the anchor.
    assert results["depth->thermal"]["positives"] == "instance"
    assert results["depth->thermal"]["queries"] == results["depth->thermal"]["gallery"] == 48
    assert results["depth->vision"]["positives"] == "instance"
    metrics = script("report").main(
        ["--checkpoint", scene_runs["depth"], "--out", str(tmp_path / "r"), "--no-progress"]
    )
    assert "depth-vision(paired)" in metrics["geometry"]["alignment"]
    probes = {(p["probe"], p["modality"]) for p in metrics["probes"]}
    assert ("left vs right", "depth") in probes and ("one vs two shapes", "vision") in probes
    assert "training_curves" not in metrics["plots"]  # tracker=null: no curve, said so
    assert "No TensorBoard" in (tmp_path / "r" / "report.md").read_text()
