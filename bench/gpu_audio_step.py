"""One ImageBind-size audio training step on an accelerator: samples/s and model FLOPs utilisation.

    python bench/gpu_audio_step.py [--batch 64] [--steps 20] [--warmup 5] [--precision bf16]
                                   [--peak-tflops 989] [--grad-checkpointing] [--compile]
                                   [--compile-mode max-autotune-no-cudagraphs] [--foreach-adamw]
    python bench/gpu_audio_step.py --device cpu --steps 2 --batch 2     # CPU smoke run

Without a GPU and without ``--device cpu`` it stops with one line saying so (an ImageBind-size
step takes minutes on a CPU, so it does not fall back silently).

The encoder is ``build_encoder("audio", 1024, "imagebind")`` (ViT-B: width 768, 12 blocks, 12
heads, learned bias_k/bias_v, drop path 0.1) on random fbank input [B, 1, 128, 204] (12 x 19
patches + CLS = 229 tokens) with random anchor embeddings, so the step is exactly what
``train_step`` runs with a cached anchor: forward, InfoNCE, backward, clip, AdamW (fused on
CUDA, as in training; ``--foreach-adamw`` for the multi-tensor path), under Accelerate's
``mixed_precision``.

MFU counts the matmul FLOPs of the model analytically (per sample, forward): patch projection
2*P*k*k*D, per block QKV 6*L*D^2, scores and weighted sum 4*L*(L+1)*D (the +1 is the bias_k/v
token), output projection 2*L*D^2, MLP 4*L*D*rD; head 2*D*E. Training counts 3x forward
(backward = 2x forward), and activation recomputation is not counted as useful work. The peak
defaults to the detected GPU's dense bf16/fp16 tensor-core peak (H100 SXM 989 TFLOP/s); pass
``--peak-tflops`` for other parts. Step times are synchronised per step; samples/s is the median
over timed steps. The last stdout line is a JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebind_lite.cli import OneLineArgumentParser, available_device, positive_int, run_script
from imagebind_lite.modalities import build_encoder, resolve_size
from imagebind_lite.train import (
    AlignmentModule,
    AlignmentObjective,
    StepContext,
    adamw,
    param_groups,
    train_step,
)

FBANK = {"num_mel_bins": 128, "target_length": 204}  # ImageBind's audio input
EMBED_DIM = 1024  # ImageBind-huge's joint space
TEMPERATURE = 0.05

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
]


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def forward_flops_per_sample(encoder, embed_dim: int) -> dict:
    """Matmul FLOPs of one forward of one sample (multiply-add = 2 FLOPs)."""
    stem = encoder.stem
    width = encoder.cls_token.shape[-1]
    patches = stem.num_tokens
    kernel = stem.proj.kernel_size
    tokens = patches + 1
    stem_flops = 2 * patches * stem.in_chans * kernel[0] * kernel[1] * width
    blocks = 0
    for block in encoder.trunk.blocks:
        keys = tokens + (1 if block.attn.bias_k is not None else 0)
        hidden = block.mlp.fc1.out_features
        blocks += 2 * tokens * width * 3 * width  # QKV projection
        blocks += 2 * 2 * tokens * keys * width  # QK^T and attention x V
        blocks += 2 * tokens * width * width  # output projection
        blocks += 2 * 2 * tokens * width * hidden  # MLP up and down
    head = 2 * width * embed_dim
    return {"stem": stem_flops, "blocks": blocks, "head": head, "total": stem_flops + blocks + head}


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default=None, help="default: cuda; cpu for a smoke run without a GPU"
    )
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on GPU, 1 on CPU")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--size", default="imagebind", help="audio encoder size")
    parser.add_argument(
        "--depth", type=positive_int, default=None, help="override the number of blocks"
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
        help="torch.compile's mode (implies --compile); default: default",
    )
    parser.add_argument(
        "--foreach-adamw",
        action="store_true",
        help="AdamW's multi-tensor path instead of the fused kernel, to compare",
    )
    return parser.parse_args(argv)


def checked_device(args) -> torch.device:
    """The device to run on; one-line errors for no GPU and bad values."""
    if args.device is None and not torch.cuda.is_available():
        # Not a silent fall-back: the ImageBind-size step takes minutes per step on a CPU.
        raise ValueError(
            "bench/gpu_audio_step.py: no CUDA GPU on this machine; pass --device cpu "
            "(e.g. --device cpu --steps 2 --batch 2) for a CPU smoke run"
        )
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup: must be at least 0, got {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops: must be positive, got {args.peak_tflops}")
    return available_device(args.device or "cuda")


def timed_steps(step, warmup: int, steps: int, device) -> tuple[float, list, list]:
    """(warm-up seconds, per-step seconds, losses), synchronised per step."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        _sync(device)
        begin = time.perf_counter()
        losses.append(step())  # float(loss) synchronises too
        _sync(device)
        times.append(time.perf_counter() - begin)
    return warmup_seconds, times, losses


def prepared_step(args, accelerator, encoder):
    """(model, AdamW) prepared by Accelerate; compiled and with the AdamW that args ask for."""
    model = AlignmentModule(encoder)
    if args.compile or args.compile_mode:
        model = torch.compile(model, mode=args.compile_mode)
    groups = param_groups(model, 0.2)
    if args.foreach_adamw:
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True)
    else:
        optimizer = adamw(groups, 1e-4, (0.9, 0.95), accelerator.device)
    return accelerator.prepare(model, optimizer)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = checked_device(args)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.precision)
    device = accelerator.device
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    overrides = {"depth": args.depth} if args.depth else None
    encoder = build_encoder(
        "audio", EMBED_DIM, args.size, overrides, FBANK, TEMPERATURE, args.grad_checkpointing
    )
    flops = forward_flops_per_sample(encoder, EMBED_DIM)
    params = sum(p.numel() for p in encoder.parameters())
    model, optimizer = prepared_step(args, accelerator, encoder)
    fused = bool(optimizer.defaults.get("fused"))

    g = torch.Generator().manual_seed(1)
    batch = {
        "audio": torch.randn(args.batch, 1, *FBANK.values(), generator=g).to(device),
        "anchor_embedding": torch.randn(args.batch, EMBED_DIM, generator=g).to(device),
    }

    ctx = StepContext(
        accelerator, model, optimizer, AlignmentObjective(None, "audio", TEMPERATURE), 1.0
    )

    def step() -> float:
        return train_step(ctx, batch)

    warmup_seconds, times, losses = timed_steps(step, warmup, args.steps, device)
    median = statistics.median(times)
    samples_per_second = args.batch / median
    train_flops_per_sample = 3 * flops["total"]
    achieved = train_flops_per_sample * samples_per_second / 1e12
    peak = args.peak_tflops or detect_peak_tflops(device)
    result = {
        "samples_per_second": samples_per_second,
        "mfu": achieved / peak if peak else None,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "median_step_seconds": median,
        "step_seconds_all": times,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_finite": all(v == v and abs(v) != float("inf") for v in losses),
        "train_gflops_per_sample": train_flops_per_sample / 1e9,
        "forward_flops_per_sample": flops,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "config": {
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "size": args.size,
            "params": params,
            "tokens": encoder.stem.num_tokens + 1,
            "fbank": list(FBANK.values()),
            "batch": args.batch,
            "steps": args.steps,
            "warmup": warmup,
            "warmup_seconds": warmup_seconds,
            "precision": accelerator.mixed_precision,
            "grad_checkpointing": args.grad_checkpointing,
            "compile": bool(args.compile or args.compile_mode),
            "compile_mode": args.compile_mode or ("default" if args.compile else None),
            "adamw": "fused" if fused else ("foreach" if args.foreach_adamw else "default"),
            "size_fields": resolve_size("audio", args.size, overrides),
            "torch": torch.__version__,
        },
    }
    if peak is None and device.type == "cuda":
        print(f"unknown peak for {torch.cuda.get_device_name(device)}: pass --peak-tflops for MFU")
    print(json.dumps(result))
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    run_script(main)
