"""Files: atomic writes, ``KEY=VALUE`` options, and the file-extension tables. One of each, for
the whole package (a leaf: it imports nothing of the package).

Every write goes to a temporary sibling first, is flushed to disk and renamed into place, so a
crash mid-write never leaves a corrupt file (or folder) under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

# Readers accept these (lower-case) suffixes; the modality specs' ``extensions`` name them.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")
VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _follow_umask(path: Path) -> None:
    # Some writers (safetensors) create files owner-only; shared folders expect the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it is flushed and
    renamed to ``path``. On an exception the temporary file is removed and ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        _follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_path)`` then rename into place (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dump_options) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, **dump_options))


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` atomically
    (a previous folder of that name is swapped out, then removed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def parse_key_values(items: Sequence[str], what: str = "option") -> dict:
    """``["a=1", "b=[x, y]"]`` -> ``{"a": 1, "b": ["x", "y"]}``, values parsed as YAML (an empty
    value is None). A malformed item raises ValueError naming it."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value else None
        except yaml.YAMLError as err:
            raise ValueError(
                f"{what} {key.strip()}: cannot parse value {value!r} ({err})"
            ) from None
    return out


def load_error_line(err: BaseException, limit: int = 300) -> str:
    """One line from an error loading weights: torch's ``Error(s) in loading state_dict`` gives
    its first mismatch (and how many more), anything else its first line."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()] or [""]
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return lines[1][:limit] + more
    return lines[0] if len(lines[0]) <= limit else lines[0][:limit] + "..."
