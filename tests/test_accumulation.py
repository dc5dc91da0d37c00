"""Gradient accumulation keeps the whole effective batch as negatives: ``train_step`` with
``grad_accum=4`` and micro-batches of B gives the gradients of one batch of 4B (one process and
two), while naive accumulation (one InfoNCE per micro-batch) does not. The same for SigLIP
(``loss.kind=siglip``), its learnable scale and bias included."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from imagebind_lite.loss import SigLIPHead, info_nce, siglip
from imagebind_lite.modalities import build_encoder
from imagebind_lite.train import AlignmentModule, AlignmentObjective, StepContext, train_step

MICRO, ACCUM, EMBED, TEMPERATURE = 4, 4, 24, 0.1


class GradRecorder(torch.optim.Optimizer):
    """An optimizer whose step keeps a copy of the gradients it was given and changes nothing."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.grads = None

    @torch.no_grad()
    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def make_model(kind: str = "infonce") -> AlignmentModule:
    torch.manual_seed(0)
    # No dropout or drop path anywhere: the re-encoded forward must equal the first one.
    encoder = build_encoder(
        "depth", EMBED, "tiny", {"depth": 2, "width": 32, "heads": 2}, {"image_size": 16}
    )
    return AlignmentModule(encoder, SigLIPHead() if kind == "siglip" else None)


def make_batch(size: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "depth": torch.randn(size, 1, 16, 16, generator=g),
        "anchor_embedding": torch.randn(size, EMBED, generator=g),
    }


def step_gradients(
    accelerator, batch: dict, accum: int, grad_clip=None, local=False, kind="infonce"
):
    model = make_model(kind)
    names = [name for name, _ in model.named_parameters()]
    recorder = GradRecorder(model.parameters())
    prepared, optimizer = accelerator.prepare(model, recorder)
    # No anchor object: batches carry cached anchor embeddings, as with anchor.cache.
    objective = AlignmentObjective(None, "depth", TEMPERATURE, accum, local, kind)
    loss = train_step(StepContext(accelerator, prepared, optimizer, objective, grad_clip), batch)
    return loss, dict(zip(names, recorder.grads))


def naive_gradients(batch: dict, accum: int) -> dict:
    model = make_model()
    pairs = zip(batch["depth"].chunk(accum), batch["anchor_embedding"].chunk(accum))
    for x, anchor in pairs:
        (info_nce(model(x), anchor, TEMPERATURE) / accum).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def naive_siglip_gradients(batch: dict, accum: int) -> dict:
    """One SigLIP per micro-batch against its own anchors only."""
    model = make_model("siglip")
    head = model.loss_head
    pairs = zip(batch["depth"].chunk(accum), batch["anchor_embedding"].chunk(accum))
    for x, anchor in pairs:
        (siglip(model(x), anchor, head.logit_scale, head.logit_bias) / accum).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulated_step_equals_one_big_batch_and_naive_does_not():
    accelerator = Accelerator(cpu=True)
    batch = make_batch(MICRO * ACCUM)
    big_loss, big = step_gradients(accelerator, batch, accum=1)
    acc_loss, accumulated = step_gradients(accelerator, batch, accum=ACCUM)
    diff = max_diff(big, accumulated)
    print(f"accumulated vs big batch: max |grad diff| = {diff:.2e}")
    assert diff < 1e-6
    assert abs(big_loss - acc_loss) < 1e-6  # every micro-batch loss is the full-batch loss
    scale = max(float(g.abs().max()) for g in big.values())
    naive = max_diff(big, naive_gradients(batch, ACCUM))
    print(
        f"naive accumulation vs big batch: max |grad diff| = {naive:.2e} (grad scale {scale:.2e})"
    )
    assert naive > 1e-2 * scale  # not vacuous: fewer negatives give visibly other gradients


def test_accumulated_siglip_step_equals_one_big_batch_and_naive_does_not():
    accelerator = Accelerator(cpu=True)
    batch = make_batch(MICRO * ACCUM)
    big_loss, big = step_gradients(accelerator, batch, accum=1, kind="siglip")
    acc_loss, accumulated = step_gradients(accelerator, batch, accum=ACCUM, kind="siglip")
    assert {"loss_head.logit_scale", "loss_head.logit_bias"} <= set(big)
    assert all(
        float(big[k].abs()) > 1e-3 for k in ("loss_head.logit_scale", "loss_head.logit_bias")
    )
    diff = max_diff(big, accumulated)
    print(f"siglip accumulated vs big batch: max |grad diff| = {diff:.2e}")
    assert diff < 1e-6
    assert abs(big_loss - acc_loss) < 1e-5  # the micro-batches' shares add up to the loss
    scale = max(float(g.abs().max()) for g in big.values())
    naive = max_diff(big, naive_siglip_gradients(batch, ACCUM))
    print(f"naive siglip accumulation: max |grad diff| = {naive:.2e} (grad scale {scale:.2e})")
    assert naive > 1e-2 * scale


def test_accumulated_step_clips_like_one_big_batch():
    accelerator = Accelerator(cpu=True)
    batch = make_batch(MICRO * ACCUM)
    _, big = step_gradients(accelerator, batch, accum=1, grad_clip=1e-3)
    _, accumulated = step_gradients(accelerator, batch, accum=ACCUM, grad_clip=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in big.values()]))
    assert abs(float(norm) - 1e-3) < 1e-8  # the clip was active
    assert max_diff(big, accumulated) < 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, local=False, kind="infonce") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)  # the environment above is what accelerate launch sets
    assert accelerator.num_processes == world
    batch = make_batch(MICRO * ACCUM)
    per_rank = MICRO * ACCUM // world
    part = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    loss, grads = step_gradients(accelerator, part, accum=ACCUM // world, local=local, kind=kind)
    if rank == 0:
        save_file({**grads, "loss": torch.tensor(loss)}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


@pytest.mark.parametrize(
    "local, kind", [(False, "infonce"), (True, "infonce"), (False, "siglip")], ids=str
)
def test_two_processes_with_accumulation_equal_one_big_batch(tmp_path, local, kind):
    # 2 ranks x 2 micro-batches x 4 = the same 16 samples as one process with 16 at once.
    # loss.local: each rank scores its own rows only; the gradients are still the big batch's.
    # SigLIP is row-local too, its scale and bias averaged over the ranks like the encoder.
    out = str(tmp_path / "rank0.safetensors")
    mp.spawn(_rank, args=(2, _free_port(), out, local, kind), nprocs=2, join=True)
    distributed = load_file(out)
    loss = float(distributed.pop("loss"))
    big_loss, big = step_gradients(
        Accelerator(cpu=True), make_batch(MICRO * ACCUM), accum=1, kind=kind
    )
    diff = max_diff(big, distributed)
    print(f"2 ranks x accum 2 vs 1 process big batch ({kind}, local={local}): {diff:.2e}")
    assert diff < 1e-6
    # The global loss on every rank; the local one (and SigLIP's) is rank 0's rows only.
    assert (abs(loss - big_loss) < 1e-6) != (local or kind == "siglip")
