"""End to end: a tiny run, two real ranks through accelerate launch, and kill -9 + --resume
(the tiny depth run, and the default audio run with its drop path, stopped at a fixed step)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    ENV,
    FSDD,
    REPO,
    fork_python,
    free_port,
    killed_after_checkpoint,
    run_script,
    start_script,
    tiny_overrides,
)
from safetensors.torch import load_file

from imagebind_lite import BoundModel
from imagebind_lite.anchor import Anchor
from imagebind_lite.checkpoint import load_run
from imagebind_lite.config import AnchorConfig, load_config
from imagebind_lite.data import avmnist
from imagebind_lite.evaluation.uncertainty import bootstrap_ci
from imagebind_lite.modalities import build_encoder
from imagebind_lite.train import (
    AlignmentModule,
    AlignmentObjective,
    StepContext,
    adamw,
    latest_checkpoint,
    param_groups,
    train,
    train_step,
)

KILLED_AFTER_CHECKPOINT = killed_after_checkpoint('train_main("audio.yaml", sys.argv[1:])')


def depth_overrides(tmp_path, *extra):
    return tiny_overrides(
        tmp_path,
        "data.preprocess={image_size: 32}",
        "data.options={train_size: 256, test_size: 96}",
        "checkpoint_every=2",
        *extra,
    )


def test_the_loop_imports_no_evaluation_cache_or_interop():
    # Layering: core <- data <- training loop <- evaluation / interop / cache <- tasks.
    import ast

    for path in (REPO / "imagebind_lite" / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # also catches "from .. import cache"
                names = [f"{node.module or ''}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                assert not {"evaluation", "cache", "interop"} & set(parts), (path, name)


def test_tiny_audio_run_writes_the_run_folder(tmp_path):
    cfg = load_config(REPO / "configs/audio.yaml", tiny_overrides(tmp_path, "optim.max_steps=3"))
    metrics = train(cfg, quiet=True)
    run = tmp_path / "audio-avmnist"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("zero_shot_top1", "zero_shot_top5", "train_seconds", "samples_per_second"):
        assert key in saved
    assert saved["steps"] == 3 and saved["num_eval"] == 1000  # speakers george + theo held out
    # The run's zero-shot figure, recomputed by hand from the saved model on the held-out
    # speakers' files: nearest prompt-ensembled class text, as a user of the model would.
    model = BoundModel.from_pretrained(run / "model")
    clips = sorted(p for p in FSDD.glob("*.flac") if p.name.split("_")[1] in ("george", "theo"))
    labels = torch.tensor([int(p.name.split("_")[0]) for p in clips])
    prompts = [t.format(n) for n in avmnist.DIGIT_NAMES for t in avmnist.DIGIT_TEMPLATES]
    text = model.embed_text(prompts).view(10, len(avmnist.DIGIT_TEMPLATES), -1).mean(1)
    scores = model.embed_audio(clips) @ torch.nn.functional.normalize(text, dim=-1).T
    assert len(clips) == 1000
    hits = (scores.argmax(1) == labels).float()
    assert saved["zero_shot_top1"] == hits.mean().item()
    # Its 95% interval: the item bootstrap of those hits, near the binomial normal approximation.
    lo, hi = saved["zero_shot_top1_ci"]
    assert [lo, hi] == bootstrap_ci(hits) and lo <= saved["zero_shot_top1"] <= hi
    p = saved["zero_shot_top1"]
    assert abs((hi - lo) / (2 * 1.96 * (p * (1 - p) / 1000) ** 0.5) - 1) < 0.2
    top5 = saved["zero_shot_top5_ci"]
    assert top5[0] <= saved["zero_shot_top5"] <= top5[1]
    assert saved["ci_method"] == "95% percentile bootstrap over items, 2000 resamples, seed 0"
    assert saved["data_train_clips"] + saved["data_test_clips"] == 3000
    assert (run / "config.yaml").is_file() and latest_checkpoint(run).name == "step_00000003"
    assert metrics["run_dir"] == str(run)
    # The saved model folder rebuilds without pickle and gives the same embeddings.
    encoder, anchor, config = load_run(run)
    assert config["modality"] == "audio" and anchor.embed_dim == 64
    assert set(load_file(str(run / "model/model.safetensors"))) == set(encoder.state_dict())
    # A second run with the same name never overwrites the first.
    train(cfg, quiet=True)
    assert (tmp_path / "audio-avmnist-1" / "metrics.json").is_file()


def test_eval_every_epochs_evaluates_at_those_epochs_without_changing_training(tmp_path, capsys):
    from imagebind_lite.evaluation.report import read_training_curves

    runs = {}
    for every in (0, 2):
        overrides = depth_overrides(
            tmp_path, "optim.epochs=3", "tracker=tensorboard", f"eval.every_epochs={every}"
        )
        cfg = load_config(REPO / "configs/depth.yaml", [*overrides, f"run_name=every{every}"])
        runs[every] = Path(train(cfg, quiet=True)["run_dir"])
        printed = [line for line in capsys.readouterr().out.splitlines() if "eval epoch" in line]
        # 256 scenes / 32 = 8 steps per epoch; the last step is the final evaluation's.
        logged = read_training_curves(runs[every], ("eval/zero_shot_top1",))
        if every == 0:
            assert printed == [] and logged["eval/zero_shot_top1"][0] == [24]
        else:
            assert len(printed) == 1 and printed[0].startswith("eval epoch 2 step 16: ")
            assert "zero_shot_top1=" in printed[0]
            assert logged["eval/zero_shot_top1"][0] == [16, 24]
    # Evaluating in between draws nothing from the training's randomness.
    a, b = (load_file(str(runs[e] / "model/model.safetensors")) for e in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_leaves_the_anchor_untouched_and_trains_the_encoder():
    accelerator = Accelerator(cpu=True)
    anchor = Anchor(AnchorConfig(pretrained=None))
    anchor_before = {k: v.clone() for k, v in anchor.state_dict().items()}
    encoder = build_encoder(
        "depth", anchor.embed_dim, "tiny", {"depth": 1, "width": 32, "heads": 2}, {"image_size": 32}
    )
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = AlignmentModule(encoder)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"vision": torch.randn(8, 3, 32, 32), "depth": torch.randn(8, 1, 32, 32)}
    objective = AlignmentObjective(anchor, "depth", temperature=0.2, accum=1)
    loss = train_step(StepContext(accelerator, model, optimizer, objective, grad_clip=1.0), batch)
    assert loss > 0
    assert all(torch.equal(anchor_before[k], v) for k, v in anchor.state_dict().items())
    assert all(p.grad is None for p in anchor.parameters())
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(encoder_before[k], v)]
    assert "head.weight" in changed and "stem.proj.weight" in changed
    # The optimizer holds exactly the encoder's parameters, none of the anchor's.
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in encoder.parameters()}


def test_adamw_is_fused_where_the_run_trains_on_cuda():
    def groups():
        return param_groups(torch.nn.Linear(4, 4), 0.05)

    assert not adamw(groups(), 1e-3, (0.9, 0.95), torch.device("cpu")).defaults["fused"]
    # Chosen by the run's device; the kernel checks the parameters at the first step.
    assert adamw(groups(), 1e-3, (0.9, 0.95), torch.device("cuda", 0)).defaults["fused"]


@pytest.mark.gpu
def test_fused_adamw_on_cuda_takes_the_multi_tensor_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).cuda()
    models = [model, copy.deepcopy(model)]
    fused = adamw(param_groups(models[0], 0.05), 1e-2, (0.9, 0.95), torch.device("cuda"))
    multi = torch.optim.AdamW(param_groups(models[1], 0.05), lr=1e-2, betas=(0.9, 0.95))
    x = torch.randn(16, 64, device="cuda")
    for _ in range(3):
        for model, optimizer in zip(models, (fused, multi)):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _launch(args, tmp_path, **kw):
    port = ["--main_process_port", str(free_port())] if "--multi_gpu" in args else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *port, *args]
    kw.setdefault("env", ENV)
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def test_two_ranks_train_as_one_global_batch(tmp_path):
    args = [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "train/align_depth.py",
        # Patch dropout draws its masks per process, so only a deterministic encoder can match.
        *depth_overrides(tmp_path, "data.batch_size=16", "encoder.patch_dropout=0"),
    ]
    # Nothing pins the threads: the two ranks share this machine's CPUs between them.
    env = {k: v for k, v in ENV.items() if k != "IMAGEBIND_LITE_THREADS"}
    proc = _launch(args, tmp_path, env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    metrics = json.loads((tmp_path / "depth-synthetic_scenes/metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert "/ 2 processes on this machine" in metrics["threads_reason"]
    assert metrics["global_batch"] == 32
    assert metrics["steps"] == 256 // 32  # each rank saw half of every global batch
    # One process at the same global batch trains the same weights (the ranks' halves of each
    # batch are its batch; gradients average over ranks as over the batch).
    single = depth_overrides(tmp_path / "one", "data.batch_size=32", "encoder.patch_dropout=0")
    cfg = load_config(REPO / "configs/depth.yaml", single)
    one = train(cfg, quiet=True)
    assert (
        one["steps"] == metrics["steps"] and abs(one["final_loss"] - metrics["final_loss"]) < 1e-4
    )
    two = load_file(str(tmp_path / "depth-synthetic_scenes/model/model.safetensors"))
    ref = load_file(str(Path(one["run_dir"]) / "model/model.safetensors"))
    for key in ref:
        torch.testing.assert_close(two[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


def test_kill_9_then_resume_reaches_the_same_weights(tmp_path):
    common = ["train/align_depth.py"]
    # Two blocks with drop path: the second block's masks must be drawn alike after the resume.
    drop_path = "encoder.overrides={depth: 2, drop_path: 0.2}"
    base = depth_overrides(tmp_path / "a", "optim.epochs=3", drop_path)
    reference = run_script([*common, *base], cwd=REPO, env=ENV, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    interrupted = depth_overrides(tmp_path / "b", "optim.epochs=3", drop_path)
    proc = start_script([*common, *interrupted], cwd=REPO, env=ENV)  # killed from here
    run = tmp_path / "b" / "depth-synthetic_scenes"
    deadline = time.time() + 240
    while time.time() < deadline:
        ckpt = latest_checkpoint(run) if run.exists() else None
        if ckpt is not None and int(ckpt.name.split("_")[1]) >= 10:  # mid-epoch 2 of 3
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = run_script([*common, "--resume", *interrupted], cwd=REPO, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "a/depth-synthetic_scenes/model/model.safetensors"))
    b = load_file(str(run / "model/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_default_audio_run_with_drop_path_resumes_bit_for_bit(tmp_path):
    # configs/audio.yaml as shipped (augmentation, drop path 0.1, the shipped anchor), made short:
    # 7 steps per epoch, checkpoints at 3 and 6, killed after 6, resumed across the epoch end.
    def overrides(out):
        return [
            f"output_dir={out}",
            "tracker=null",
            "optim.max_steps=8",
            "checkpoint_every=3",
            "data.batch_size=256",
            "encoder.overrides={depth: 2}",  # drop path rises 0 -> 0.1: the second block drops
        ]

    run = fork_python

    reference = run(["train/align_audio.py", *overrides(tmp_path / "a")])
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run(["-c", KILLED_AFTER_CHECKPOINT, *overrides(tmp_path / "b")], KILL_AT="6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "b" / "audio-avmnist"
    assert latest_checkpoint(run_dir).name == "step_00000006"
    assert not (run_dir / "metrics.json").exists()
    resumed = run(["train/align_audio.py", "--resume", *overrides(tmp_path / "b")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 6" in resumed.stdout + resumed.stderr

    encoder, _, _ = load_run(run_dir)
    assert [round(b.drop_path.drop_prob, 6) for b in encoder.trunk.blocks[1:]] == [0.1]
    a = load_file(str(tmp_path / "a/audio-avmnist/model/model.safetensors"))
    b = load_file(str(run_dir / "model/model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    first = json.loads((tmp_path / "a/audio-avmnist/metrics.json").read_text())
    second = json.loads((run_dir / "metrics.json").read_text())
    assert first["steps"] == second["steps"] == 8
    assert first["final_loss"] == second["final_loss"]


@pytest.mark.parametrize("switch", ["loss.kind=siglip", "encoder.patch_dropout=0.5"])
def test_siglip_and_patch_dropout_runs_resume_bit_for_bit(tmp_path, switch):
    # 4 steps, checkpoints at 2 and 4; then steps 3-4 again from the checkpoint of step 2. Both
    # must come back: SigLIP's scale and bias (in the checkpointed module) and the tokens that
    # patch dropout drew (torch's RNG, reseeded every step).
    overrides = depth_overrides(tmp_path, switch, "optim.max_steps=4")
    cfg = load_config(REPO / "configs/depth.yaml", overrides)
    first = train(cfg, quiet=True)
    run = Path(first["run_dir"])
    weights = load_file(str(run / "model/model.safetensors"))
    assert first["steps"] == 4 and first["final_loss"] == first["final_loss"]  # not NaN
    if "siglip" in switch:
        assert first["loss_kind"] == "siglip"
        assert (first["siglip_scale"], first["siglip_bias"]) != pytest.approx((10.0, -10.0))
    again = train(cfg, resume=str(run / "checkpoints/step_00000002"), quiet=True)
    assert again["steps"] == 4 and again["final_loss"] == first["final_loss"]
    for key in ("siglip_scale", "siglip_bias"):
        assert again.get(key) == first.get(key)
    resumed = load_file(str(run / "model/model.safetensors"))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
