"""InfoNCE: known values on hand-made embeddings, and 2 processes == 1 process."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from imagebind_lite.loss import info_nce


def test_perfect_alignment_known_value():
    # Orthonormal pairs: positives score 1/t, negatives 0 -> loss = log(1 + (B-1) e^{-1/t}).
    emb = torch.eye(4)
    t = 0.5
    expected = math.log(1 + 3 * math.exp(-1 / t))
    assert info_nce(emb, emb, t).item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_asymmetric_value():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    m = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    t = 0.1
    logits = torch.tensor([[0.8, 0.8 * 0.6 + 0.6 * 0.8], [0.0, 0.8]]) / t
    row = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 1]) / 2
    col = -(torch.log_softmax(logits.T, 1)[0, 0] + torch.log_softmax(logits.T, 1)[1, 1]) / 2
    assert info_nce(m, a, t).item() == pytest.approx(float((row + col) / 2), rel=1e-6)


def test_unnormalised_inputs_are_normalised_and_shapes_checked():
    m, a = torch.randn(8, 16), torch.randn(8, 16)
    assert info_nce(m * 7, a * 3, 0.07).item() == pytest.approx(
        info_nce(m, a, 0.07).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="shapes differ"):
        info_nce(torch.randn(8, 16), torch.randn(7, 16), 0.07)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_problem(batch: int):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(12, 6)
    with torch.no_grad():
        model.weight.copy_(torch.randn(6, 12, generator=g))
        model.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(batch, 12, generator=g)
    anchor = torch.randn(batch, 6, generator=g)
    return model, x, anchor


def _worker(rank, world, port, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, x, anchor = _make_problem(batch * world)
    ddp = DistributedDataParallel(model)
    part = slice(rank * batch, (rank + 1) * batch)
    loss = info_nce(ddp(x[part]), anchor[part], 0.1)
    loss.backward()
    out[rank] = (loss.detach(), model.weight.grad.clone(), model.bias.grad.clone())
    dist.destroy_process_group()


def test_two_processes_match_one_process_loss_and_gradients():
    batch = 5
    model, x, anchor = _make_problem(2 * batch)
    loss = info_nce(model(x), anchor, 0.1)
    loss.backward()

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), batch, out), nprocs=2, join=True)
    for rank in range(2):
        d_loss, d_weight, d_bias = out[rank]
        torch.testing.assert_close(d_loss, loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_weight, model.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_bias, model.bias.grad, rtol=1e-5, atol=1e-6)
    # Guard against a vacuous pass: a local-only loss would differ.
    local = info_nce(
        F.linear(x[:batch], model.weight, model.bias), anchor[:batch], 0.1, gather=False
    )
    assert abs(local.item() - loss.item()) > 1e-3
