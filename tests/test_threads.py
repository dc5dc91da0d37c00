"""CPU threads: the rule of imagebind_lite/threads.py, and what `accelerate launch` gets."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ENV, REPO, tiny_overrides

from imagebind_lite.threads import THREADS_ENV, choose_threads, use_threads

LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}  # as the launcher sets


@pytest.mark.parametrize(
    "environ, cpus, workers, threads, why",
    [
        ({}, 2, 0, 2, "2 CPUs available / 1 process on this machine"),
        ({}, 16, 0, 16, "16 CPUs available"),
        # Under a launcher OMP_NUM_THREADS=1 is the launcher's, not a choice.
        (LAUNCHED, 2, 0, 2, "the launcher's OMP_NUM_THREADS=1 ignored"),
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "2"}, 2, 0, 1, "2 processes on this machine"),
        ({**LAUNCHED, "LOCAL_WORLD_SIZE": "4"}, 16, 0, 4, "16 CPUs available / 4 processes"),
        ({"LOCAL_WORLD_SIZE": "8"}, 4, 0, 1, "4 CPUs available / 8 processes"),  # at least 1
        # DataLoader workers come out of the budget, one core each.
        ({}, 8, 2, 6, "less 2 DataLoader workers"),
        ({}, 2, 4, 1, "less 4 DataLoader workers"),
        # Plain python: the user's OMP_NUM_THREADS wins.
        ({"OMP_NUM_THREADS": "3"}, 16, 2, 3, "OMP_NUM_THREADS=3"),
        # IMAGEBIND_LITE_THREADS wins under every launcher.
        ({**LAUNCHED, THREADS_ENV: "3"}, 16, 0, 3, f"{THREADS_ENV}=3"),
        ({"TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "1", THREADS_ENV: "5"}, 2, 0, 5, "=5"),
    ],
)
def test_the_rule(environ, cpus, workers, threads, why):
    choice = choose_threads(None, workers, environ=environ, cpus=cpus)
    assert choice.threads == threads
    assert why in choice.reason
    assert choice.line().startswith(f"threads: {threads} (")


def test_the_config_wins_over_the_environment():
    choice = choose_threads(3, 1, environ={THREADS_ENV: "5", "OMP_NUM_THREADS": "7"}, cpus=2)
    assert (choice.threads, choice.reason) == (3, "threads in the config")


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_count_names_the_variable(value):
    with pytest.raises(ValueError, match=THREADS_ENV):
        choose_threads(None, environ={THREADS_ENV: value}, cpus=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU rule")
def test_use_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "1")
    try:
        assert use_threads().threads == 1 and torch.get_num_threads() == 1
        assert use_threads(2).threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_bad_threads_field_is_one_config_line(tmp_path):
    from imagebind_lite.cli import train_main

    with pytest.raises(SystemExit) as exit_:
        train_main("audio.yaml", [*tiny_overrides(tmp_path), "threads=0"])
    assert "threads: must be at least 1" in str(exit_.value)
    assert not (tmp_path / "audio-avmnist").exists()


def test_accelerate_launch_uses_every_core_and_says_so(tmp_path):
    """The README's command with nothing set: the launcher's OMP_NUM_THREADS=1 does not pin
    the run to one core; the count and its reason are printed and kept in metrics.json."""
    env = {k: v for k, v in ENV.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS")}
    args = [*tiny_overrides(tmp_path), "optim.max_steps=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "train/align_audio.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpus = len(os.sched_getaffinity(0))
    line = f"threads: {cpus} ({cpus} CPUs available / 1 process on this machine"
    assert line in proc.stderr
    assert "the launcher's OMP_NUM_THREADS=1 ignored" in proc.stderr
    metrics = json.loads((tmp_path / "audio-avmnist" / "metrics.json").read_text())
    assert metrics["threads"] == cpus
    assert metrics["threads_reason"].startswith(f"{cpus} CPUs available")
