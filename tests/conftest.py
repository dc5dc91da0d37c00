import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_runner import run_script as run_script  # scripts forked warm: the rule is there
from script_runner import start_fork_server, stop_fork_server
from script_runner import start_script as start_script

REPO = Path(__file__).resolve().parents[1]
# Real files the tests read: the package's own assets and tests/data (see its README).
TEST_DATA = REPO / "tests" / "data"
FSDD = REPO / "imagebind_lite" / "assets" / "avmnist" / "audio"

# Tests share two CPU cores: keep torch from oversubscribing them (one thread per worker when
# pytest-xdist runs two workers side by side).
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

SLOW = bool(os.environ.get("IMAGEBIND_LITE_SLOW_TESTS"))

# A script run by a test: one thread (also under accelerate launch, whose OMP_NUM_THREADS the
# scripts ignore), output unbuffered (a killed run still shows what it did).
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "IMAGEBIND_LITE_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def run_python(args, timeout=600, new_session=False, **env) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root with ``ENV`` (plus ``env``), output captured;
    ``new_session``: in a process group of its own, for a signal sent to the group."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=new_session,
    )


def fork_python(args, timeout=600, new_session=False, **env) -> subprocess.CompletedProcess:
    """``run_python`` without a new interpreter: the same call (a script or ``-c SOURCE``, then
    its arguments; from the repository root with ``ENV`` plus ``env``) through ``run_script``,
    a fork of a process that has the heavy libraries imported. Where the separate interpreter
    is what a test is about (imports, start-up, ``-m``, a launcher), use ``run_python``."""
    return run_script(args, cwd=REPO, env={**ENV, **env}, timeout=timeout, new_session=new_session)


def small_avmnist(root: Path, takes: int) -> Path:
    """The default dataset made small in ``root``: FSDD clips of jackson, nicolas and theo
    (``takes`` per digit each) and the digit images."""
    (root / "audio").mkdir(parents=True)
    for speaker in ("jackson", "nicolas", "theo"):
        for digit in range(10):
            for take in range(takes):
                name = f"{digit}_{speaker}_{take}.flac"
                shutil.copy(FSDD / name, root / "audio" / name)
    shutil.copy(FSDD.parent / "digits.csv.gz", root / "digits.csv.gz")
    return root


def free_port() -> int:
    """A free local TCP port: tests run in parallel, and two launches on accelerate's default
    port 29500 would join each other's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs only with IMAGEBIND_LITE_SLOW_TESTS=1")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    # The fork server of run_script, forked now, before any test: what a test does in-process
    # never reaches a script. Not in pytest-xdist's controller, which runs no test.
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        start_fork_server()


def pytest_unconfigure(config):
    stop_fork_server()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not SLOW:
            item.add_marker(pytest.mark.skip(reason="slow: set IMAGEBIND_LITE_SLOW_TESTS=1"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With IMAGEBIND_LITE_NO_SKIPS=1 (CI), a skip not marked slow or gpu fails: a fresh clone
    must run every other test."""
    outcome = yield
    report = outcome.get_result()
    allowed = "slow" in item.keywords or "gpu" in item.keywords
    if report.skipped and not allowed and os.environ.get("IMAGEBIND_LITE_NO_SKIPS"):
        report.outcome = "failed"
        report.longrepr = f"skipped without a slow or gpu mark: {report.longrepr}"


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared two-core machine: one thread avoids the hand-off stalls that
    make these tests ten times slower when other work runs beside them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def killed_after_checkpoint(main: str) -> str:
    """Python source of a training script (``main``: a call such as
    ``train_main("audio.yaml", sys.argv[1:])``) that kills itself with SIGKILL as soon as the
    checkpoint of step ``$KILL_AT`` is complete: an interruption at a known step, whatever the
    machine's speed."""
    return (
        "import os, signal, sys\n"
        "import imagebind_lite.training.loop as loop\n"
        "from imagebind_lite.cli import bind_main, train_main\n"
        "save = loop.save_checkpoint\n"
        "def save_then_die(accelerator, run_dir, step, *rest):\n"
        "    save(accelerator, run_dir, step, *rest)\n"
        "    if step == int(os.environ['KILL_AT']):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "loop.save_checkpoint = save_then_die\n"
        f"{main}\n"
    )


def tiny_overrides(tmp_path, *extra):
    """A training config that runs in seconds: random tiny anchor, 1-block encoder."""
    return [
        f"output_dir={tmp_path}",
        "tracker=null",
        "anchor.pretrained=null",
        "encoder.overrides={depth: 1, width: 32, heads: 2}",
        "data.batch_size=32",
        "optim.epochs=1",
        *extra,
    ]
