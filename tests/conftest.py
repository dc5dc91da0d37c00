import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests share two CPU cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared two-core machine: one thread avoids the hand-off stalls that
    make these tests ten times slower when other work runs beside them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
