"""Pen trajectories: the UNIPEN reader on the shipped pendigits files."""

import gzip
import io

import numpy as np
import pytest

from imagebind_lite.anchor import ASSETS
from imagebind_lite.data.pendigits import UnipenError, load_pendigits, read_unipen

ROOT = ASSETS / "pendigits"
TRA, TES = ROOT / "pendigits-orig.tra.gz", ROOT / "pendigits-orig.tes.gz"
SEGMENT = '.SEGMENT DIGIT 0 ? "4"\n.COMMENT 4 1 1\n'  # a four, writer 1, sample 1
HEADER = '.INCLUDE        dene.doc\n\n.LEXICON "0" "1" "2" "3" "4" "5" "6" "7" "8" "9"\n'


@pytest.fixture(scope="module")
def tra():
    return read_unipen(TRA)


def raw_lines(path=TRA):
    with gzip.open(path, "rt") as handle:
        return handle.read().splitlines(keepends=True)


def test_reader_counts_writers_and_a_digit_checked_by_hand(tra):
    tes = read_unipen(TES)
    assert (len(tra), len(tes)) == (7494, 3498)
    assert len({d.writer for d in tra}) == 30 and len({d.writer for d in tes}) == 14
    assert {d.writer for d in tes} == set(range(1, 15))  # .tes numbers its writers from 1
    train_digits, test_digits = load_pendigits(ROOT)  # 44 distinct writers
    assert {d.writer for d in test_digits} == set(range(31, 45))
    assert {d.writer for d in train_digits} == set(range(1, 31))
    # zcat pendigits-orig.tra.gz | head: .SEGMENT DIGIT 0 ? "8" / .COMMENT 8 12 224 / .PEN_DOWN
    # 267 333 / 267 336 / 267 339 ... one stroke of 86 points.
    first = tra[0]
    assert (first.label, first.writer, first.index) == (8, 12, 224)
    assert len(first.strokes) == 1 and first.strokes[0].dtype == np.int32
    assert first.strokes[0][:3].tolist() == [[267, 333], [267, 336], [267, 339]]
    assert first.strokes[0][-1].tolist() == [259, 330]
    # .SEGMENT DIGIT 9427-9428 ? "4" / .COMMENT 4 27 61: two strokes.
    four = next(d for d in tra if (d.writer, d.index) == (27, 61))
    assert four.label == 4 and len(four.strokes) == 2 and four.strokes[0][0].tolist() == [244, 336]
    assert (tes[0].label, tes[0].writer, tes[0].index) == (8, 6, 138)
    assert tes[0].strokes[0][0].tolist() == [273, 323]
    # Every digit of each file; plain text and open files read the same.
    text = "".join(raw_lines(TES))
    from_text = read_unipen(io.StringIO(text))
    assert len(from_text) == 3498
    assert from_text[-1].strokes[-1].tolist() == tes[-1].strokes[-1].tolist()


def write(path, text):
    path.write_text(text)
    return path


def truncated(lines, stop):
    return HEADER + "".join(lines[5:stop])


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("notes.txt", lambda p: write(p, "shopping list\neggs\n"), "not a UNIPEN keyword line"),
        ("table.csv", lambda p: write(p, "x,y\n1,2\n"), "not a UNIPEN keyword line"),
        ("empty.txt", lambda p: write(p, ""), "empty file"),
        ("blank.txt", lambda p: write(p, "\n\n  \n"), "empty file"),
        ("header.txt", lambda p: write(p, HEADER), "no .SEGMENT DIGIT"),
        ("binary.dat", lambda p: p.write_bytes(b"\x00\xff\xfe garbage"), "not ASCII"),
        ("missing.txt", None, "file not found"),
        # Cut inside the first stroke (line 30 of the real file).
        ("cut.txt", lambda p: write(p, truncated(raw_lines(), 30)), "ends inside a stroke"),
        ("cut.gz", lambda p: p.write_bytes(TRA.read_bytes()[:5000]), "damaged gzip"),
        (
            "one-of-two.txt",
            lambda p: write(p, SEGMENT.replace(" 0 ", " 0-1 ") + ".PEN_DOWN\n1 2\n.PEN_UP\n"),
            "names 2 strokes, 1 follow: truncated",
        ),
        (
            "point.txt",
            lambda p: write(p, SEGMENT + ".PEN_DOWN\n1 2\n3 x\n.PEN_UP\n"),
            r"point.txt:5: expected a point 'x y'",
        ),
        (
            "nocomment.txt",
            lambda p: write(p, '.SEGMENT DIGIT 0 ? "4"\n.PEN_DOWN\n1 2\n.PEN_UP\n'),
            "no .COMMENT",
        ),
    ],
)
def test_files_that_are_not_unipen_are_refused_in_one_line(tmp_path, name, make, match):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(UnipenError, match=match) as err:
        read_unipen(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
