"""One space: audio and pen trained against the anchor in ONE run (train/bind.py), the bound
folder it writes, emergent audio<->pen retrieval, 2 processes = 1 at twice the batch, kill -9
then --resume, and the bad inputs refused in one line before training."""

import importlib.util
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FSDD,
    REPO,
    fork_python,
    free_port,
    killed_after_checkpoint,
    run_python,
    small_avmnist,
)
from PIL import Image
from safetensors.torch import load_file
from test_pen import TES, raw_lines

from imagebind_lite.bind import bind, schedule
from imagebind_lite.bound import BoundModel
from imagebind_lite.config import BindConfig, load_config
from imagebind_lite.data.avmnist import DIGIT_NAMES, DIGIT_TEMPLATES, load_digit_images
from imagebind_lite.evaluation.zero_shot import class_text_embeddings
from imagebind_lite.modalities.pen import load as load_pen
from imagebind_lite.train import latest_checkpoint, train

SMALL = "{depth: 1, width: 48, heads: 2, drop_path: 0.0}"
KEYS = [
    "zero_shot_top1.audio",
    "zero_shot_top1.pen",
    "emergent_top1.audio->pen",
    "emergent_top1.pen->audio",
    "emergent_map.audio->pen",
    "emergent_map.pen->audio",
    "train_seconds",
    "samples_per_second.audio",
    "samples_per_second.pen",
    "final_loss.audio",
    "final_loss.pen",
]

KILLED_AFTER_CHECKPOINT = killed_after_checkpoint("bind_main(sys.argv[1:])")


def tiny(out, *extra, steps=40, batch=64):
    """configs/bind.yaml made short: small encoders, equal weights, round-robin."""
    return [
        f"output_dir={out}",
        "tracker=null",
        f"max_steps={steps}",
        "warmup_steps=2",
        "sampling=round_robin",
        "checkpoint_every=1000",
        "modalities.audio.weight=1",
        "modalities.pen.weight=1",
        f"modalities.audio.encoder.overrides={SMALL}",
        f"modalities.pen.encoder.overrides={SMALL}",
        f"modalities.audio.data.batch_size={batch}",
        f"modalities.pen.data.batch_size={batch}",
        *extra,
    ]


run = fork_python  # train/bind.py and the killed run: forked warm (conftest.run_script)


@pytest.fixture(scope="module")
def small_fsdd(tmp_path_factory):
    """Overrides for FSDD made small: 3 speakers x 10 digits x 4 takes, theo held out (two
    batches of 32 per epoch), for the tests that compare runs with each other, not scores."""
    root = small_avmnist(tmp_path_factory.mktemp("fsdd"), takes=4)
    return [
        f"modalities.audio.data.root={root}",
        "modalities.audio.data.options.test_speakers=[theo]",
    ]


def launch(*args, processes=1):
    """``accelerate launch`` itself (``python -m``), one process or several: a real one."""
    multi = ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(free_port())]
    multi = multi if processes > 1 else []
    head = ["-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes)]
    head += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return run_python([*head, *args])


@pytest.fixture(scope="module")
def bind_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bind")
    # README's run, with tiny overrides appended. Audio starts slower than pen: three audio
    # steps (of 32, at a gentler learning rate) for each pen step.
    audio = [
        "modalities.audio.encoder.overrides={depth: 1, drop_path: 0.0}",
        "modalities.audio.weight=3",
        "modalities.audio.data.batch_size=32",
        "modalities.audio.optim.lr=0.001",
        "warmup_steps=10",
    ]
    # Forked warm: test_documented_commands runs `accelerate launch train/bind.py` itself.
    proc = run(["train/bind.py", *tiny(out, *audio, steps=80)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "bind-audio-pen", proc.stdout


def test_schedule_is_a_function_of_seed_and_step():
    a = schedule([3, 1], 400, seed=0, sampling="random")
    assert a == schedule([3, 1], 400, seed=0, sampling="random")
    assert a != schedule([3, 1], 400, seed=1, sampling="random")
    assert 0.68 < a.count(0) / 400 < 0.82  # weighted 3:1
    assert schedule([2, 1], 6, seed=0, sampling="round_robin") == [0, 1, 0, 0, 1, 0]


def test_bind_run_trains_both_and_writes_a_bound_folder(bind_run):
    run_dir, stdout = bind_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics)
    assert metrics["steps"] == 80 and (metrics["steps.audio"], metrics["steps.pen"]) == (60, 20)
    assert "emergent (held out on both sides) audio->pen: top1" in stdout
    losses = json.loads((run_dir / "losses.json").read_text())
    for m in ("audio", "pen"):
        first, last = np.mean(losses[m][:3]), np.mean(losses[m][-3:])
        assert last < first - 0.5, (m, first, last)  # the loss falls
        assert metrics[f"samples_per_second.{m}"] > 0
    # Zero-shot on unseen writers well above chance (0.10) after 20 pen steps. Audio on unseen
    # speakers is slow to start (about 0.14 after 60 small steps; 0.7 takes the full run): here
    # it must only have left the collapsed state, whose loss is log(batch) = 3.47.
    assert metrics["zero_shot_top1.pen"] > 0.4
    assert metrics["zero_shot_top1.audio"] >= 0.1 and np.mean(losses["audio"][-5:]) < 3.45
    assert metrics["num_eval.audio"] == 1000 and metrics["num_eval.pen"] == 3498
    assert json.loads((run_dir / "model" / "bound.json").read_text())["encoders"] == {
        "audio": "audio",
        "pen": "pen",
    }
    assert latest_checkpoint(run_dir).name == "step_00000080"


def _pen_file(folder: Path) -> Path:
    """The first digit of pendigits-orig.tes (an unseen writer's 8) as a UNIPEN file."""
    lines = raw_lines(TES)
    starts = [i for i, line in enumerate(lines) if line.startswith(".SEGMENT")]
    path = folder / "eight.txt"
    path.write_text("".join(lines[: starts[1]]))
    return path


def test_bound_model_embeds_every_modality_from_files(bind_run, tmp_path):
    run_dir, _ = bind_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = BoundModel.from_pretrained(run_dir / "model")
    text = class_text_embeddings(model.embed_text, DIGIT_NAMES, DIGIT_TEMPLATES)
    # Every clip of the held-out speakers, read from its file: the run's zero-shot top-1.
    clips = sorted(p for p in FSDD.glob("*.flac") if p.stem.split("_")[1] in ("george", "theo"))
    labels = torch.tensor([int(p.stem.split("_")[0]) for p in clips])
    audio = model.embed_audio(clips)
    top1 = float(((audio @ text.T).argmax(1) == labels).float().mean())
    assert len(clips) == 1000 and abs(top1 - metrics["zero_shot_top1.audio"]) < 1e-6
    pens = [_pen_file(tmp_path)]
    pen = model.embed_pen(pens)
    config = model.configs["pen"]
    with torch.no_grad():
        x = torch.stack([load_pen(p, **config["preprocess"]) for p in pens])
        direct = torch.nn.functional.normalize(model.encoders["pen"](x), dim=-1)
    torch.testing.assert_close(pen, direct)
    images, image_labels = load_digit_images()
    png = tmp_path / "digit.png"
    Image.fromarray((images[0].numpy() * 255 / images[0].max().item()).astype("uint8")).save(png)
    image = model.embed_image([png])
    for emb in (text, audio, pen, image):
        assert emb.shape[1] == 64 and torch.allclose(emb.norm(dim=1), torch.ones(len(emb)))


def test_retrieval_script_scores_the_pair_of_a_bound_model(bind_run, tmp_path):
    run_dir, _ = bind_run
    spec = importlib.util.spec_from_file_location("eval_retrieval", REPO / "eval/retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pair.json"
    argv = ["--bound", str(run_dir / "model"), "--pair", "audio", "pen", "--out", str(out)]
    results = module.main([*argv, "--batch-size", "256"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key, value in results.items():
        assert abs(value - metrics[key]) < 1e-6, key
    assert json.loads(out.read_text())["pair"] == ["audio", "pen"]


def test_two_processes_give_the_losses_of_one_at_twice_the_batch(tmp_path, small_fsdd):
    # The patch-stem audio encoder: the conv stem's BatchNorm normalises over each process's
    # own rows (DDP without SyncBatchNorm, which has no CPU kernel), so it is not comparable.
    args = ["train/bind.py", "anchor.pretrained=null", "checkpoint_every=0", *small_fsdd]
    args.append("modalities.audio.encoder.size=tiny")
    one = run([*args, *tiny(tmp_path / "one", steps=4, batch=32)])  # the reference: forked
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(*args, *tiny(tmp_path / "two", steps=4, batch=16), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one/bind-audio-pen/losses.json").read_text())
    b = json.loads((tmp_path / "two/bind-audio-pen/losses.json").read_text())
    assert len(a["audio"]) == len(a["pen"]) == 2
    for m in ("audio", "pen"):
        np.testing.assert_allclose(a[m], b[m], rtol=0, atol=1e-5, err_msg=m)
    second = json.loads((tmp_path / "two/bind-audio-pen/metrics.json").read_text())
    assert second["world_size"] == 2 and second["global_batch.audio"] == 32


def test_kill_9_then_resume_reaches_the_same_weights(tmp_path, small_fsdd):
    def overrides(out):
        # Drop path on: its masks must be drawn alike after the resume.
        deep = "{depth: 2, width: 32, heads: 2, drop_path: 0.2}"
        return tiny(
            out,
            "anchor.pretrained=null",
            "checkpoint_every=3",
            "sampling=random",
            f"modalities.audio.encoder.overrides={deep}",
            *small_fsdd,
            steps=8,
            batch=32,
        )

    reference = run(["train/bind.py", *overrides(tmp_path / "a")])
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run(["-c", KILLED_AFTER_CHECKPOINT, *overrides(tmp_path / "b")], KILL_AT="6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "b" / "bind-audio-pen"
    assert not (run_dir / "metrics.json").exists()
    resumed = run(["train/bind.py", "--resume", *overrides(tmp_path / "b")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 6" in resumed.stdout + resumed.stderr
    for m in ("audio", "pen"):
        a = load_file(str(tmp_path / f"a/bind-audio-pen/model/{m}/model.safetensors"))
        b = load_file(str(run_dir / f"model/{m}/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m
    # The resumed run's record covers the steps before the kill too, and per-modality counts.
    before = json.loads((tmp_path / "a/bind-audio-pen/losses.json").read_text())
    after = json.loads((run_dir / "losses.json").read_text())
    assert after == before and sum(map(len, after.values())) == 8
    a, b = (
        json.loads((p / "metrics.json").read_text())
        for p in (tmp_path / "a/bind-audio-pen", run_dir)
    )
    assert [a[f"steps.{m}"] for m in after] == [b[f"steps.{m}"] for m in after]


@pytest.mark.parametrize(
    "override, message",
    [
        ("modalities.smell={}", "modalities.smell: unknown modality 'smell'"),
        ("modalities.imu={}", "modalities.imu: no dataset: 'avmnist' pairs images with audio"),
        ("modalities.pen.loss.kind=clip", "modalities.pen: loss.kind: expected infonce or siglip"),
    ],
)
def test_bad_bind_configs_fail_in_one_line_before_training(tmp_path, override, message):
    proc = run(["train/bind.py", *tiny(tmp_path), override])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_combining_runs_with_different_anchors_is_refused(tmp_path):
    common = [f"output_dir={tmp_path}", "tracker=null", "optim.max_steps=1"]
    small = "encoder.overrides={depth: 1, width: 32, heads: 2}"
    pen = load_config(REPO / "configs/pen.yaml", [*common, small])
    depth = load_config(
        REPO / "configs/depth.yaml",
        [
            *common,
            small,
            "anchor.pretrained=null",
            "data.options={train_size: 64, test_size: 16}",
            "data.batch_size=32",
        ],
    )
    runs = [train(pen, quiet=True)["run_dir"], train(depth, quiet=True)["run_dir"]]
    out = tmp_path / "bound"
    proc = run(["train/bind.py", "--from", *runs, "--out", str(out)])
    assert proc.returncode != 0 and not out.exists()
    # The one line, after open_clip's warning that the random anchor has no weights.
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("WARNING")]
    assert len(lines) == 1 and "trained against another anchor" in lines[0], proc.stderr
    # Runs that share the anchor combine into one bound folder.
    audio = load_config(REPO / "configs/audio.yaml", [*common, small, "data.batch_size=32"])
    runs[1] = train(audio, quiet=True)["run_dir"]
    proc = run(["train/bind.py", "--from", *runs, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = BoundModel.from_pretrained(out)
    assert set(model.encoders) == {"pen", "audio"}
    assert model.configs["audio"]["data"]["dataset"] == "avmnist"


def test_siglip_and_patch_dropout_per_modality(tmp_path):
    # Depth with SigLIP (its own scale and bias, in the bound module) and patch dropout, thermal
    # with InfoNCE, in one run of 2 steps each (the small synthetic scenes, for speed).
    small = {"depth": 1, "width": 32, "heads": 2, "drop_path": 0.0}
    data = {"batch_size": 32, "preprocess": {"image_size": 32}}
    data["options"] = {"train_size": 128, "test_size": 32}
    thermal = {"weight": 1, "encoder": {"overrides": small}, "data": data}
    depth = {**thermal, "loss": {"kind": "siglip"}}
    depth["encoder"] = {"overrides": small, "patch_dropout": 0.5}
    extra = {"modalities": {"depth": depth, "thermal": thermal}, "emergent": []}
    overrides = [f"output_dir={tmp_path}", "tracker=null", "max_steps=4", "warmup_steps=2"]
    overrides += ["sampling=round_robin", "checkpoint_every=0", "anchor.pretrained=null"]
    metrics = bind(load_config(None, overrides, cls=BindConfig, extra=extra), quiet=True)
    assert metrics["loss_kind.depth"] == "siglip" and metrics["loss_kind.thermal"] == "infonce"
    assert "siglip_scale.thermal" not in metrics and "siglip_bias.thermal" not in metrics
    # Trained by the run's optimizer: both moved from the paper's initial values.
    assert metrics["siglip_scale.depth"] != pytest.approx(10.0, abs=1e-4)
    assert metrics["siglip_bias.depth"] != pytest.approx(-10.0, abs=1e-4)
    saved = json.loads((Path(metrics["run_dir"]) / "metrics.json").read_text())
    assert saved["siglip_scale.depth"] == metrics["siglip_scale.depth"]
    assert len(json.loads((Path(metrics["run_dir"]) / "losses.json").read_text())["depth"]) == 2


def test_the_digit_images_both_datasets_pair_with_are_embedded_once_per_anchor():
    from imagebind_lite.data.avmnist import embed_images

    class CountingAnchor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(12, 4)
            self.calls = 0

        def encode_image(self, pixels):
            self.calls += 1
            return self.model(pixels.flatten(1))

    pixels = torch.rand(10, 3, 2, 2)
    anchor, other = CountingAnchor(), CountingAnchor()
    first = embed_images(anchor, pixels, batch_size=4)
    assert anchor.calls == 3  # 4 + 4 + 2
    again = embed_images(anchor, pixels.clone(), batch_size=4)  # same pixels, another tensor
    assert anchor.calls == 3 and torch.equal(first, again)
    torch.testing.assert_close(first, anchor.model(pixels.flatten(1)).detach())
    embed_images(anchor, pixels[:5], batch_size=4)  # other pixels: computed
    embed_images(other, pixels, batch_size=4)  # another anchor: computed
    assert anchor.calls == 5 and other.calls == 3
