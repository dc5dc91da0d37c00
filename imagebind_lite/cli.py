"""Command-line entry shared by the thin ``train/*.py`` scripts."""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import ConfigError, load_config
from .train import train

TRUST_CODE_HELP = "run a run folder's own modality code (modality.py); only for runs you trust"

# What bad input raises (a missing file or folder, an unknown name, a malformed manifest, a
# missing split, an empty dataset): each carries a one-line message naming the thing.
EXPECTED_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, KeyError, ValueError)


def one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split())


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn an expected failure into one line on stderr and exit status 1, not a traceback."""
    try:
        yield
    except ConfigError as err:
        sys.exit(f"config error: {one_line(err)}")
    except EXPECTED_ERRORS as err:
        sys.exit(f"error: {one_line(err)}")


def run_script(main: Callable, ok: Callable = lambda result: True) -> None:
    """A script's ``__main__``: run ``main()`` under :func:`one_line_errors`; exit 1 unless
    ``ok(result)`` (e.g. nothing was written)."""
    with one_line_errors():
        result = main()
    sys.exit(0 if ok(result) else 1)


def shipped_config(name: str) -> Path:
    """A config shipped with the package (``audio.yaml`` or ``audio``): the top-level
    ``configs/`` of the source tree, installed as ``imagebind_lite.configs``."""
    file = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    try:
        folder = importlib.resources.files("imagebind_lite.configs")
    except ModuleNotFoundError:
        raise ConfigError(
            "the shipped configs are not installed: install the package (pip install -e .)"
        ) from None
    path = Path(str(folder / file))
    if not path.is_file():
        known = sorted(p.name for p in Path(str(folder)).glob("*.yaml"))
        raise ConfigError(f"no shipped config {file!r}; shipped: {', '.join(known)}")
    return path


def resolve_config_arg(value: str | None, default: str | None) -> Path | None:
    """``--config``: a YAML file, else the name of a shipped config; without it, the script's
    own shipped config (None: the dataclass defaults)."""
    if value is None:
        return shipped_config(default) if default else None
    path = Path(value)
    if path.is_file() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path  # load_config names a missing file in one line
    return shipped_config(value)


def train_main(default_config: str | None, argv: list[str] | None = None) -> dict:
    """``default_config``: a file in ``configs/``, or None to start from the dataclass defaults."""
    parser = argparse.ArgumentParser(
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
        "from its last checkpoint",
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
