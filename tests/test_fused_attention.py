"""The fused trunk equals ``nn.MultiheadAttention`` at equal weights, and the speed options
(bf16 autocast through Accelerate, activation checkpointing, torch.compile) train correctly."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import run_script
from torch import nn

from imagebind_lite.modalities import build_encoder
from imagebind_lite.models.transformer import Attention, Block
from imagebind_lite.train import AlignmentModule, AlignmentObjective, StepContext, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIM, HEADS, LENGTH, BATCH = 32, 4, 9, 3


def reference_attention(attn: Attention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(
        DIM, HEADS, bias=True, add_bias_kv=attn.bias_k is not None, batch_first=True
    )
    mha.load_state_dict(attn.state_dict())  # same parameter names, key for key
    return mha


class ReferenceBlock(nn.Module):
    """``Block`` with ``nn.MultiheadAttention`` in place of the fused ``Attention``."""

    def __init__(self, block: Block, need_weights: bool):
        super().__init__()
        self.norm_1, self.norm_2, self.mlp = block.norm_1, block.norm_2, block.mlp
        self.attn = reference_attention(block.attn)
        self.need_weights = need_weights

    def forward(self, x):
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.mlp(self.norm_2(x))


def masks():
    g = torch.Generator().manual_seed(3)
    additive = torch.randn(LENGTH, LENGTH, generator=g)  # one convention for both: added
    blocked = torch.rand(LENGTH, LENGTH, generator=g) < 0.3
    blocked.fill_diagonal_(False)  # every query keeps one key
    return additive, blocked


@pytest.mark.parametrize("need_weights", [False, True], ids=["mha-sdpa", "mha-math"])
@pytest.mark.parametrize("mask", [None, "additive"])
@pytest.mark.parametrize("bias_kv", [False, True], ids=["plain", "bias_kv"])
def test_attention_equals_multihead_attention(bias_kv, mask, need_weights):
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS, add_bias_kv=bias_kv)
    mha = reference_attention(attn)
    x = torch.randn(BATCH, LENGTH, DIM, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    additive = masks()[0] if mask else None
    ours = attn(x, attn_mask=additive)
    ref = mha(x_ref, x_ref, x_ref, need_weights=need_weights, attn_mask=additive)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # Gradients too, parameter by parameter: training sees the same function.
    grad = torch.randn_like(ours)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    ref_params = dict(mha.named_parameters())
    for name, param in attn.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "bias_kv",
    [
        False,
        True,
    ],
    ids=["plain", "bias_kv"],
)
def test_boolean_mask_equals_multihead_attention(bias_kv):
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS, add_bias_kv=bias_kv)
    mha = reference_attention(attn)
    x = torch.randn(BATCH, LENGTH, DIM)
    blocked = masks()[1]
    # The conventions are opposite: ours passes True = attend, nn.MultiheadAttention True = block.
    ours = attn(x, attn_mask=~blocked)
    ref = mha(x, x, x, need_weights=False, attn_mask=blocked)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True], ids=["mha-sdpa", "mha-math"])
@pytest.mark.parametrize("bias_kv", [False, True], ids=["plain", "bias_kv"])
def test_block_equals_reference_block(bias_kv, need_weights):
    torch.manual_seed(0)
    block = Block(DIM, HEADS, mlp_ratio=2.0, add_bias_kv=bias_kv)
    ref = ReferenceBlock(block, need_weights)
    x = torch.randn(BATCH, LENGTH, DIM)
    torch.testing.assert_close(block(x), ref(x), rtol=0, atol=1e-5)
    # Eval without gradients takes nn.MultiheadAttention's native fast path where it can.
    block.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x), rtol=0, atol=1e-5)


def tiny_encoder(grad_checkpointing=False):
    torch.manual_seed(0)
    return build_encoder(
        "depth",
        24,
        "tiny",
        {"depth": 2, "width": 32, "heads": 2},
        {"image_size": 16},
        grad_checkpointing=grad_checkpointing,
    )


def encoder_grads(encoder, x):
    encoder.train()
    encoder(x).square().sum().backward()
    # A compiled module names its parameters "_orig_mod.<name>".
    return {name.removeprefix("_orig_mod."): p.grad for name, p in encoder.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(4, 1, 16, 16)
    plain, checkpointed = tiny_encoder(), tiny_encoder(grad_checkpointing=True)
    assert checkpointed.trunk.grad_checkpointing
    a, b = encoder_grads(plain, x), encoder_grads(checkpointed, x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture
def fresh_accelerate_state():
    # Accelerate keeps one process-wide state; mixed precision is fixed at its first creation.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_through_accelerate_trains(fresh_accelerate_state):
    g = torch.Generator().manual_seed(1)
    batch = {
        "depth": torch.randn(8, 1, 16, 16, generator=g),
        "anchor_embedding": torch.randn(8, 24, generator=g),
    }
    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        model = AlignmentModule(tiny_encoder())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        seen = []
        hook = model.encoder.trunk.blocks[0].mlp.fc1.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.append(out.dtype)
        )
        objective = AlignmentObjective(None, "depth", temperature=0.2, accum=2)
        ctx = StepContext(accelerator, model, optimizer, objective, grad_clip=1.0)
        losses[precision] = train_step(ctx, batch)
        hook.remove()
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert abs(losses["bf16"] - losses["no"]) < 5e-2 * losses["no"]


# A cold torch.compile (inductor) of a tiny encoder takes about a minute on 2 CPU cores
# (bench/encoder.py --compile measures it too).
@pytest.mark.slow
def test_compiled_encoder_matches_eager():
    x = torch.randn(4, 1, 16, 16)
    eager = tiny_encoder()
    compiled = torch.compile(tiny_encoder())
    torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-5)
    a, b = encoder_grads(eager, x), encoder_grads(compiled, x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gpu_audio_step_bench_smoke_runs_on_cpu():
    # The GPU benchmark's own smoke mode, cut to one block so that it takes seconds on CPU.
    cmd = [
        "bench/gpu_audio_step.py",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--depth",
        "1",
        "--peak-tflops",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = run_script(cmd, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["config"]["precision"] == "bf16" and result["config"]["tokens"] == 229
    assert result["loss_finite"] and result["samples_per_second"] > 0
    assert len(result["step_seconds_all"]) == 2
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 1.0)
    # One block of width 768 over 229 tokens (+1 bias_kv key), analytically.
    L, D = 229, 768
    block = 2 * L * D * 3 * D + 4 * L * (L + 1) * D + 2 * L * D * D + 4 * L * D * 4 * D
    assert result["forward_flops_per_sample"]["blocks"] == block
