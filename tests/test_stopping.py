"""A stop signal (a scheduler's SIGTERM, a Ctrl-C) ends training after the current step with that
step's checkpoint saved, on every process alike; --resume continues to the weights of the run
that was never stopped."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, run_python, tiny_overrides
from safetensors.torch import load_file

from imagebind_lite.train import latest_checkpoint
from imagebind_lite.training.stopping import stop_signals

RUN = "depth-synthetic_scenes"
STEPS = 2 * 256 // 16  # two epochs of 256 scenes at batch 16

# train/align_depth.py, where the main process sends SIGTERM once step $SIGNAL_AT is done: to its
# process group (itself and its DataLoader workers, as SLURM signals every process of a job) or
# to its parent (accelerate launch, which passes it on to every rank and their workers).
SIGNALLED = """
import os, signal
import imagebind_lite.training.loop as loop
from imagebind_lite.cli import train_main
advance = loop.advance
def advance_then_signal(run, seed, batch):
    advance(run, seed, batch)
    if run.step == int(os.environ["SIGNAL_AT"]) and run.accelerator.is_main_process:
        if os.environ["SIGNAL_TO"] == "group":
            os.killpg(os.getpgid(0), signal.SIGTERM)
        else:
            os.kill(os.getppid(), signal.SIGTERM)
loop.advance = advance_then_signal
train_main("depth.yaml")
"""


def overrides(out):
    return tiny_overrides(
        out,
        "data.batch_size=16",
        "optim.epochs=2",
        "data.num_workers=1",
        "data.preprocess={image_size: 32}",
        "data.options={train_size: 256, test_size: 96}",
    )


def run(args, **env):
    return run_python(args, timeout=300, new_session=True, **env)


def test_sigterm_to_the_group_saves_the_step_and_resume_matches_an_unstopped_run(tmp_path):
    reference = run(["train/align_depth.py", *overrides(tmp_path / "a")])
    assert reference.returncode == 0, reference.stderr[-2000:]
    stopped = run(["-c", SIGNALLED, *overrides(tmp_path / "b")], SIGNAL_AT="11", SIGNAL_TO="group")
    run_dir = tmp_path / "b" / RUN
    checkpoint = run_dir / "checkpoints" / "step_00000011"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert stopped.stderr.splitlines()[-1] == (
        f"stopped by SIGTERM after step 11 of {STEPS}: saved {checkpoint}; --resume continues it"
    )
    assert latest_checkpoint(run_dir) == checkpoint and not (run_dir / "model").exists()

    resumed = run(["train/align_depth.py", "--resume", *overrides(tmp_path / "b")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 11" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "a" / RUN / "model/model.safetensors"))
    b = load_file(str(run_dir / "model/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def launch(script, out, *script_args, **env):
    """``accelerate launch`` of ``script`` on 2 CPU processes."""
    args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    args += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    args += ["--main_process_port", str(free_port())]
    cmd = ["-m", "accelerate.commands.launch", *args, str(script), *script_args, *overrides(out)]
    return run(cmd, **env)


def test_sigterm_to_the_launcher_stops_both_ranks_after_the_same_step(tmp_path):
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED)
    stopped = launch(script, tmp_path, SIGNAL_AT="5", SIGNAL_TO="parent")
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, out[-3000:]
    # The launcher passes the signal on during step 5 or a later one. One line for the run (rank
    # 0's); one checkpoint, complete, so rank 1 stopped after the same step (its save would
    # hang otherwise).
    lines = re.findall(rf"stopped by SIGTERM after step (\d+) of {STEPS // 2}: saved ", out)
    assert len(lines) == 1 and 5 <= int(lines[0]) < STEPS // 2, out[-3000:]
    step = int(lines[0])
    run_dir = tmp_path / RUN
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{step:08d}"]
    assert latest_checkpoint(run_dir).name == f"step_{step:08d}"  # state.json written

    resumed = launch(REPO / "train/align_depth.py", tmp_path, "--resume")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and f"from step {step}" in out, out[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_the_first_signal_is_recorded_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_signals() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert received == [signal.SIGTERM, signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_worker_absorbs_its_first_sigterm_only():
    code = (
        "import os, signal, time\n"
        "from imagebind_lite.training.stopping import absorb_stop_signals\n"
        "absorb_stop_signals(0)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('alive after one', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('alive after two')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "alive after one\n" and proc.returncode == -signal.SIGTERM
