"""Command-line entry shared by the thin ``train/*.py`` scripts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .train import train

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def default_config_path(name: str | None) -> Path | None:
    """``configs/NAME`` next to the package (a source checkout), else the built-in defaults."""
    if name is None:
        return None
    path = REPO_CONFIGS / name
    return path if path.is_file() else None


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
    config_path = args.config or default_config_path(default_config)
    try:
        cfg = load_config(config_path, args.overrides)
        metrics = train(cfg, resume=args.resume)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        print(json.dumps(shown, indent=2))
    return metrics
