"""conftest.run_script (tests/script_runner.py): a script run in a fork of a warm process gives
what ``subprocess.run([python, SCRIPT, ...])`` gives, and nothing passes between it and the test
process. The scripts here import nothing heavy, so the real interpreter they are compared with
starts in a fraction of a second."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import run_script, start_script

import imagebind_lite.registry as registry

SCRIPTS = {
    "where": """
        import os, sys
        import helper  # a module beside the script: sys.path[0] is the script's folder
        import onpath  # from PYTHONPATH
        print(sys.argv, os.getcwd(), __name__, __file__, helper.NAME, onpath.NAME)
        print(sys.path)
        print(os.environ["MARK"], os.getenv("PYTHONPATH"), file=sys.stderr)
        sys.exit(3)
    """,
    "exit text": "import sys\nprint('out')\nsys.exit('stopped: a reason')\n",
    "exit none": "raise SystemExit\n",
    "exit 256": "raise SystemExit(256 + 7)\n",
    "exception": "def f():\n    raise ValueError('boom')\n\nf()\n",
    "chained": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    raise KeyError('k') from e\n",
    "interrupt": "raise KeyboardInterrupt\n",
    "sigkill": "import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "carriage return": "import sys\nprint('a\\rb\\r\\nc')\nsys.stderr.write('10%\\r20%\\r')\n",
    "warnings": """
        import warnings
        warnings.warn("shown: __main__'s deprecation", DeprecationWarning)
        warnings.warn("shown: a user warning")
        warnings.warn("hidden: pending", PendingDeprecationWarning)
        import helper
        helper.deprecated()
    """,
    "exit order": """
        import atexit, threading, time
        from concurrent.futures import ThreadPoolExecutor
        atexit.register(print, "atexit 1")
        atexit.register(print, "atexit 2")
        pool = ThreadPoolExecutor(2)
        print(pool.submit(lambda: "pool").result())
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread"))).start()
        print("end of script")
    """,
    "stdin": "import sys\nprint(repr(sys.stdin.read()))\n",
}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "helper.py").write_text(
        "import warnings\nNAME = 'helper'\n"
        "def deprecated():\n    warnings.warn('hidden: elsewhere', DeprecationWarning)\n"
    )
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "onpath.py").write_text("NAME = 'onpath'\n")
    return tmp_path


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_forked_script_gives_what_a_real_interpreter_gives(folder, name):
    script = folder / "scripts" / "script.py"
    script.write_text(textwrap.dedent(SCRIPTS[name]))
    env = {**os.environ, "MARK": "m", "PYTHONPATH": str(folder / "lib")}
    args = ["scripts/script.py", "an arg", "--flag"]  # relative, as a command line gives it
    real = subprocess.run(
        [sys.executable, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    forked = run_script(args, cwd=folder, env=env, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )
    assert forked.args == args
    expected = {"where": 3, "exit text": 1, "exception": 1, "chained": 1, "exit 256": 7}
    expected.update({"interrupt": -signal.SIGINT, "sigkill": -signal.SIGKILL})
    assert forked.returncode == expected.get(name, 0)


def test_dash_c_source_runs_in_a_fresh_main(tmp_path):
    source = "import sys, os\nprint(sys.argv, repr(sys.path[0]), os.getcwd(), __name__)"
    real = subprocess.run(
        [sys.executable, "-c", source, "x"], cwd=tmp_path, capture_output=True, text=True
    )
    forked = run_script(["-c", source, "x"], cwd=tmp_path)
    assert forked.returncode == 0 and forked.stdout == real.stdout
    assert forked.stdout == f"['-c', 'x'] '' {tmp_path} __main__\n"
    assert "conftest" not in run_script(["-c", "print(dir())"]).stdout  # not pytest's __main__


def test_nothing_passes_between_the_script_and_the_test_process(monkeypatch, tmp_path):
    """A test's in-process changes do not reach the script (the fork server was forked before
    any test), and the script's do not reach the test."""
    monkeypatch.setattr(registry, "SET_BY_THE_TEST", True, raising=False)
    monkeypatch.setenv("SET_BY_THE_TEST", "1")
    threads = torch.get_num_threads()
    source = """
import os, sys, torch
import imagebind_lite.registry as registry
print(hasattr(registry, "SET_BY_THE_TEST"), os.environ.get("SET_BY_THE_TEST"))
registry.SET_BY_THE_SCRIPT = True
os.environ["SET_BY_THE_SCRIPT"] = "1"
torch.set_num_threads(3)
torch.manual_seed(5)
sys.modules.pop("imagebind_lite.registry")
"""
    env = {k: v for k, v in os.environ.items() if k != "SET_BY_THE_TEST"}
    proc = run_script(["-c", source], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False None\n"
    assert not hasattr(registry, "SET_BY_THE_SCRIPT") and "SET_BY_THE_SCRIPT" not in os.environ
    assert torch.get_num_threads() == threads and sys.modules["imagebind_lite.registry"]


def test_the_environment_sets_torch_threads_and_the_rng_is_fresh():
    source = "import torch; print(torch.get_num_threads(), torch.initial_seed(), torch.rand(1))"
    one = run_script(["-c", source], env={**os.environ, "OMP_NUM_THREADS": "1"})
    two = run_script(["-c", source], env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert one.stdout.split()[0] == "1" and two.stdout.split()[0] == "2"
    # A fresh generator in each, as each new interpreter has: seeded from the OS (or torch's
    # fixed seed, in versions that have one), never the fork server's state.
    fixed = one.stdout.split()[1] == two.stdout.split()[1] == "67280421310721"
    assert fixed or one.stdout.split()[1:] != two.stdout.split()[1:]


def test_the_output_is_the_scripts_not_pytests(capfd):
    proc = run_script(["-c", "import os; print('out'); os.write(2, b'err\\n')"])
    assert (proc.stdout, proc.stderr) == ("out\n", "err\n")
    assert capfd.readouterr() == ("", "")


def test_a_timeout_kills_the_script_and_keeps_its_output():
    source = "import time; print('started', flush=True); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_script(["-c", source], timeout=1)
    assert time.monotonic() - start < 30 and info.value.stdout == "started\n"


def test_a_started_script_can_be_signalled_and_waited_for(tmp_path):
    ready = tmp_path / "ready"
    source = (
        f"import os, time; open({str(ready)!r}, 'w').close(); print(os.getsid(0)); time.sleep(60)"
    )
    proc = start_script(["-c", source], new_session=True)
    while not ready.exists():
        assert proc.poll() is None
        time.sleep(0.05)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
    assert proc.output()[0] == f"{proc.pid}\n"  # new_session: its own session


def test_imports_are_inherited_which_is_why_import_tests_use_a_real_interpreter():
    source = "import sys; print('open_clip' in sys.modules, 'torch' in sys.modules)"
    assert run_script(["-c", source]).stdout == "True True\n"
    with pytest.raises(ValueError, match="python -m"):
        run_script(["-m", "json.tool"])
