"""Command-line entry shared by the thin ``train/*.py`` scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .bind import bind, combine
from .config import BindConfig, ConfigError, load_config, resolve_config_arg, shipped_config
from .threads import use_threads
from .train import train
from .training.stopping import TrainingStopped

# Kept importable from here (scripts and tests): the shipped configs live in config.py.
__all__ = [
    "OneLineArgumentParser",
    "available_device",
    "existing_folder",
    "positive_int",
    "one_line_errors",
    "resolve_config_arg",
    "run_script",
    "shipped_config",
    "train_main",
    "bind_main",
]

TRUST_CODE_HELP = "run a run folder's own modality code (modality.py); only for runs you trust"

# What bad input raises (a missing file or folder, an unknown name, a malformed manifest, a
# missing split, an empty dataset): each carries a one-line message naming the thing.
EXPECTED_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, KeyError, ValueError)


def one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split())


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """The context of every script's work. Sets torch's CPU threads by the rule of
    ``imagebind_lite/threads.py`` (a training run applies its config's ``threads`` again in the
    loop). Turns an expected failure into one line on stderr and exit status 1, not a
    traceback; a run stopped by a signal (with its checkpoint saved) exits 128 + the signal's
    number."""
    try:
        use_threads()
        yield
    except TrainingStopped as stop:
        if stop.main_process:  # one line for the run, not one per process
            sys.stderr.write(f"{stop}\n")
        sys.exit(128 + stop.signum)  # the shell's status for death by that signal
    except ConfigError as err:
        sys.exit(f"config error: {one_line(err)}")
    except EXPECTED_ERRORS as err:
        sys.exit(f"error: {one_line(err)}")


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors (an unknown option value, a missing or
    malformed argument) are one line, ``error: SCRIPT: message``, and exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {' '.join(message.split())}\n")
        sys.exit(2)


def existing_folder(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a folder; else FileNotFoundError / NotADirectoryError
    naming ``what`` (the argument) and the path."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{what}: no such folder: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is a file, not a folder")
    return folder


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (a count of steps, files, samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device_problem(text: str) -> str | None:
    """Why this machine cannot run on device ``text``, or None when it can."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"unknown device {text!r} (cpu, cuda, cuda:N or mps)"
    if device.type == "cpu":
        return None
    have = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if have is None or have.type != device.type:
        found = f"its accelerator is {have.type}" if have else "it has none"
        name = "CUDA GPU" if device.type == "cuda" else f"{device.type} device"
        return f"no {name} on this machine ({found}; use --device cpu)"
    count = torch.accelerator.device_count()
    if (device.index or 0) >= count:
        return f"this machine has {count} {device.type} device(s)"
    return None


def available_device(text: str) -> torch.device:
    """``--device TEXT`` as a ``torch.device`` this machine has, else a one-line ValueError."""
    problem = _device_problem(text)
    if problem:
        raise ValueError(f"--device {text}: {problem}")
    return torch.device(text)


def device_arg(text: str) -> str:
    """An argparse ``type`` for ``--device``: the text, once this machine is known to have it."""
    problem = _device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def run_script(main: Callable, ok: Callable = lambda result: True) -> None:
    """A script's ``__main__``: run ``main()`` under :func:`one_line_errors`; exit 1 unless
    ``ok(result)`` (e.g. nothing was written)."""
    with one_line_errors():
        result = main()
    sys.exit(0 if ok(result) else 1)


def train_main(default_config: str | None, argv: list[str] | None = None) -> dict:
    """``default_config``: a file in ``configs/``, or None to start from the dataclass defaults."""
    parser = OneLineArgumentParser(
        description="Align a modality encoder to the frozen CLIP anchor.",
        epilog="Any config field can be overridden: section.field=value, e.g. optim.lr=1e-3",
    )
    default_help = f"configs/{default_config}" if default_config else "the config.py defaults"
    parser.add_argument("--config", help=f"YAML config (default: {default_help})")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the latest run of this config (or RUN_DIR / a checkpoint folder) "
        "from its last checkpoint; auto: the latest run if there is one, else a new run",
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # ``--resume field=value``: argparse took an override for the optional RUN_DIR.
        args.overrides.insert(0, args.resume)
        args.resume = True
    with one_line_errors():
        cfg = load_config(resolve_config_arg(args.config, default_config), args.overrides)
        metrics = train(cfg, resume=args.resume)
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        print(json.dumps(shown, indent=2))
    return metrics


def bind_main(argv: list[str] | None = None) -> dict | None:
    """``train/bind.py``: several modalities in one run, or ``--from RUN... --out DIR``."""
    parser = OneLineArgumentParser(
        description="Bind several modalities to the frozen CLIP anchor in one run (one space), "
        "or combine single-modality runs that share an anchor into one bound folder.",
        epilog="Any config field can be overridden: section.field=value, e.g. "
        "modalities.audio.data.batch_size=64",
    )
    parser.add_argument("--config", help="YAML config (default: configs/bind.yaml)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the latest bind run (or RUN_DIR / a checkpoint) from its last "
        "checkpoint; auto: the latest run if there is one, else a new run",
    )
    parser.add_argument("--from", dest="runs", nargs="+", metavar="RUN", help="runs to combine")
    parser.add_argument("--out", help="the bound folder that --from writes")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = True
    if args.runs is not None:
        if not args.out or args.overrides or args.resume:
            parser.error("--from RUN... takes --out DIR and nothing else")
        with one_line_errors():
            if Path(args.out).exists():
                raise ConfigError(f"--out: {args.out} exists; name a new folder")
            out = combine(args.runs, args.out)
        print(f"wrote {out}")
        return None
    with one_line_errors():
        path = resolve_config_arg(args.config, "bind.yaml")
        cfg = load_config(path, args.overrides, cls=BindConfig)
        metrics = bind(cfg, resume=args.resume)
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        print(json.dumps(shown, indent=2))
    return metrics
