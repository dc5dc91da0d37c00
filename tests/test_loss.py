"""InfoNCE and SigLIP: known values on hand-made embeddings, and 2 processes == 1 process (the
global loss, the local loss and SigLIP; and SigLIP as the training wires it: its scale and bias
in the loss head of the prepared module, alone and inside the bind module, where DDP looks for
unused parameters)."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, run_script
from torch.nn.parallel import DistributedDataParallel

from imagebind_lite.bind import BindModule
from imagebind_lite.loss import SigLIPHead, info_nce, siglip
from imagebind_lite.train import AlignmentModule


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


class Problem(torch.nn.Module):
    """A linear encoder and SigLIP's learnable temperature and bias (its init: 10 and -10)."""

    def __init__(self, g):
        super().__init__()
        self.linear = torch.nn.Linear(12, 6)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(6, 12, generator=g))
            self.linear.bias.copy_(torch.randn(6, generator=g))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, x):
        return self.linear(x)


def _make_problem(batch: int):
    g = torch.Generator().manual_seed(0)
    model = Problem(g)
    x = torch.randn(batch, 12, generator=g)
    anchor = torch.randn(batch, 6, generator=g)
    return model, x, anchor


LOSSES = {
    "info_nce": lambda m, emb, a, **kw: info_nce(emb, a, 0.1, **kw),
    "info_nce_local": lambda m, emb, a, **kw: info_nce(emb, a, 0.1, local=True, **kw),
    "siglip": lambda m, emb, a, **kw: siglip(emb, a, m.logit_scale, m.logit_bias, **kw),
}


def _wired(g, bind: bool):
    """SigLIP as training builds it: a linear encoder and the loss head in an AlignmentModule,
    or as one modality of a BindModule whose other modality this step leaves unused."""
    encoder = torch.nn.Linear(12, 6)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(6, 12, generator=g))
        encoder.bias.copy_(torch.randn(6, generator=g))
    if not bind:
        return AlignmentModule(encoder, SigLIPHead())
    other = torch.nn.Linear(12, 6)
    return BindModule({"a": encoder, "b": other}, {"a": SigLIPHead(), "b": SigLIPHead()})


# Through the module's forward: (model, x, anchor, **kw) -> loss; DDP's find_unused_parameters.
WIRED = {
    "siglip_module": (lambda m, x, a, **kw: m(x, anchor_emb=a, **kw), False),
    "siglip_bind": (lambda m, x, a, **kw: m(x, "a", anchor_emb=a, **kw), True),
}


def _make_wired(kind: str, batch: int):
    g = torch.Generator().manual_seed(0)
    model = _wired(g, bind=WIRED[kind][1])
    x = torch.randn(batch, 12, generator=g)
    anchor = torch.randn(batch, 6, generator=g)
    return model, x, anchor


def _wired_worker(rank, world, port, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for kind, (loss_fn, unused) in WIRED.items():  # one spawn for both: spawning is slow
        model, x, anchor = _make_wired(kind, batch * world)
        ddp = DistributedDataParallel(model, find_unused_parameters=unused)
        part = slice(rank * batch, (rank + 1) * batch)
        loss = loss_fn(ddp, x[part], anchor[part])
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out[(kind, rank)] = (mean / world, _grads(model))
    dist.destroy_process_group()


def test_wired_siglip_two_processes_match_one_with_scale_and_bias_gradients():
    batch = 5
    out = mp.Manager().dict()
    mp.spawn(_wired_worker, args=(2, _free_port(), batch, out), nprocs=2, join=True)
    for kind, (loss_fn, _) in WIRED.items():
        model, x, anchor = _make_wired(kind, 2 * batch)
        loss = loss_fn(model, x, anchor)
        loss.backward()
        expected = _grads(model)
        heads = [n for n in expected if "logit_" in n]
        assert len(heads) == 2 and all(float(expected[n].abs()) > 1e-4 for n in heads), kind
        for rank in range(2):
            d_mean, d_grads = out[(kind, rank)]
            torch.testing.assert_close(d_mean, loss.detach(), rtol=1e-6, atol=1e-6)
            # The unused modality's encoder and head get no gradient, on one process or two.
            assert set(d_grads) == set(expected), kind
            for name, grad in expected.items():
                torch.testing.assert_close(d_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        # Not vacuous: without DDP's averaging, one process's half gives other gradients.
        model.zero_grad()
        loss_fn(model, x[:batch], anchor[:batch]).backward()
        assert any(not torch.allclose(p, expected[n]) for n, p in _grads(model).items())


def test_siglip_row_shares_add_up_to_the_batch_loss_and_gradients():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(9, 6, generator=g, requires_grad=True)
    a = torch.randn(9, 6, generator=g)
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    whole = siglip(m, a, scale, bias)
    full = torch.autograd.grad(whole, (m, scale, bias))
    shares = sum(siglip(m[s:t], a, scale, bias, rows=(s, t)) for s, t in ((0, 4), (4, 7), (7, 9)))
    torch.testing.assert_close(shares, whole)
    for got, want in zip(torch.autograd.grad(shares, (m, scale, bias)), full):
        torch.testing.assert_close(got, want)
    # Each row's positive is its own anchor: the rows with their offset, not rows 0..k.
    wrong = siglip(m[4:7], a, scale, bias, rows=(0, 3))
    assert abs(wrong.item() - siglip(m[4:7], a, scale, bias, rows=(4, 7)).item()) > 1e-3
    with pytest.raises(ValueError, match="rows 0:2 of a batch of 9"):
        siglip(m[:3], a, scale, bias, rows=(0, 2))


def test_siglip_head_starts_at_the_papers_values_and_refuses_a_bad_scale():
    head = SigLIPHead()
    assert head.scalars() == pytest.approx({"siglip_scale": 10.0, "siglip_bias": -10.0})
    assert SigLIPHead(5.0, -2.0).scalars() == pytest.approx(
        {"siglip_scale": 5.0, "siglip_bias": -2.0}
    )
    with pytest.raises(ValueError, match="init_scale"):
        SigLIPHead(0.0)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, batch, kind, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, x, anchor = _make_problem(batch * world)
    # InfoNCE leaves SigLIP's two parameters without gradients.
    ddp = DistributedDataParallel(model, find_unused_parameters=kind != "siglip")
    part = slice(rank * batch, (rank + 1) * batch)
    loss = LOSSES[kind](model, ddp(x[part]), anchor[part])
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)  # the local losses average to the global one
    out[rank] = (loss.detach(), mean / world, _grads(model))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_two_processes_match_one_process_loss_and_gradients(kind):
    batch = 5
    model, x, anchor = _make_problem(2 * batch)
    loss = LOSSES[kind](model, model(x), anchor)
    loss.backward()

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), batch, kind, out), nprocs=2, join=True)
    for rank in range(2):
        d_loss, d_mean, d_grads = out[rank]
        if kind == "info_nce":  # every process computes the global loss itself
            torch.testing.assert_close(d_loss, loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_mean, loss.detach(), rtol=1e-6, atol=1e-6)
        assert set(d_grads) == set(_grads(model))
        for name, grad in _grads(model).items():
            torch.testing.assert_close(d_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Guard against a vacuous pass: a loss over one process's half alone would differ.
    half = LOSSES[kind](model, model(x[:batch]), anchor[:batch], gather=False)
    assert abs(half.item() - loss.item()) > 1e-3


def test_siglip_hand_computed_value():
    m = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    a = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-1.0)
    cos = torch.tensor([[0.8, 0.0], [0.96, 0.8]])
    z = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    expected = -torch.log(torch.sigmoid(z * (10 * cos - 1))).sum() / 2
    assert siglip(m, a, scale, bias).item() == pytest.approx(expected.item(), rel=1e-6)


def test_local_info_nce_equals_global_on_one_process():
    m, a = torch.randn(8, 16), torch.randn(8, 16)
    assert info_nce(m, a, 0.07, local=True).item() == pytest.approx(
        info_nce(m, a, 0.07).item(), rel=1e-6
    )


def test_loss_memory_bench_local_grows_slower_than_full():
    # The script's own processes (torch.multiprocessing.spawn) are fresh interpreters: what is
    # measured; the script itself runs forked warm.
    script = [str(REPO / "bench" / "loss_memory.py"), "--processes", "2"]
    script += ["--global-batch", "256,2048", "--dim", "128"]
    proc = run_script(script, cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["peak_loss_memory"]
    # [N, N] logits: 16 MiB at N = 2048 for each of several buffers; the local loss holds
    # [N / 2, N] ones.
    assert rows["2048"]["full_mib"] > 40 and rows["2048"]["ratio"] > 1.5, rows
