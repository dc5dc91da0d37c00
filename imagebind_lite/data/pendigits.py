"""Pen trajectories of handwritten digits (UCI pendigits, raw UNIPEN text; a copy ships in
``assets/pendigits``, see ATTRIBUTION.md) paired with UCI digit images of the same digit.

The reader reads the UNIPEN subset these files use: header keywords (``.INCLUDE``,
``.LEXICON``, ...; skipped), then per digit ``.SEGMENT DIGIT <strokes> ? "<label>"`` (strokes:
``N`` or ``N-M``, running stroke numbers), ``.COMMENT <label> <writer> <index>``, and one or
more ``.PEN_DOWN`` ... ``.PEN_UP`` strokes of integer ``x y`` points (``.DT`` between them,
skipped). Anything else raises ``UnipenError``: one line naming the file, the line and the
problem.

Splits: train = the 30 writers of ``pendigits-orig.tra``, eval = the 14 other writers of
``pendigits-orig.tes`` (their ids restart at 1 there; here they are 31-44). Each training digit
is paired with a random training image of its digit, drawn again every time it is read, with
the audio demo's pairing (``avmnist.PairedAudioImages``): the pen encoder sees images only
through the frozen anchor and never sees text. The images are not augmented, so the builder
embeds each once with the anchor (``avmnist.EmbeddedImages``, as the audio demo does) and
training batches carry those embeddings, not pixels.

Options: ``data.root`` (a folder holding ``pendigits-orig.tra.gz`` and ``pendigits-orig.tes.gz``;
default: the shipped copy), ``data.options.image_root`` (a folder with ``digits.csv.gz``; default:
the audio demo's), ``data.options.embed_images`` (default true; false sends pixels to the anchor
every step). With ``anchor.cache`` the trainer reads that cache instead.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..anchor import ASSETS
from . import avmnist
from .datasets import DatasetBundle, register_dataset

DEFAULT_ROOT = ASSETS / "pendigits"
TRAIN_FILE, TEST_FILE = "pendigits-orig.tra.gz", "pendigits-orig.tes.gz"
TEST_WRITER_OFFSET = 30  # .tes numbers its 14 writers from 1 again

_SEGMENT = re.compile(r'^\.SEGMENT\s+DIGIT\s+(\d+)(?:-(\d+))?\s+\S+\s+"(\d)"\s*$')
_INT = re.compile(r"[-+]?\d+")
_COMMENT = re.compile(r"^\.COMMENT\s+(\d)\s+(\d+)\s+(\d+)\s*$")


class UnipenError(ValueError):
    """A file that is not the UNIPEN pendigits uses; the message names the file and line."""


@dataclass
class PenDigit:
    label: int
    writer: int
    index: int  # the writer's sample number (.COMMENT's third field)
    strokes: list[np.ndarray]  # one int32 [points, 2] (x, y) array per pen-down stroke

    @property
    def points(self) -> int:
        return sum(len(s) for s in self.strokes)


def _lines(source) -> tuple[str, list[str]]:
    """(name for messages, text lines) of a path (gzip or plain) or an open file."""
    if isinstance(source, (str, Path)):
        name, path = str(source), Path(source)
        if not path.is_file():
            raise UnipenError(f"{name}: file not found")
        raw = path.read_bytes()
    else:
        name = str(getattr(source, "name", "<file>"))
        raw = source.read()
    if isinstance(raw, bytes):
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (EOFError, OSError, zlib.error) as err:
                raise UnipenError(f"{name}: damaged gzip file ({err})") from None
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError as err:
            why = f"byte {err.start} is not ASCII"
            raise UnipenError(f"{name}: not a UNIPEN text file ({why})") from None
    return name, raw.splitlines()


def read_unipen(source) -> list[PenDigit]:
    """A UNIPEN file (path to a plain or gzip file, or an open text/binary file) -> its digits."""
    name, lines = _lines(source)
    if not any(line.strip() for line in lines):
        raise UnipenError(f"{name}: empty file, not UNIPEN")
    digits: list[PenDigit] = []
    segment = None  # [line number, label, first stroke, last stroke, comment, strokes]
    stroke: int | None = None  # index of the first line after the open .PEN_DOWN
    strokes_seen, after = 0, 0
    # Only keyword lines are visited one by one: the points between them are read per stroke.
    keywords = [i for i, line in enumerate(lines) if line.startswith(".")]
    for i in [*keywords, len(lines)]:
        if stroke is None:
            _blank(lines, after, i, name, segment is not None)
        if i == len(lines):
            break
        line, where, after = lines[i], f"{name}:{i + 1}", i + 1
        keyword = line.split(None, 1)[0]
        if stroke is not None and keyword != ".PEN_UP":
            raise UnipenError(f"{where}: {keyword} inside a stroke (no .PEN_UP before it)")
        if keyword == ".SEGMENT":
            if segment is not None:
                digits.append(_finish(segment, name))
            match = _SEGMENT.match(line)
            if match is None:
                raise UnipenError(
                    f'{where}: expected .SEGMENT DIGIT <N or N-M> ? "<digit>", got {line!r}'
                )
            first, last, label = match.groups()
            segment = [i + 1, int(label), int(first), int(last or first), None, []]
            if segment[2] != strokes_seen or segment[3] < segment[2]:
                raise UnipenError(
                    f"{where}: segment names strokes {first}-{last or first}, but the next "
                    f"stroke is number {strokes_seen}"
                )
        elif keyword == ".COMMENT" and segment is not None:
            match = _COMMENT.match(line)
            if match is None:
                raise UnipenError(f"{where}: expected .COMMENT <digit> <writer> <index>")
            segment[4] = tuple(int(v) for v in match.groups())
        elif keyword == ".PEN_DOWN":
            if segment is None:
                raise UnipenError(f"{where}: .PEN_DOWN before any .SEGMENT DIGIT")
            stroke = i + 1
        elif keyword == ".PEN_UP":
            if stroke is None:
                raise UnipenError(f"{where}: .PEN_UP without .PEN_DOWN")
            segment[5].append(_points(lines, stroke, i, name))
            stroke, strokes_seen = None, strokes_seen + 1
    if stroke is not None:
        raise UnipenError(f"{name}: ends inside a stroke (no .PEN_UP): truncated")
    if segment is None:
        raise UnipenError(f"{name}: no .SEGMENT DIGIT: not a UNIPEN digit file")
    digits.append(_finish(segment, name))
    return digits


def _blank(lines: list[str], start: int, end: int, name: str, in_segment: bool) -> None:
    """Outside strokes, only keyword lines and blank lines."""
    for n in range(start, end):
        if lines[n].strip():
            what = "point outside .PEN_DOWN" if in_segment else "not a UNIPEN keyword line"
            raise UnipenError(f"{name}:{n + 1}: {what}: {lines[n].strip()[:40]!r}")


def _points(lines: list[str], start: int, end: int, name: str) -> np.ndarray:
    """The points of ``lines[start:end]`` (a stroke's rows) -> int32 [points, 2]."""
    rows = [row.split() for row in lines[start:end] if row.strip()]
    if not rows:
        raise UnipenError(f"{name}:{end + 1}: empty stroke (.PEN_DOWN then .PEN_UP)")
    try:
        values = np.array(rows, dtype=np.int32)
        if values.ndim == 2 and values.shape[1] == 2:
            return values
    except (ValueError, OverflowError):
        pass  # ragged rows or non-integers: name the line
    for number in range(start, end):
        fields = lines[number].split()
        if fields and not (len(fields) == 2 and all(_INT.fullmatch(f) for f in fields)):
            raise UnipenError(
                f"{name}:{number + 1}: expected a point 'x y' (two integers), "
                f"got {lines[number].strip()[:40]!r}"
            )
    raise UnipenError(f"{name}:{start}: stroke coordinates out of range")


def _finish(segment: list, name: str) -> PenDigit:
    number, label, first, last, comment, strokes = segment
    where = f"{name}:{number}"
    if comment is None:
        raise UnipenError(f"{where}: segment has no .COMMENT <digit> <writer> <index>")
    if comment[0] != label:
        raise UnipenError(f"{where}: segment says digit {label}, its .COMMENT says {comment[0]}")
    if len(strokes) != last - first + 1:
        raise UnipenError(
            f"{where}: segment names {last - first + 1} strokes, {len(strokes)} follow: truncated"
        )
    return PenDigit(label=label, writer=comment[1], index=comment[2], strokes=strokes)


def load_pendigits(root: Path = DEFAULT_ROOT) -> tuple[list[PenDigit], list[PenDigit]]:
    """(train digits, test digits) with test writers renumbered 31-44."""
    root = Path(root)
    train, test = (read_unipen(root / file) for file in (TRAIN_FILE, TEST_FILE))
    for digit in test:
        digit.writer += TEST_WRITER_OFFSET
    return train, test


def digit_id(digit: PenDigit) -> str:
    return f"pen-w{digit.writer:02d}-{digit.index:03d}"


RESAMPLE = ("time", "arc")


def to_tensor(
    strokes, length: int = 64, resample: str = "time", delta_scale: float = 10.0, **_
) -> torch.Tensor:
    """Strokes (int or float arrays [points, 2]) -> float32 [5, length], the pen modality's
    input (``imagebind_lite/modalities/pen.py`` describes the channels)."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample: expected one of {', '.join(RESAMPLE)}, got {resample!r}")
    strokes = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes]
    strokes = [s for s in strokes if len(s)]
    if not strokes:
        raise ValueError("a pen digit needs at least one point")
    points = np.concatenate(strokes)
    points -= points.mean(0)
    points /= max(float(np.abs(points).max()), 1e-12)
    starts = np.cumsum([len(s) for s in strokes])[:-1]  # first point of strokes 2, 3, ...
    if resample == "arc":
        step = np.linalg.norm(np.diff(points, axis=0), axis=1)
        step[starts - 1] = 0  # the pen travels in the air between strokes: no ink
        where = np.concatenate([[0.0], np.cumsum(step)])
        # Equal arc lengths cannot order points that a still pen repeats: keep time order.
        where += np.arange(len(points)) * 1e-9
    else:
        where = np.arange(len(points), dtype=np.float64)
    grid = np.linspace(0.0, where[-1], length)
    x = np.interp(grid, where, points[:, 0])
    y = np.interp(grid, where, points[:, 1])
    lift = np.zeros(length)
    if len(starts):
        lift[np.rint(where[starts] / where[-1] * (length - 1)).astype(int)] = 1.0
    dx, dy = (np.diff(v, prepend=v[0]) * delta_scale for v in (x, y))
    return torch.from_numpy(np.stack([x, y, dx, dy, lift]).astype(np.float32))


@register_dataset("pendigits", modalities=("pen",))
def build_pendigits(cfg, anchor, spec) -> DatasetBundle:
    root = Path(cfg.data.root) if cfg.data.root else DEFAULT_ROOT
    image_root = Path(cfg.data.options.get("image_root") or avmnist.DEFAULT_ROOT)
    options = {**spec.preprocess, **cfg.data.preprocess}
    train_digits, test_digits = load_pendigits(root)

    def tensors(digits):
        feats = torch.stack([to_tensor(d.strokes, **options) for d in digits])
        return feats, torch.tensor([d.label for d in digits]), [digit_id(d) for d in digits]

    images, image_labels = avmnist.load_digit_images(image_root)
    train_images = avmnist.image_split(len(images))  # the images the shipped anchor trained on
    pixels = anchor.normalize_pixels(avmnist.digits_to_pixels(images, anchor.image_size[0]))

    def augment(x, generator=None):
        return spec.augment(x, train=True, generator=generator, **options)

    train = avmnist.PairedAudioImages(
        *tensors(train_digits),
        pixels[train_images],
        image_labels[train_images],
        "pen",
        augment,
        seed=cfg.seed,
        # The same view ids as the audio demo: rows of the whole digit table.
        image_ids=[f"digit-image-{int(i)}" for i in torch.nonzero(train_images).flatten()],
    )
    if not cfg.anchor.cache and cfg.data.options.get("embed_images", True):
        # With anchor.cache, the trainer reads that cache instead.
        train = avmnist.EmbeddedImages(train, anchor)
    test = avmnist.ClipSet(*tensors(test_digits), "pen")
    return DatasetBundle(
        train=train,
        eval=test,
        classnames=avmnist.DIGIT_NAMES,
        templates=avmnist.DIGIT_TEMPLATES,
        info={
            "split": f"by writer: train = the 30 of {TRAIN_FILE}, eval = the 14 of {TEST_FILE}",
            "train_writers": len({d.writer for d in train_digits}),
            "test_writers": len({d.writer for d in test_digits}),
            "train_digits": len(train),
            "test_digits": len(test),
            "train_images": int(train_images.sum()),
        },
    )
