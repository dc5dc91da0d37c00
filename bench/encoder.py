"""Encoder forward+backward throughput: our fused ``Attention`` vs ``nn.MultiheadAttention``.

    python bench/encoder.py [--modality audio] [--size tiny] [--batch 8] [--steps 2]
                            [--repeats 5] [--compile] [--device cpu|cuda]

The reference is the same encoder with every ``Attention`` swapped for
``nn.MultiheadAttention(add_bias_kv=True, batch_first=True)`` holding the same weights (the
parameter names match key for key). It is called twice over: ``need_weights=False``, as
ImageBind calls it (PyTorch then also reaches ``scaled_dot_product_attention`` inside
``multi_head_attention_forward``), and ``need_weights=True``, the plain softmax(QK^T)V path that
materialises the attention matrix. A third variant runs the fused trunk with activation
checkpointing; ``--compile`` adds ``torch.compile`` of the fused encoder (slow to compile on CPU).

Before timing, outputs and gradients of the fused encoder are compared with the reference in
fp32 (drop path draws made identical by reseeding) and must agree within 1e-5. Memory: the bytes
of activations saved for backward (exact, from ``saved_tensors_hooks``) for each variant; on CUDA
also ``torch.cuda.max_memory_allocated`` of one step; on CPU (Linux) the peak resident-set growth
of one step, each variant in a fresh subprocess with the peak reset just before the step.
Throughputs are medians over repeats, variants alternating within each repeat; since other
processes may share the CPUs, the median of per-repeat ratios and the process CPU time per
sample are reported too. The last stdout line is a JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.cli import OneLineArgumentParser, available_device, positive_int, run_script
from imagebind_lite.modalities import build_encoder, get_modality
from imagebind_lite.models.transformer import Attention


class ReferenceAttention(nn.Module):
    """``nn.MultiheadAttention`` behind our ``Attention``'s call signature."""

    def __init__(self, attn: Attention, need_weights: bool):
        super().__init__()
        dim = attn.in_proj_weight.shape[1]
        self.attn = nn.MultiheadAttention(
            dim,
            attn.num_heads,
            bias=True,
            add_bias_kv=attn.bias_k is not None,
            batch_first=True,
        )
        self.attn.load_state_dict(attn.state_dict())
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"average_attn_weights": False} if self.need_weights else {}
        out, _ = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=attn_mask, **kwargs)
        return out


def reference_encoder(encoder: nn.Module, need_weights: bool) -> nn.Module:
    ref = copy.deepcopy(encoder)
    for block in ref.trunk.blocks:
        block.attn = ReferenceAttention(block.attn, need_weights)
    return ref


def build(args, device) -> nn.Module:
    torch.manual_seed(0)
    preprocess = dict(get_modality(args.modality).preprocess)
    return build_encoder(args.modality, args.embed_dim, args.size, None, preprocess).to(device)


def make_input(args, encoder, device) -> torch.Tensor:
    stem = encoder.stem
    g = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, stem.in_chans, *stem.input_size, generator=g).to(device)


def variants(args, encoder) -> dict[str, nn.Module]:
    out = {
        "fused": encoder,
        "reference": reference_encoder(encoder, need_weights=False),
        "math_reference": reference_encoder(encoder, need_weights=True),
    }
    checkpointed = copy.deepcopy(encoder)
    checkpointed.trunk.grad_checkpointing = True
    out["fused_checkpointing"] = checkpointed
    for model in out.values():
        model.train()
    return out


def fwd_bwd(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.float().square().sum().backward()
    return out


def compare(fused: nn.Module, ref: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |output diff|, max |gradient diff|) in fp32 with the same drop-path draws."""
    grads = []
    outs = []
    for model in (fused, ref):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        outs.append(fwd_bwd(model, x).detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    for model in (fused, ref):
        model.zero_grad(set_to_none=True)
    out_diff = float((outs[0] - outs[1]).abs().max())
    ref_grads = {n.replace(".attn.attn.", ".attn."): g for n, g in grads[1].items()}
    grad_diff = max(float((g - ref_grads[n]).abs().max()) for n, g in grads[0].items())
    return out_diff, grad_diff


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().square().sum().backward()
    model.zero_grad(set_to_none=True)
    # Parameters are saved too (e.g. for linear backward); they are not activation memory.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def timed(model: nn.Module, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """(samples per wall-clock second, CPU seconds of this process per sample)."""
    _sync(x.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fwd_bwd(model, x)
        model.zero_grad(set_to_none=True)
    _sync(x.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return steps * x.shape[0] / wall, cpu / (steps * x.shape[0])


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(args, name: str, device) -> float | None:
    """MiB: CUDA peak allocated in this process, or CPU peak RSS growth in a fresh process."""
    if device.type == "cuda":
        model = variants(args, build(args, device))[name]
        x = make_input(args, model, device)
        fwd_bwd(model, x)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(model, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, *sys.argv[1:], "--rss-of", name, "--device", "cpu"]
    # A fixed mmap threshold makes glibc hand large blocks back on free, so RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"RSS measurement of {name} failed: {proc.stderr[-500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_mib"]


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1))


def rss_of(args, name: str) -> None:
    device = torch.device("cpu")
    model = variants(args, build(args, device))[name]
    x = make_input(args, model, device)
    # Weights and gradient buffers exist before the measured step: only the step's own
    # memory (activations, attention matrices, temporaries) raises the high-water mark.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    gc.collect()
    # Linux: "5" resets the peak RSS to the current RSS, dropping the import-time peak.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    fwd_bwd(model, x)
    print(json.dumps({"rss_growth_mib": (_status_kib("VmHWM") - base) / 1024}))


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", default="audio")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--embed-dim", type=positive_int, default=512)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps per repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_references(encoder, models: dict, x) -> tuple[float, float]:
    """(max output diff, max grad diff) of the fused encoder against both references."""
    checks = {name: compare(encoder, models[name], x) for name in ("reference", "math_reference")}
    max_abs_diff = max(out for out, _ in checks.values())
    max_grad_diff = max(grad for _, grad in checks.values())
    print(
        f"fp32 fused vs references: max |output diff| {max_abs_diff:.2e}, "
        f"max |grad diff| {max_grad_diff:.2e}"
    )
    assert max_abs_diff <= 1e-5, f"fused attention differs from the reference: {max_abs_diff}"
    return max_abs_diff, max_grad_diff


def add_compiled(encoder, models: dict, x) -> float:
    """Compile a copy of the encoder into ``models["compiled"]``; the compile seconds."""
    start = time.perf_counter()
    compiled = torch.compile(copy.deepcopy(encoder))
    fwd_bwd(compiled, x)
    compiled.zero_grad(set_to_none=True)
    compile_seconds = time.perf_counter() - start
    torch.manual_seed(0)
    diff = float((compiled(x) - encoder(x)).abs().max())
    print(f"torch.compile: {compile_seconds:.1f} s to compile, max |output diff| {diff:.2e}")
    models["compiled"] = compiled
    return compile_seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rss_of:
        return rss_of(args, args.rss_of)
    device = available_device(args.device)
    encoder = build(args, device)
    models = variants(args, encoder)
    x = make_input(args, encoder, device)

    max_abs_diff, max_grad_diff = check_references(encoder, models, x)

    compile_seconds = add_compiled(encoder, models, x) if args.compile else None

    for model in models.values():  # warm-up: allocator, kernels, autotuning
        timed(model, x, 1)
    rates = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for repeat in range(args.repeats):
        for name, model in models.items():
            rate, cpu_per_sample = timed(model, x, args.steps)
            rates[name].append(rate)
            cpu[name].append(cpu_per_sample)
        print(f"repeat {repeat}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    cpu_ms = {name: 1e3 * statistics.median(v) for name, v in cpu.items()}
    ratios = [f / r for f, r in zip(rates["fused"], rates["reference"])]

    activations = {
        name: saved_activation_bytes(model, x) / 2**20
        for name, model in models.items()
        if name != "compiled"
    }
    peaks = {name: peak_memory(args, name, device) for name in activations}
    stem = encoder.stem
    result = {
        "fused_samples_per_second": medians["fused"],
        "reference_samples_per_second": medians["reference"],
        "speedup": medians["fused"] / medians["reference"],
        # Robust to load from other processes: per-repeat ratios, and CPU time per sample.
        "speedup_median_of_repeat_ratios": statistics.median(ratios),
        "cpu_ms_per_sample": cpu_ms if device.type == "cpu" else None,
        "math_reference_samples_per_second": medians["math_reference"],
        "speedup_vs_math_reference": medians["fused"] / medians["math_reference"],
        "checkpointing_samples_per_second": medians["fused_checkpointing"],
        "max_abs_diff": max_abs_diff,
        "max_grad_diff": max_grad_diff,
        "saved_activations_mib": activations,
        "peak_memory_mib": peaks,
        "peak_memory_kind": (
            "cuda max_memory_allocated growth of one step"
            if device.type == "cuda"
            else "CPU peak RSS growth of one step (fresh process per variant)"
        ),
        "samples_per_second_all": rates,
        "config": {
            "modality": args.modality,
            "size": args.size,
            "tokens": stem.num_tokens + 1,
            "width": encoder.cls_token.shape[-1],
            "depth": len(encoder.trunk.blocks),
            "params": sum(p.numel() for p in encoder.parameters()),
            "batch": args.batch,
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "device": str(device),
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    if compile_seconds is not None:
        result["compiled_samples_per_second"] = medians["compiled"]
        result["compile_seconds"] = compile_seconds
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
