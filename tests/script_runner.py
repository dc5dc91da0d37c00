"""Running ``python SCRIPT ARGS`` for a test without starting an interpreter: a fork of a process
that has imported the heavy libraries (torch, open_clip, accelerate, ...) already. Used through
``conftest.run_script`` / ``conftest.fork_python``; the rule is in ``run_script``'s docstring.

A test that runs a script to see what the script does (exit status, output, files written)
need not pay a fresh interpreter's ~5 s of imports. The separate interpreter itself is what few
tests are about (imports, packaging, signals to a launcher or a process group, multi-process
launches, ``python -m``); those keep ``run_python`` or subprocess.

The forks come from a fork server: a process forked from the test process at start-up
(``pytest_configure``), before any test ran, so that what a test did in-process (a modality it
registered, a function it monkeypatched, torch's global state) never reaches a script. At its
first request it imports ``WARM_MODULES``; for each request it forks a waiter, which forks the
script's process, reports its pid, waits for it and reports its wait status on the request's
own socket (so scripts may run side by side, and a test may signal one by its pid).
"""

import atexit
import builtins
import contextlib
import faulthandler
import gc
import importlib
import io
import json
import linecache
import locale
import logging
import os
import pickle
import pkgutil
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the scripts import, imported once by the fork server before its first child (and every
# module of imagebind_lite: its modules register nothing beyond what the package import does).
WARM_MODULES = (
    "numpy",
    "PIL.Image",
    "yaml",
    "h5py",
    "scipy.io",
    "soundfile",
    "safetensors.torch",
    "torch",
    "torchaudio",
    "torchvision",
    "timm",
    "open_clip",
    "accelerate",
    "torch.utils.tensorboard",
    "imagebind_lite",
)
_SERVER = None


def run_script(args, cwd=REPO, env=None, timeout=600, new_session=False):
    """``python SCRIPT ARGS`` (``args``: ``[SCRIPT, *ARGS]``, or ``["-c", SOURCE, *ARGS]``) from
    ``cwd`` with the environment ``env`` (default: this process's), as
    ``subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout, start_new_session=new_session)`` runs it, but in a fork of a process that
    has imported the heavy libraries already: no interpreter start-up.

    The rule: a test runs a script in a separate interpreter only where the separate
    interpreter is what it tests; everywhere else it uses this.

    Faithful to a real ``python SCRIPT``: the exit status (0 at the end; ``sys.exit(n)``: n;
    ``sys.exit("text")``: the text on stderr and 1; an uncaught exception: its traceback on
    stderr and 1; killed by signal N: -N; an uncaught Ctrl-C: -SIGINT); stdout and stderr, each
    on its own (line-buffered; unbuffered with PYTHONUNBUFFERED), decoded and newline-translated
    as ``text=True`` does; the working directory; the environment (``os.environ`` and the C
    environment; torch's thread count from OMP_NUM_THREADS when it is set, since the inherited
    thread pool does not read the variable again); ``sys.argv``; ``sys.path`` (the script's real
    folder, or "" for ``-c``, then PYTHONPATH, then a fresh interpreter's entries); ``__main__``
    (``__file__`` absolute, as Python sets it); warning filters (Python's defaults and
    PYTHONWARNINGS), logging, signal handlers, hooks and torch's and numpy's global RNGs as a
    fresh interpreter has them; isolation: a separate process, so nothing it does reaches the
    test process, and nothing a test did in-process reaches it (the fork server was forked
    before any test ran). At the end, as interpreter exit does (``_finish``): threads are
    stopped and joined, the ``atexit`` functions registered while the script ran are called
    (last first), multiprocessing's exit runs (its finalizers; child processes ended and
    joined), logging is flushed; then ``os._exit``, so the fork never returns into pytest.

    What differs: the modules of ``WARM_MODULES`` and the whole ``imagebind_lite`` package are
    imported already, at the fork server's first request and with the test process's
    environment of then; what they did at import time (an ``atexit`` function, never called
    here; a warning, not shown again; an environment variable read) is inherited. So a test
    about what a script imports, how it starts or exits, or its start-up time, must use a real
    subprocess (``run_python``). ``python -m MODULE`` is not supported (use ``run_python``).
    """
    return start_script(args, cwd=cwd, env=env, new_session=new_session).result(timeout)


def start_script(args, cwd=REPO, env=None, new_session=False) -> "ForkedScript":
    """``run_script`` without waiting: the running script, as ``subprocess.Popen`` would give
    it (its output goes to files, read at the end)."""
    return ForkedScript(args, cwd, env, new_session)


class ForkedScript:
    """A script running in a fork (``start_script``): ``pid``, ``poll()``, ``wait(timeout)``,
    ``send_signal(sig)``, ``kill()``, ``returncode``, and ``result(timeout)``, a
    ``CompletedProcess`` as ``subprocess.run`` returns it (on a timeout the script is killed and
    ``TimeoutExpired`` raised with the output so far)."""

    def __init__(self, args, cwd=REPO, env=None, new_session=False):
        self.args = [os.fspath(a) for a in args]
        if not self.args or self.args[0].startswith("-") and self.args[0] != "-c":
            raise ValueError(
                f"run_script: a script or -c SOURCE, not {self.args[:1]} (python -m: run_python)"
            )
        self.returncode = None
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        request = {
            "args": self.args,
            "cwd": os.fspath(cwd),
            "env": dict(os.environ if env is None else env),
            "new_session": new_session,
        }
        self._sock = _server().submit(request, (self._out.fileno(), self._err.fileno()))
        self.pid = self._receive(time.monotonic() + 600, "pid")  # the first waits for imports
        if self.pid is None:
            raise RuntimeError("run_script: the fork server did not start the script in 600 s")

    def _receive(self, deadline, kind):
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([self._sock], [], [], wait)[0]:
            return None
        data = self._sock.recv(1 << 16)
        if not data:
            raise RuntimeError("run_script: the script's waiter ended without its status")
        got, value = pickle.loads(data)
        if got == "error":
            raise RuntimeError(f"run_script: the fork server failed:\n{value}")
        assert got == kind, (got, kind)
        return value

    def poll(self):
        if self.returncode is None:
            status = self._receive(time.monotonic(), "status")
            if status is not None:
                self._done(status)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            status = self._receive(deadline, "status")
            if status is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._done(status)
        return self.returncode

    def _done(self, status):
        self.returncode = os.waitstatus_to_exitcode(status)
        self._sock.close()

    def send_signal(self, sig):
        if self.poll() is None:  # not reaped yet: the pid is still the script's
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        return _decoded(self._out), _decoded(self._err)

    def result(self, timeout=None) -> subprocess.CompletedProcess:
        try:
            self.wait(timeout)
        except BaseException as err:  # a timeout, or the test interrupted: end the script
            self.kill()
            self.wait()
            if isinstance(err, subprocess.TimeoutExpired):
                out, errors = self.output()
                raise subprocess.TimeoutExpired(self.args, timeout, out, errors) from None
            raise
        return subprocess.CompletedProcess(self.args, self.returncode, *self.output())


def _decoded(file) -> str:
    """What ``subprocess.run(..., text=True)`` makes of output: the locale's encoding and
    universal newlines."""
    file.seek(0)
    text = file.read().decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------- the fork server


class _ForkServer:
    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lock = threading.Lock()
        pid = os.fork()
        if pid == 0:  # the server: it never returns into the test process's code
            try:
                ours.close()
                _serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.sock = pid, ours

    def submit(self, request, fds) -> socket.socket:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.lock:
                socket.send_fds(self.sock, [pickle.dumps(request)], [theirs.fileno(), *fds])
        finally:
            theirs.close()
        return mine

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:  # not this process's child (a fork of the test process)
            return False

    def close(self):
        self.sock.close()  # the server reads end-of-file and exits
        deadline = time.monotonic() + 5
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)


def start_fork_server():
    """The fork server of this process, started now if it is not running (call it before any
    test runs: what the process holds then is what every script starts from)."""
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = _ForkServer()
    return _SERVER


_server = start_fork_server


def stop_fork_server():
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None


def _serve(sock):
    """The fork server's loop, in its own process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the tests and the scripts
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # Let go of the test process's pipes and sockets (pytest-xdist's channel, pytest's saved
    # stdout): whoever reads them must see them close when the test process closes them.
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd not in (sock.fileno(), devnull):
            with contextlib.suppress(OSError):
                mode = os.fstat(fd).st_mode
                if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                    os.dup2(devnull, fd)
    # Streams, warnings and logging of its own: the test process's may hold locks of threads
    # that the fork did not copy.
    _fresh_streams(unbuffered=True)
    warnings.showwarning = _show_warning
    logging.getLogger().handlers.clear()
    base_path = None
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 24, 3)
        except InterruptedError:
            continue
        if not data:
            return  # the test process has closed its end
        try:
            request = pickle.loads(data)
            if base_path is None:
                base_path = _warm_up()
            request["base_path"] = base_path
        except BaseException:
            with contextlib.suppress(OSError):
                os.write(fds[0], pickle.dumps(("error", traceback.format_exc())))
            request = None
        if request is not None and os.fork() == 0:  # the waiter
            try:
                sock.close()
                _wait_for(request, *fds)
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(ChildProcessError):  # reap the waiters that are done
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def _warm_up() -> list[str]:
    """Import what the scripts import; return a fresh interpreter's sys.path after its first
    entry (the script's folder), without PYTHONPATH."""
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import imagebind_lite

    for module in pkgutil.walk_packages(imagebind_lite.__path__, "imagebind_lite."):
        with contextlib.suppress(ImportError):
            importlib.import_module(module.name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"]
    base = json.loads(subprocess.run(probe, env=env, capture_output=True, check=True).stdout)
    gc.collect()
    gc.freeze()  # the forks share these pages: no collection in them writes to them
    return base


def _wait_for(request, reply, out, err):
    """The waiter: fork the script's process, report its pid, then its wait status."""
    pid = os.fork()
    if pid == 0:
        os.close(reply)
        _script_process(request, out, err)  # never returns
    os.close(out)
    os.close(err)
    os.write(reply, pickle.dumps(("pid", pid)))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os.write(reply, pickle.dumps(("status", status)))


# ----------------------------------------------------------------------------- the script's process

_TORCH_FIXED_SEED = 67280421310721  # torch's fresh generator, in versions that fix it
_BY_SIGINT = -signal.SIGINT  # an uncaught KeyboardInterrupt: Python exits by SIGINT


def _script_process(request, out, err):
    code = 1
    try:
        code = _run_main(request, out, err)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        _flush()
        if code == _BY_SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code if 0 <= code <= 255 else 1)


def _fresh_streams(unbuffered: bool):
    encoding = locale.getpreferredencoding(False)

    def stream(fd, errors):
        raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding, errors, line_buffering=True, write_through=True)

    sys.stdin = sys.__stdin__ = open(0, encoding=encoding, closefd=False)
    sys.stdout = sys.__stdout__ = stream(1, "strict")
    sys.stderr = sys.__stderr__ = stream(2, "backslashreplace")


def _run_main(request, out, err) -> int:
    """Set this process up as a fresh ``python SCRIPT`` would be and run the script; its exit
    status."""
    args, env = request["args"], request["env"]
    if request["new_session"]:
        os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets them
    stdin = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    _fresh_streams(unbuffered=bool(env.get("PYTHONUNBUFFERED")))
    if faulthandler.is_enabled():
        faulthandler.disable()
    if env.get("PYTHONFAULTHANDLER"):
        faulthandler.enable()
    sys.excepthook, sys.unraisablehook = sys.__excepthook__, sys.__unraisablehook__
    threading.excepthook = threading.__excepthook__

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    if args[0] == "-c":
        filename, source, first = "<string>", args[1], ""
        argv = ["-c", *args[2:]]
    else:
        filename = os.path.abspath(args[0])
        with io.open_code(filename) as handle:
            source = handle.read()
        argv, first = list(args), os.path.dirname(os.path.realpath(args[0]))
    extra = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *dict.fromkeys(extra), *request["base_path"]]
    sys.argv, sys.orig_argv = argv, [sys.executable, *args]
    importlib.invalidate_caches()  # a file written since the server's imports is found
    linecache.clearcache()

    # Python's default warning filters, then PYTHONWARNINGS (each entry in front, as -W does).
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"__main__\Z")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
        warnings.simplefilter("ignore", category, append=True)
    warnings.simplefilter("ignore", ResourceWarning, append=True)
    for option in env.get("PYTHONWARNINGS", "").split(","):
        if option.strip():
            _warning_option(option)
    warnings.showwarning = _show_warning
    warnings.onceregistry.clear()
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)

    import torch

    if torch.initial_seed() == _TORCH_FIXED_SEED:  # a torch whose fresh generator is fixed
        torch.default_generator.manual_seed(_TORCH_FIXED_SEED)
    else:  # seeded from the OS at import, as this torch does
        torch.default_generator.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # from the OS, as at a fresh import
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))

    exits = []  # what the script registers with atexit: called at its end, as at exit

    def register(func, *a, **kw):
        exits.append((func, a, kw))
        return func

    def unregister(func):
        exits[:] = [e for e in exits if e[0] != func]

    atexit.register, atexit.unregister = register, unregister
    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=builtins, __spec__=None, __cached__=None)
    if args[0] != "-c":
        main.__file__ = filename
    sys.modules["__main__"] = main
    try:
        exec(compile(source, filename, "exec", dont_inherit=True), main.__dict__)
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except BaseException as error:  # reported as the interpreter does, without this frame
        _flush()
        error.__traceback__ = error.__traceback__.tb_next
        sys.excepthook(type(error), error, error.__traceback__)
        code = _BY_SIGINT if isinstance(error, KeyboardInterrupt) else 1
    return _finish(code, exits)


def _exit_status(value) -> int:
    """The status ``sys.exit(value)`` gives: None 0, an int itself (mod 256), else the value
    printed on stderr and 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    _flush()
    print(value, file=sys.stderr)
    return 1


def _finish(code, exits) -> int:
    """What interpreter exit does after the script, in its order: threading's exit functions
    (a ThreadPoolExecutor's workers are told to stop) and the join of non-daemon threads, the
    atexit functions (last registered first: the script's own, then multiprocessing's, which
    runs its finalizers, e.g. a Manager's shutdown, and ends and joins child processes, then
    logging's flush). The two stdlib functions for threading and multiprocessing are private,
    but the very ones exit calls; without them a pool's idle worker threads would be waited for
    for ever, or a Manager's process left running."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    multiprocessing_exit = None
    if "multiprocessing.util" in sys.modules:
        multiprocessing_exit = getattr(sys.modules["multiprocessing.util"], "_exit_function", None)
    if multiprocessing_exit is not None and all(e[0] is not multiprocessing_exit for e in exits):
        exits.insert(0, (multiprocessing_exit, (), {}))  # registered at its import: runs late
    for func, args, kwargs in reversed(exits):
        try:
            func(*args, **kwargs)
        except SystemExit as stop:
            code = _exit_status(stop.code)
        except BaseException:
            print(f"Exception ignored in atexit callback: {func!r}", file=sys.stderr)
            traceback.print_exc()
    logging.shutdown()
    _flush()
    return code


def _flush():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = warnings.formatwarning(message, category, filename, lineno, line)
    with contextlib.suppress(OSError, ValueError):
        (file or sys.stderr).write(text)


def _warning_option(option):
    """One PYTHONWARNINGS entry, ``action:message:category:module:lineno``, as Python reads
    it (an invalid one is reported on stderr and ignored)."""
    try:
        parts = [p.strip() for p in option.split(":")]
        if len(parts) > 5:
            raise ValueError(f"too many fields (max 5): {option!r}")
        action, message, category, module, lineno = parts + [""] * (5 - len(parts))
        if action == "all":
            action = "always"
        names = ("default", "always", "ignore", "module", "once", "error")
        action = next(n for n in names if n.startswith(action)) if action else "default"
        kind = Warning
        if category:
            owner, _, name = category.rpartition(".")
            kind = getattr(importlib.import_module(owner) if owner else builtins, name)
        module = re.escape(module) + r"\Z" if module else ""
        warnings.filterwarnings(action, re.escape(message), kind, module, int(lineno or 0))
    except Exception as err:
        print(f"Invalid -W option ignored: {err}", file=sys.stderr)
