# ruff: noqa: E501  (table keys are the documented lines, verbatim)
"""Every `python ...` / `accelerate launch ...` line printed in README.md and docs/*.md runs here.

`COMMANDS` maps each documented command (whitespace normalised) to how it runs: which sandbox
names (RUN, SUNRGBD, my.yaml, clips/, ...) are links to which fixture, the tiny overrides
appended, and text rewrites where the machine cannot do what the line asks (8 GPUs, bf16).
A command added to, edited in or removed from the docs fails `test_table_covers_the_docs`
until its entry here changes with it. Adding one is one line:

    "python eval/new.py --checkpoint RUN": Run({"RUN": "audio_run"}, "--no-progress"),
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TEST_DATA, free_port, run_script, small_avmnist
from PIL import Image

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_RE = re.compile(r"^\s*(python|accelerate launch) ")
LINKED = ("train", "eval", "bench", "configs", "examples")  # what every sandbox sees


def documented_commands() -> dict[str, str]:
    """{command: "FILE:LINE"} for every python / accelerate launch line in a fenced block."""
    found = {}
    for path in DOCS:
        fenced, pending, start = False, None, 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced, pending = not fenced, None
                continue
            if not fenced:
                continue
            if pending is None:
                if not COMMAND_RE.match(line):
                    continue
                pending, start = "", number
            text = line.rstrip()
            continued = text.endswith("\\")
            pending += " " + (text[:-1] if continued else text)
            if not continued:
                found.setdefault(normalise(strip_comment(pending)), f"{path.name}:{start}")
                pending = None
    return found


def strip_comment(command: str) -> str:
    """Drop a trailing `# comment` (a # outside quotes, after whitespace)."""
    quote, out = None, []
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out)


def normalise(command: str) -> str:
    return " ".join(command.split())


@dataclass(frozen=True)
class Run:
    # sandbox name -> fixture: a link to it (and its NAME.* sidecars), "copy:F" a copy, and
    # "." copies every file of the fixture's folder into the sandbox
    links: dict = field(default_factory=dict)
    extra: str = ""  # appended; <fixture> is replaced by the fixture's path
    rewrite: dict = field(default_factory=dict)  # text -> text, for what CPU cannot do
    machines: int = 1  # 2: run rank 0 and rank 1 on 127.0.0.1 at once
    expect: str = ""  # a path the command must have written (relative to the sandbox)


# Tiny training: 2 steps, a 1-block encoder, no tracker, and the small digit copy / scene set.
TINY = "optim.max_steps=2 tracker=null 'encoder.overrides={depth: 1, width: 32, heads: 2}'"
AUDIO = f"{TINY} data.batch_size=16 data.root=<avmnist> 'data.options={{test_speakers: [theo]}}'"
SCENES = "'data.options={train_size: 32, test_size: 16}'"
DEPTH = f"{TINY} data.batch_size=16 {SCENES}"
SENSOR = f"{TINY} data.batch_size=4"  # the 8 training rows of sensor_data
SMALL_ANCHOR = (  # a random architecture the size of the shipped anchor, for ViT-H/B lines
    "anchor.model=tiny-clip-32 anchor.model_config=imagebind_lite:tiny-clip-32 anchor.pretrained=null"
)
FT = "epochs=1 max_steps=2 batch_size=16 scene_train_size=32 scene_test_size=16"
ONE_GPU_BF16 = {
    "--num_processes 8": "--num_processes 2",
    "--mixed_precision bf16": "--mixed_precision no",
}
NP = "--no-progress"
# bench/feed.py made tiny (later options win): a small encoder, one step on 4 clips.
FEED = "--encoder-size tiny --batch 2 --steps 1 --warmup 0 --clips 4 --workers 1"
CPU = {"--device cuda": "--device cpu"}
# configs/bind.yaml made short: a few round-robin steps of small encoders on both modalities.
BIND = (
    "tracker=null max_steps=4 warmup_steps=1 sampling=round_robin "
    "'modalities.audio.encoder.overrides={depth: 1, width: 32, heads: 2}' "
    "'modalities.pen.encoder.overrides={depth: 1, width: 32, heads: 2}' "
    "modalities.audio.data.batch_size=32 modalities.pen.data.batch_size=32 "
    "modalities.audio.data.root=<avmnist> 'modalities.audio.data.options={test_speakers: [theo]}'"
)

COMMANDS = {
    # ---- README: one space
    "accelerate launch train/bind.py": Run(
        extra=BIND, expect="runs/bind-audio-pen/model/bound.json"
    ),
    "python train/bind.py --from RUN_A RUN_B --out DIR": Run(
        {"RUN_A": "audio_run", "RUN_B": "depth_run"}, expect="DIR/bound.json"
    ),
    "python eval/retrieval.py --bound runs/bind-audio-pen/model --pair audio pen": Run(
        {"runs/bind-audio-pen": "bind_run"}
    ),
    # ---- README: training
    "accelerate launch train/align_audio.py": Run(extra=AUDIO, expect="runs/audio-avmnist/model"),
    "accelerate launch train/align_depth.py optim.lr=1e-3": Run(extra=DEPTH),
    "accelerate launch train/align_audio.py --config my.yaml data.batch_size=64": Run(
        {"my.yaml": "my_yaml"}, AUDIO
    ),
    "accelerate launch train/align_audio.py --resume": Run(
        {"runs/audio-avmnist": "copy:audio_run"}, f"{AUDIO} optim.max_steps=3"
    ),
    "accelerate launch train/align_audio.py --resume runs/audio-avmnist/checkpoints/step_00000200": Run(
        {"runs/audio-avmnist": "copy:audio_run_200"}, f"{AUDIO} optim.max_steps=201"
    ),
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    "--dynamo_backend no train/align_audio.py": Run(extra=AUDIO),
    # 8 GPUs, bf16 -> 2 CPU processes in fp32
    "accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train/align_audio.py "
    "mixed_precision=bf16": Run(extra=f"{AUDIO} 'mixed_precision=\"no\"'", rewrite=ONE_GPU_BF16),
    # 2 nodes x 8 GPUs -> 2 local machines (ranks 0 and 1) of 1 process each
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 "
    "--main_process_ip HOST --main_process_port 29500 train/align_audio.py": Run(
        extra=AUDIO,
        rewrite={"--num_processes 16": "--num_processes 2", "HOST": "127.0.0.1"},
        machines=2,
    ),
    # ViT-H-14 / ViT-B-32 from open_clip: offline, random, and swapped for a small architecture
    "accelerate launch train/align_audio.py anchor.model=ViT-H-14 anchor.pretrained=laion2b_s32b_b79k "
    "anchor.model_config=null encoder.size=imagebind data.dataset=audioset data.root=AUDIOSET": Run(
        {"AUDIOSET": "audioset"}, f"{TINY} data.batch_size=2 {SMALL_ANCHOR} data.options.split=eval"
    ),
    "accelerate launch train/align_audio.py anchor.model=ViT-B-32 "
    "anchor.pretrained=/ckpt/open_clip_b32.safetensors anchor.model_config=null": Run(
        extra=f"{AUDIO} {SMALL_ANCHOR}"
    ),
    "python train/finetune_anchor.py "
    "output=imagebind_lite/assets/anchors/tiny-clip-digits-scenes.safetensors": Run(
        extra=FT, expect="imagebind_lite/assets/anchors/tiny-clip-digits-scenes.safetensors"
    ),
    # ---- real data
    "python train/prepare_nyud.py --mat nyu_depth_v2_labeled.mat --splits splits.mat --out NYUD": Run(
        {"nyu_depth_v2_labeled.mat": "nyud_mat", "splits.mat": "nyud_splits"}, expect="NYUD/test"
    ),
    "python eval/zero_shot.py --checkpoint RUN --dataset nyud --root NYUD": Run(
        {"RUN": "depth_run", "NYUD": "nyud"}, NP
    ),
    "python train/compute_stats.py --modality depth --layout sunrgbd --root SUNRGBD": Run(
        {"SUNRGBD": "copy:sunrgbd"}
    ),
    "accelerate launch train/align_depth.py data.dataset=sunrgbd data.root=SUNRGBD "
    "encoder.size=imagebind 'data.preprocess={image_size: 224}' anchor.model=ViT-H-14 "
    "anchor.pretrained=laion2b_s32b_b79k anchor.model_config=null": Run(
        {"SUNRGBD": "sunrgbd"}, f"{TINY} data.batch_size=2 {SMALL_ANCHOR}"
    ),
    # ---- README: evaluation (RUN: the tiny audio run)
    "python eval/zero_shot.py --checkpoint runs/audio-avmnist": Run(
        {"runs/audio-avmnist": "audio_run"}, NP
    ),
    "python eval/zero_shot.py --checkpoint RUN --dataset esc50 --root ESC-50-master": Run(
        {"RUN": "audio_run", "ESC-50-master": "esc50"}, NP
    ),
    "python eval/retrieval.py --checkpoint RUN": Run({"RUN": "audio_run"}, NP),
    "python eval/report.py --checkpoint RUN": Run({"RUN": "copy:audio_run"}, NP),
    "python eval/space.py embed --checkpoint RUN clips/*.wav --out emb.safetensors": Run(
        {"RUN": "audio_run", "clips": "wav_clips"}, expect="emb.safetensors"
    ),
    'python eval/space.py search --checkpoint RUN --query "text:a dog barking" '
    "--collection emb.safetensors": Run(
        {"RUN": "audio_run", "emb.safetensors": "audio_embeddings"}
    ),
    # ---- README: recipes and the ceiling
    "python eval/ceiling.py --config configs/audio.yaml --checkpoint runs/audio-avmnist": Run(
        {"runs/audio-avmnist": "audio_run"}, AUDIO
    ),
    "python bench/recipes.py": Run(
        extra="--benchmarks pen --recipes imagebind --max-steps 2 "
        "--set 'encoder.overrides={depth: 1, width: 32, heads: 2}' --set data.batch_size=32",
        expect="docs/recipes.md",
    ),
    # ---- README / docs/extending.md: a modality in one file
    "accelerate launch train/align.py modality_file=my_sensor.py modality=my_sensor "
    "data.dataset=manifest data.root=DATA "
    "'data.options={manifest: train.csv, eval_manifest: test.csv}'": Run(
        {"my_sensor.py": "my_sensor_py", "DATA": "sensor_data"}, SENSOR
    ),
    "accelerate launch train/align.py modality_file=my_modality.py modality=my_sensor "
    "data.dataset=my_sensor_demo": Run({"my_modality.py": "my_modality_py"}, DEPTH),
    "python train/align.py modality_file=examples/my_modality.py modality=my_sensor "
    "data.dataset=my_sensor_demo optim.epochs=3 optim.warmup_epochs=0.5 tracker=null": Run(
        extra=DEPTH
    ),
    "accelerate launch train/align.py modality_file=my_modality.py modality=my_sensor "
    "data.dataset=manifest data.root=DATA data.options.manifest=pairs.csv "
    "'data.options.classnames=[walking, running]' 'data.options.templates=[\"a person {}.\"]'": Run(
        {"my_modality.py": "my_modality_py", "DATA": "sensor_data"}, SENSOR
    ),
    "accelerate launch train/align.py modality=imu encoder.size=imagebind data.dataset=manifest "
    "data.root=EGO4D_PAIRS data.options.manifest=pairs.csv data.preprocess.normalize=channel "
    "optim.lr=5e-4 optim.weight_decay=0.5 data.batch_size=512 optim.epochs=8": Run(
        {"EGO4D_PAIRS": "imu_pairs"}, f"{TINY} data.batch_size=4"
    ),
    # ---- fine-tuning the anchor (ViT-B-32 swapped for the small architecture)
    "python train/finetune_anchor.py trainable=lora anchor.model=ViT-B-32 anchor.model_config=null "
    "anchor.pretrained=laion2b_s34b_b79k 'domains=[data/pairs.csv]' "
    "output=runs/anchor/mine.safetensors": Run(
        {"data": "caption_pairs"}, f"{FT} {SMALL_ANCHOR}", expect="runs/anchor/mine.safetensors"
    ),
    "accelerate launch train/align_audio.py anchor.pretrained=runs/anchor/mine.safetensors": Run(
        {"runs/anchor/mine.safetensors": "finetuned_anchor"}, AUDIO
    ),
    "accelerate launch train/finetune_anchor.py": Run(extra=FT),
    "python train/finetune_anchor.py trainable=lora epochs=5 "
    "anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes "
    "output=runs/anchor/lora.safetensors": Run(extra=FT, expect="runs/anchor/lora.safetensors"),
    "python train/finetune_anchor.py trainable=lora epochs=5 "
    "anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes "
    "output=/tmp/ft_lora/lora.safetensors": Run(
        extra=FT, rewrite={"/tmp/ft_lora/": "ft_lora/"}, expect="ft_lora/lora.safetensors"
    ),
    # ---- the test suite itself: collected only (running it here would recurse)
    "python -m pytest -q -n 2": Run({"tests": "tests_dir"}, "--collect-only tests/test_config.py"),
    # ---- docs/evaluation.md
    "python train/align_audio.py": Run(extra=AUDIO, expect="runs/audio-avmnist/model"),
    "python eval/retrieval.py --checkpoint runs/audio-avmnist": Run(
        {"runs/audio-avmnist": "audio_run"}, NP
    ),
    "python eval/report.py --checkpoint runs/audio-avmnist --linear-probe": Run(
        {"runs/audio-avmnist": "copy:audio_run"}, f"{NP} --shots 1,all"
    ),
    "python eval/probes.py --checkpoint runs/audio-avmnist": Run(
        {"runs/audio-avmnist": "audio_run"}, f"{NP} --scenes 12"
    ),
    "python eval/linear_probe.py --checkpoint runs/audio-avmnist --shots 1,5,10,all": Run(
        {"runs/audio-avmnist": "audio_run"}, f"{NP} --seeds 1"
    ),
    "python eval/retrieval.py --checkpoint runs/depth-synthetic_scenes "
    "--checkpoint runs/thermal-synthetic_scenes": Run(
        {
            "runs/depth-synthetic_scenes": "depth_run",
            "runs/thermal-synthetic_scenes": "thermal_run",
        },
        NP,
    ),
    "python eval/retrieval.py --checkpoint runs/AUDIO --checkpoint runs/DEPTH --manifest pairs.csv": Run(
        {"runs/AUDIO": "audio_run", "runs/DEPTH": "depth_run", ".": "audio_depth_pairs"}, NP
    ),
    "python eval/retrieval.py --checkpoint runs/DEPTH --dataset sunrgbd --root SUNRGBD": Run(
        {"runs/DEPTH": "depth_run", "SUNRGBD": "sunrgbd"}, NP
    ),
    "python eval/retrieval.py --checkpoint runs/AUDIO --dataset clotho --root CLOTHO": Run(
        {"runs/AUDIO": "audio_run", "CLOTHO": "clotho"}, NP
    ),
    "python eval/space.py --checkpoint RUN embed --out clips.safetensors data/clips/": Run(
        {"RUN": "audio_run", "data/clips": "wav_clips"}, expect="clips.safetensors"
    ),
    "python eval/space.py --checkpoint RUN embed --out images.safetensors photos/": Run(
        {"RUN": "audio_run", "photos": "photos"}, expect="images.safetensors"
    ),
    "python eval/space.py --checkpoint RUN search --collection images.safetensors --query clip.wav "
    "-k 5": Run(
        {"RUN": "audio_run", "images.safetensors": "image_embeddings", "clip.wav": "clip_wav"}
    ),
    'python eval/space.py --checkpoint RUN search --collection clips.safetensors --query "text:a dog '
    'barking"': Run({"RUN": "audio_run", "clips.safetensors": "audio_embeddings"}),
    "python eval/space.py --checkpoint RUN search --collection images.safetensors --query img.png "
    "--plus clip.wav": Run(
        {
            "RUN": "audio_run",
            "images.safetensors": "image_embeddings",
            "img.png": "img_png",
            "clip.wav": "clip_wav",
        }
    ),
    'python eval/space.py --checkpoint RUN compare clip.wav "text:the digit seven."': Run(
        {"RUN": "audio_run", "clip.wav": "clip_wav"}
    ),
    # ---- docs/scale.md, docs/speed.md
    "accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train/align_audio.py "
    "--config configs/audio_imagebind.yaml data.root=AUDIOSET": Run(
        {"AUDIOSET": "audioset"},
        f"{TINY} data.batch_size=2 {SMALL_ANCHOR} data.num_workers=0 'mixed_precision=\"no\"' "
        "encoder.size=tiny",
        rewrite=ONE_GPU_BF16,
    ),
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
    "--dynamo_backend no train/cache_anchor.py --config configs/audio.yaml --out caches/avmnist": Run(
        extra="data.root=<avmnist> 'data.options={test_speakers: [theo]}'",
        expect="caches/avmnist",
    ),
    "accelerate launch train/align_audio.py anchor.cache=caches/avmnist": Run(
        {"caches/avmnist": "anchor_cache"}, AUDIO
    ),
    # the manifest row of the speed table: a few pairs, one timed step, the small anchor
    "python bench/manifest_cache.py": Run(
        extra="--clips 16 --batch 8 --steps 1 --repeats 1 --check-steps 1 --image-size 32 "
        "anchor.model=tiny-clip-32 anchor.model_config=imagebind_lite:tiny-clip-32"
    ),
    # ---- docs/speed.md: CPU threads (a tiny encoder, one timed step per setting)
    "python bench/threads.py --config audio --steps 10 --repeats 3": Run(
        extra=f"--steps 1 --repeats 1 --warmup 0 {AUDIO.replace(TINY, '')} "
        "'encoder.overrides={depth: 1, width: 32, heads: 2}' tracker=null"
    ),
    # ---- docs/scale.md: keeping the accelerator fed
    "python bench/feed.py --config configs/audio.yaml --encoder-size tiny-conv --batch 32 --steps 2 --warmup 1 --workers 0 --feed worker": Run(
        extra=FEED
    ),
    "python bench/feed.py --encoder-size tiny --batch 32 --steps 2 --warmup 1 --workers 0 --feed device": Run(
        extra=FEED
    ),
    "python bench/feed.py --config configs/audio.yaml --encoder-size tiny-conv --batch 32 --steps 4 --warmup 2 --repeats 2 --workers 2 --feed worker": Run(
        extra=f"{FEED} --repeats 1"
    ),
    "python train/write_shards.py --manifest train.csv --root ROOT --out FEATS --features audio --config configs/audio.yaml": Run(
        {"ROOT": "feed_pairs"}, expect="FEATS/shards.json"
    ),
    "python bench/shard_offsets.py --clips 3000 --repeats 5": Run(extra="--clips 70 --repeats 1"),
    "python bench/feed.py --device cuda --clips 3000 --batch 256 --steps 20 --warmup 5 --workers 8 --feed worker": Run(
        extra=FEED, rewrite=CPU
    ),
    "python bench/feed.py --device cuda --clips 3000 --batch 256 --steps 20 --warmup 5 --workers 8 --feed device": Run(
        extra=FEED, rewrite=CPU
    ),
    "python bench/feed.py --device cuda --clips 3000 --batch 256 --steps 20 --warmup 5 --workers 8 --feed features": Run(
        extra=FEED, rewrite=CPU
    ),
    "python bench/gpu_audio_step.py --batch 256 --compile": Run(
        extra="--batch 2 --steps 1 --warmup 0", rewrite={"--compile": "--device cpu --depth 1"}
    ),
    "python bench/gpu_audio_step.py --batch 256 --compile --foreach-adamw": Run(
        extra="--batch 2 --steps 1 --warmup 0", rewrite={"--compile": "--device cpu --depth 1"}
    ),
    "python bench/gpu_audio_step.py --batch 512 --compile": Run(
        extra="--batch 2 --steps 1 --warmup 0", rewrite={"--compile": "--device cpu --depth 1"}
    ),
    "python bench/gpu_audio_step.py --batch 256 --compile-mode max-autotune-no-cudagraphs": Run(
        extra="--batch 2 --steps 1 --warmup 0",
        rewrite={"--compile-mode max-autotune-no-cudagraphs": "--device cpu --depth 1"},
    ),
}


# ----------------------------------------------------------------------------- the table


def test_table_covers_the_docs():
    documented = documented_commands()
    table = {normalise(c) for c in COMMANDS}
    missing = {c: where for c, where in documented.items() if c not in table}
    stale = table - set(documented)
    assert not missing, f"documented commands with no entry in COMMANDS: {missing}"
    assert not stale, f"COMMANDS entries no doc prints any more: {sorted(stale)}"


def test_parser_joins_continuations_and_drops_comments():
    found = documented_commands()
    assert "python eval/zero_shot.py --checkpoint runs/audio-avmnist" in found
    assert any(c.startswith("accelerate launch --multi_gpu --num_machines 2") for c in found)
    assert not any("#" in c or "\\" in c for c in found)


# ----------------------------------------------------------------------------- fixtures

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "0"}


# What `accelerate launch SCRIPT` (one process: no config file, no flags, a CPU-only machine)
# adds to its child's environment, OMP_NUM_THREADS=1 only where the caller sets none (it keeps
# the caller's); test_launcher_env_is_what_the_launcher_sets checks it against the real one.
LAUNCHER_ENV = {
    "ACCELERATE_USE_CPU": "False",
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_DYNAMO_MODE": "default",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
    "OMP_NUM_THREADS": "1",
}
SCRIPT_DIRS = ("train", "eval", "bench")  # the scripts a documented line may run in a fork


def launched_env(env: dict) -> dict:
    """The environment `accelerate launch SCRIPT` gives SCRIPT when started with ``env``."""
    threads = str(int(env["OMP_NUM_THREADS"])) if env.get("OMP_NUM_THREADS") else "1"
    return {**env, **LAUNCHER_ENV, "OMP_NUM_THREADS": threads}


def shell_words(line: str, cwd: Path) -> list[str] | None:
    """The words bash runs for ``line`` (quotes and backslashes removed, unquoted globs expanded
    from ``cwd``, sorted, a glob matching nothing left as it is), or None where the line needs
    the shell: an operator or redirect, an expansion ($, backticks, braces, ~), a comment."""
    words, word, i = [], None, 0  # word: [(character, quoted)] while one is being read
    while i < len(line):
        char = line[i]
        if char in " \t\n":
            if word is not None:
                words.extend(_expanded(word, cwd))
            word, i = None, i + 1
            continue
        if word is None:
            if char in "~#":
                return None
            word = []
        if char == "'":
            end = line.find("'", i + 1)
            if end < 0:
                return None
            word += [(c, True) for c in line[i + 1 : end]]
            i = end + 1
        elif char == '"':
            i += 1
            while i < len(line) and line[i] != '"':
                if line[i] in "$`":
                    return None
                if line[i] == "\\" and line[i + 1 : i + 2] in ('"', "\\", "$", "`"):
                    i += 1
                word.append((line[i], True))
                i += 1
            if i == len(line):
                return None
            i += 1
        elif char == "\\":
            if i + 1 == len(line):
                return None
            word.append((line[i + 1], True))
            i += 2
        elif char in "|&;<>(){}$`":
            return None
        else:
            word.append((char, False))
            i += 1
    if word is not None:
        words.extend(_expanded(word, cwd))
    return words


def _expanded(word: list, cwd: Path) -> list[str]:
    text = "".join(c for c, _ in word)
    if not any(c in "*?[" and not quoted for c, quoted in word):
        return [text]
    pattern = "".join(glob.escape(c) if quoted else c for c, quoted in word)
    return sorted(glob.glob(pattern, root_dir=cwd)) or [text]


def forkable(line: str, cwd: Path) -> tuple[list[str], dict] | None:
    """(``[SCRIPT, *ARGS]``, environment) where ``line`` is `python SCRIPT ARGS` or a one-process
    `accelerate launch SCRIPT ARGS` (no launcher flags) of a script under train/, eval/ or
    bench/ and no shell syntax; else None (bash runs it)."""
    words = shell_words(line, cwd)
    if words and words[0] == "python":
        args, env = words[1:], ENV
    elif words and words[:2] == ["accelerate", "launch"]:
        args, env = words[2:], launched_env(ENV)
    else:
        return None
    script = (cwd / args[0]).resolve() if args else None
    if script is None or script.suffix != ".py" or not script.is_file():
        return None
    if script.parent.parent != REPO or script.parent.name not in SCRIPT_DIRS:
        return None
    return args, env


def sh(command: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a documented command line as bash would, with this interpreter for python: a line
    ``forkable`` accepts in a fork of this warm process (``conftest.run_script``: exit status,
    output, cwd, environment and argv as a real run has them, without the interpreter's
    start-up), any other (``python -m``, several processes or machines, shell syntax) through
    bash."""
    forked = forkable(command, Path(cwd))
    if forked is not None:
        args, env = forked
        return run_script(args, cwd=cwd, env=env, timeout=timeout)
    return subprocess.run(
        ["bash", "-c", sh_line(command)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sandbox(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (base / name).symlink_to(REPO / name)
    return base


def train_in(base: Path, command: str) -> Path:
    proc = sh(command, sandbox(base))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base


@pytest.fixture(scope="session")
def avmnist(tmp_path_factory):
    """FSDD clips of three speakers (2 per digit) and the digit images: the default dataset, small."""
    return small_avmnist(tmp_path_factory.mktemp("avmnist"), takes=2)


def _audio_run(tmp_path_factory, avmnist, extra=""):
    base = tmp_path_factory.mktemp("audiorun")
    tiny = AUDIO.replace("<avmnist>", str(avmnist))
    train_in(base, f"python train/align_audio.py {tiny} checkpoint_every=1 {extra}")
    return base / "runs" / "audio-avmnist"


@pytest.fixture(scope="session")
def audio_run(tmp_path_factory, avmnist):
    return _audio_run(tmp_path_factory, avmnist)


@pytest.fixture(scope="session")
def audio_run_200(tmp_path_factory, audio_run):
    """The run with its last checkpoint under the documented name step_00000200."""
    run = tmp_path_factory.mktemp("run200") / "audio-avmnist"
    shutil.copytree(audio_run, run, symlinks=True)
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    last.rename(run / "checkpoints" / "step_00000200")
    return run


@pytest.fixture(scope="session")
def depth_run(tmp_path_factory):
    """Synthetic scenes, with fixed depth statistics as a run on real data stores them (the
    real-data evaluations refuse a model without)."""
    base = tmp_path_factory.mktemp("depthrun")
    stats = "data.preprocess.mean=2.0 data.preprocess.std=1.0"
    train_in(base, f"python train/align_depth.py {DEPTH} {stats}")
    return base / "runs" / "depth-synthetic_scenes"


@pytest.fixture(scope="session")
def bind_run(tmp_path_factory, avmnist):
    base = tmp_path_factory.mktemp("bindrun")
    train_in(base, f"python train/bind.py {BIND.replace('<avmnist>', str(avmnist))}")
    return base / "runs" / "bind-audio-pen"


@pytest.fixture(scope="session")
def thermal_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("thermalrun")
    train_in(base, f"python train/align_thermal.py {DEPTH}")
    return base / "runs" / "thermal-synthetic_scenes"


@pytest.fixture(scope="session")
def tests_dir():
    return REPO / "tests"


@pytest.fixture(scope="session")
def my_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "my.yaml"
    path.write_text(
        (REPO / "configs" / "audio.yaml").read_text().replace("lr: 3.0e-3", "lr: 1.0e-3")
    )
    return path


@pytest.fixture(scope="session")
def esc50(tmp_path_factory):
    from test_protocols import make_esc50

    return make_esc50(tmp_path_factory.mktemp("esc") / "ESC-50-master")


@pytest.fixture(scope="session")
def clotho(tmp_path_factory):
    from test_protocols import make_clotho

    return make_clotho(tmp_path_factory.mktemp("clotho") / "CLOTHO")


@pytest.fixture(scope="session")
def audioset(tmp_path_factory):
    """AudioSet's layout: segment tables, audio/ and frames/ (real clips, random frames)."""
    from test_protocols import _rgb, make_audioset

    root = make_audioset(tmp_path_factory.mktemp("audioset") / "AUDIOSET")
    for clip in (root / "audio").glob("*.flac"):
        _rgb(root / "frames" / f"{clip.stem}.jpg", len(clip.stem))
    for split in ("balanced_train", "unbalanced_train"):
        shutil.copy(root / "eval_segments.csv", root / f"{split}_segments.csv")
    return root


@pytest.fixture(scope="session")
def sunrgbd(tmp_path_factory):
    """The two real SUN RGB-D frames plus four generated ones, a split.json and the statistics."""
    from test_protocols import make_sunrgbd

    root = tmp_path_factory.mktemp("sun") / "SUNRGBD"
    shutil.copytree(TEST_DATA / "sunrgbd_toy", root)
    make_sunrgbd(root)
    ids = sorted(str(p.parent.relative_to(root)) for p in root.rglob("scene.txt"))
    import json

    (root / "split.json").write_text(json.dumps({"train": ids[:4], "test": ids[4:]}))
    proc = sh(
        f"python train/compute_stats.py --modality depth --layout sunrgbd --root {root}", REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.fixture(scope="session")
def nyud_release(tmp_path_factory):
    from test_nyud_prepare import toy_frames, write_labeled_mat, write_splits

    folder = tmp_path_factory.mktemp("nyudrelease")
    write_labeled_mat(folder / "nyu_depth_v2_labeled.mat", toy_frames())
    write_splits(folder / "splits.mat")
    return folder


@pytest.fixture(scope="session")
def nyud_mat(nyud_release):
    return nyud_release / "nyu_depth_v2_labeled.mat"


@pytest.fixture(scope="session")
def nyud_splits(nyud_release):
    return nyud_release / "splits.mat"


@pytest.fixture(scope="session")
def nyud(nyud_release):
    """The documented conversion's output (NYUD/{train,test}/NNNN/)."""
    mat, splits, out = (
        nyud_release / n for n in ("nyu_depth_v2_labeled.mat", "splits.mat", "NYUD")
    )
    proc = sh(
        f"python {REPO}/train/prepare_nyud.py --mat {mat} --splits {splits} --out {out}", REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def wav_clips(tmp_path_factory, avmnist):
    import soundfile

    folder = tmp_path_factory.mktemp("clips") / "clips"
    folder.mkdir()
    for path in sorted((avmnist / "audio").glob("*_theo_0.flac"))[:4]:
        data, rate = soundfile.read(path)
        soundfile.write(folder / f"{path.stem}.wav", data, rate)
    return folder


@pytest.fixture(scope="session")
def clip_wav(wav_clips):
    return sorted(wav_clips.glob("*.wav"))[0]


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    from imagebind_lite.data import avmnist as avm

    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    images, _ = avm.load_digit_images()
    for i in range(4):
        Image.fromarray((images[i].numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def img_png(photos):
    return photos / "0.png"


def _embed(base, run, inputs):
    out = base / "emb.safetensors"
    proc = sh(f"python eval/space.py --checkpoint {run} embed --out {out} {inputs}", sandbox(base))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def audio_embeddings(tmp_path_factory, audio_run, wav_clips):
    return _embed(tmp_path_factory.mktemp("aemb"), audio_run, wav_clips)


@pytest.fixture(scope="session")
def image_embeddings(tmp_path_factory, audio_run, photos):
    return _embed(tmp_path_factory.mktemp("iemb"), audio_run, photos)


@pytest.fixture(scope="session")
def audio_depth_pairs(tmp_path_factory):
    """A manifest pairing real clips with millimetre depth PNGs (emergent audio<->depth)."""
    from test_protocols import INTRINSICS, _clip, _depth_png

    data = tmp_path_factory.mktemp("paired")
    rows = ["id,audio,depth,intrinsics,layout"]
    for i in range(4):
        _clip(data / f"a{i}.flac", i)
        _depth_png(data / f"d{i}.png", i, rotate=False)
        rows.append(f"p{i},a{i}.flac,d{i}.png,K.txt,mm")
    (data / "K.txt").write_text(INTRINSICS)
    (data / "pairs.csv").write_text("\n".join(rows) + "\n")
    return data


@pytest.fixture(scope="session")
def my_sensor_py(tmp_path_factory):
    """README's `# my_sensor.py` block, written out as the file it names."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n# my_sensor\.py\n(.*?)```", text, re.S).group(1)
    path = tmp_path_factory.mktemp("sensorpy") / "my_sensor.py"
    path.write_text(block)
    return path


@pytest.fixture(scope="session")
def my_modality_py():
    return REPO / "examples" / "my_modality.py"


@pytest.fixture(scope="session")
def sensor_data(tmp_path_factory, photos):
    """DATA: UCI digit frames with [3, 600] signals; train.csv / test.csv and pairs.csv."""
    root = tmp_path_factory.mktemp("sensordata") / "DATA"
    (root / "signals").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        np.save(root / "signals" / f"{i}.npy", rng.normal(size=(3, 600)).astype("float32"))
        shutil.copy(photos / f"{i % 4}.png", root / f"{i}.png")
        rows.append((f"{i}.png", f"signals/{i}.npy", ["walking", "running"][i % 2]))
    header = "vision,my_sensor,label"
    for name, part in (("train.csv", rows[:8]), ("test.csv", rows[8:])):
        (root / name).write_text("\n".join([header, *(",".join(r) for r in part)]) + "\n")
    split = [",".join((*r, "train" if i < 8 else "test")) for i, r in enumerate(rows)]
    (root / "pairs.csv").write_text("\n".join([header + ",split", *split]) + "\n")
    return root


@pytest.fixture(scope="session")
def imu_pairs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("ego") / "EGO4D_PAIRS"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["vision,imu,split"]
    for i in range(8):
        np.save(root / f"{i}.npy", rng.normal(size=(6, 2000)).astype("float32"))
        shutil.copy(photos / f"{i % 4}.png", root / f"{i}.png")
        rows.append(f"{i}.png,{i}.npy,{'train' if i < 6 else 'test'}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def caption_pairs(tmp_path_factory):
    """data/: image,caption pairs (the `domains=[data/pairs.csv]` manifest)."""
    from test_finetune_anchor import write_digit_manifest

    root = tmp_path_factory.mktemp("captions") / "data"
    write_digit_manifest(root, n_train=16, n_test=8)
    return root


@pytest.fixture(scope="session")
def finetuned_anchor(tmp_path_factory):
    base = tmp_path_factory.mktemp("ft")
    out = base / "mine.safetensors"
    proc = sh(f"python train/finetune_anchor.py trainable=lora {FT} output={out}", sandbox(base))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def feed_pairs(tmp_path_factory):
    """FSDD clips, each with a small image, listed in train.csv (write_shards.py --features)."""
    from test_feed import write_pairs

    return write_pairs(tmp_path_factory.mktemp("feedpairs") / "root", manifest="train.csv")


@pytest.fixture(scope="session")
def anchor_cache(tmp_path_factory, avmnist):
    base = tmp_path_factory.mktemp("cache")
    out = base / "avmnist"
    extra = f"data.root={avmnist} 'data.options={{test_speakers: [theo]}}'"
    proc = sh(
        f"python train/cache_anchor.py --config configs/audio.yaml --out {out} {extra}",
        sandbox(base),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# ----------------------------------------------------------------------------- running them


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: normalise(c)[:80])
def test_documented_command_runs(command, tmp_path, request):
    spec = COMMANDS[command]
    box = sandbox(tmp_path / "box")
    for name, fixture in spec.links.items():
        copy = fixture.startswith("copy:")
        source = Path(request.getfixturevalue(fixture.removeprefix("copy:")))
        if name == ".":  # copies: a link out of the dataset root would be refused
            for child in source.iterdir():
                shutil.copy(child, box / child.name)
            continue
        target = box / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copytree(source, target, symlinks=True)
            continue
        target.symlink_to(source)
        for sidecar in source.parent.glob(f"{source.name}.*"):  # emb.safetensors.json
            (box / f"{name}{sidecar.name[len(source.name) :]}").symlink_to(sidecar)
    line = normalise(command)
    for old, new in spec.rewrite.items():
        assert old in line, f"rewrite {old!r} no longer matches"
        line = line.replace(old, new)
    extra = re.sub(r"<(\w+)>", lambda m: str(request.getfixturevalue(m.group(1))), spec.extra)
    line = f"{line} {extra}".strip()
    if spec.machines == 2:
        port = str(free_port())
        line = line.replace("--main_process_port 29500", f"--main_process_port {port}")
        rank1 = line.replace("--machine_rank 0", "--machine_rank 1")
        other = subprocess.Popen(
            ["bash", "-c", sh_line(rank1)],
            cwd=box,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        proc = sh(line, box)
        out1, _ = other.communicate(timeout=300)
        assert other.returncode == 0, out1[-3000:]
    else:
        proc = sh(line, box)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    if spec.expect:
        assert (box / spec.expect).exists(), f"{spec.expect} not written"


def sh_line(command: str) -> str:
    py = shlex.quote(sys.executable)
    command = re.sub(r"^python ", f"{py} ", command)
    launch = f"{py} -m accelerate.commands.launch "
    if "--multi_gpu" in command and "--main_process_port" not in command:
        launch += f"--main_process_port {free_port()} "  # xdist workers launch side by side
    return re.sub(r"^accelerate launch ", launch, command)


# ----------------------------------------------------------------------------- the emulation


def test_launcher_env_is_what_the_launcher_sets(tmp_path):
    """The real `accelerate launch` on a script that prints its environment: what it adds is
    LAUNCHER_ENV, exactly (the forked one-process lines run with launched_env)."""
    script = tmp_path / "environ.py"
    script.write_text("import json, os\nprint(json.dumps(dict(os.environ)))\n")
    parent = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS" and "ACCELERATE" not in k}
    launch = [sys.executable, "-m", "accelerate.commands.launch", str(script)]
    proc = subprocess.run(
        launch, cwd=tmp_path, env=parent, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in child.items() if parent.get(k) != v} == LAUNCHER_ENV
    assert child == launched_env(parent)  # nothing removed either
    assert launched_env({**parent, "OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def _documented_lines():
    """Every table line as test_documented_command_runs runs it (fixtures as /FIXTURE/NAME)."""
    for command, spec in COMMANDS.items():
        line = normalise(command)
        for old, new in spec.rewrite.items():
            line = line.replace(old, new)
        extra = re.sub(r"<(\w+)>", r"/FIXTURE/\1", spec.extra)
        yield f"{line} {extra}".strip()


SPLIT_CASES = [
    "python eval/space.py embed --checkpoint RUN clips/*.wav --out 'x y.safetensors'",
    "python eval/space.py embed 'clips/*.wav' clips/*.flac clips/?.wav x[ab].txt \"[a b]\"",
    'python a.py "text:a dog barking" \'\' "" c\\ d "q\\"uote" \'data.options.t=["a {}."]\'',
    "python a.py 'encoder.overrides={depth: 1, width: 32, heads: 2}' a=b\\*c .hidden*",
]


def test_words_are_what_bash_passes(tmp_path):
    """shell_words against bash itself: for every documented line and a few quoting and glob
    cases, the words bash gives a command (from a folder with files the globs match)."""
    (tmp_path / "clips").mkdir()
    for name in ("clips/b.wav", "clips/a.wav", "clips/.c.wav", "xa.txt", ".hidden1"):
        (tmp_path / name).write_text("")
    for line in [*_documented_lines(), *SPLIT_CASES]:
        words = shell_words(line, tmp_path)
        if words is None:
            continue
        echo = f"printf '%s\\0' {line}"
        proc = subprocess.run(["bash", "-c", echo], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert words == proc.stdout.split("\0")[:-1], line
    assert shell_words("python a.py x && python b.py", tmp_path) is None
    assert shell_words("python a.py > out.txt", tmp_path) is None
    assert shell_words("python a.py $HOME", tmp_path) is None
    assert shell_words("python a.py {a,b}", tmp_path) is None


def test_which_documented_lines_run_in_a_fork(tmp_path):
    """In a fork: `python SCRIPT` and one-process `accelerate launch SCRIPT` of train/, eval/,
    bench/; through bash: `python -m`, and launches of several processes or machines."""
    box = sandbox(tmp_path / "box")
    for line in _documented_lines():
        forked = forkable(line, box)
        real = line.startswith("python -m ") or "--multi_gpu" in line
        assert (forked is None) == real, line
        if forked is not None and line.startswith("accelerate launch "):
            assert forked[1] == launched_env(ENV)
        elif forked is not None:
            assert forked[1] == ENV
