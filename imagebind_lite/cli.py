"""Command-line entry shared by the thin ``train/*.py`` scripts."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config


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
    try:
        cfg = load_config(resolve_config_arg(args.config, default_config), args.overrides)
        from .train import train

        metrics = train(cfg, resume=args.resume)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        print(json.dumps(shown, indent=2))
    return metrics
