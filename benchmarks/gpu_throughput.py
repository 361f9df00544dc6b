"""GPU throughput of dense vs compressed ResNet-50 and ViT-B/16, and where the GPU time goes.

    .venv/bin/python benchmarks/gpu_throughput.py --json gpu_throughput.json        # CUDA, batch 256
    .venv/bin/python benchmarks/gpu_throughput.py --no-compile                      # eager PyTorch
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --no-compile --batch-sizes 2 \\
        --image-size 64 --steps 1 --rounds 1 --warmup 1 --target torch-cpu --latency-batch-size 2  # smoke run

What is measured (random init, nothing downloaded):
- torchvision resnet50, compressed data-free to at most half its FLOPs (``--target-flops 0.5
  --target torch-cuda``: ranks in multiples of 8, and with latency-aware planning each layer timed
  dense vs factorized on this GPU in bf16, kept dense where factorizing does not pay);
- timm vit_base_patch16_224, every Linear of its blocks at half its weights (``--param-ratio 0.5
  --target torch-cuda``).

Both models of a pair run the same way (lowrank_compress.throughput.measure_throughput): bf16 autocast,
channels_last for the CNN, ``torch.compile`` (``--no-compile``: eager), cudnn.benchmark, warm-up,
then interleaved rounds of ``--steps`` steps between two ``torch.cuda.synchronize()`` calls; the
figure is the median round. Inference (no grad) and training (SGD with momentum on the mean squared
output) throughput are both reported, compressed / dense.

Profiler breakdown (``--profile``, on by default): ``torch.profiler`` over a few inference steps of
each ResNet-50, device kernel time split into matrix products and convolutions (cuDNN/cuBLAS/
CUTLASS kernels, Triton matmul templates) vs normalization and elementwise kernels (BatchNorm,
ReLU, residual adds, pooling, Triton pointwise/reduction kernels) vs the rest. Factorization
shrinks only the first share; the second stays as it was, which bounds the end-to-end gain.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.bench import flops_at_shape
from lowrank_compress.modelrun import count_params
from lowrank_compress.throughput import measure_throughput

MODELS = ("resnet50", "vit_b16")
# Kernel names by family (CUDA kernel names of cuDNN, cuBLAS, CUTLASS, Triton/Inductor).
_MATMUL = re.compile(r"gemm|conv|cutlass|xmma|implicit|wgrad|dgrad|nvjet|winograd|mma|_mm_|::mm$|::addmm|matmul"
                     r"|linear|triton_tem|cudnn|sm\d\d_", re.I)
_ELEMENTWISE = re.compile(r"norm|elementwise|vectorized|reduce|triton_|relu|add|mul|copy|fill|softmax|gelu|pool|bn_"
                          r"|cat|index|where|sum|mean", re.I)


def build(name: str, image_size: int) -> nn.Module:
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None).eval()
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=image_size).eval()


def compress_model(name: str, model: nn.Module, image_size: int, args: argparse.Namespace) -> tuple[nn.Module, dict, str]:
    """The compressed copy and its report, with the policy in words."""
    from lowrank_compress.compress import CompressConfig, compress

    example = torch.randn(1, 3, image_size, image_size)
    latency_aware = False if args.no_latency_aware else None
    if name == "resnet50":
        config = CompressConfig(method="spectral", target_flops=args.target_flops, target=args.target,
                                latency_aware=latency_aware, latency_batch_size=args.latency_batch_size)
        policy = f"--target-flops {args.target_flops} --target {args.target}"
    else:
        config = CompressConfig(method="spectral", param_ratio=0.5, include=r"^blocks\.", target=args.target,
                                latency_aware=latency_aware, latency_batch_size=args.latency_batch_size)
        policy = f"--param-ratio 0.5 --include '^blocks\\.' --target {args.target}"
    if args.no_latency_aware:
        policy += " --no-latency-aware"
    compressed, report = compress(copy.deepcopy(model), config, example)
    return compressed.eval(), report.to_dict(), policy


def kernel_family(name: str) -> str:
    """matmul/conv, norm/elementwise or other, from a device kernel's name."""
    if _MATMUL.search(name):
        return "matmul/conv"
    if _ELEMENTWISE.search(name):
        return "norm/elementwise"
    return "other"


def profile_breakdown(model: nn.Module, batch_size: int, image_size: int, device: str, bf16: bool,
                      compile: bool, steps: int = 5) -> dict[str, Any]:
    """Device time per kernel family over ``steps`` inference steps (ms per step and shares)."""
    from torch.profiler import ProfilerActivity, profile

    module = copy.deepcopy(model).to(device).eval().to(memory_format=torch.channels_last)
    run = torch.compile(module) if compile else module
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            run(x)

    for _ in range(5):
        step()
    cuda = device == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    totals = {"matmul/conv": 0.0, "norm/elementwise": 0.0, "other": 0.0}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0:
            continue
        totals[kernel_family(event.key)] += us
    all_us = sum(totals.values()) or 1.0
    return {
        "ms_per_step": {k: v / steps / 1e3 for k, v in totals.items()},
        "share": {k: v / all_us for k, v in totals.items()},
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Throughput on {result['device']} (torch {result['torch']}): "
        f"{'bf16 autocast' if result['bf16'] else 'float32'}, channels_last for the CNN, "
        f"{'torch.compile' if result['compile'] else 'eager'}, median of {result['rounds']} rounds of "
        f"{result['steps']} steps after {result['warmup']} warm-up steps",
        "",
        "| model | policy | FLOP ratio | params ratio | batch | mode | dense samples/s | compressed samples/s | speed-up |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, entry in result["models"].items():
        for row in entry["throughput"]:
            lines.append(
                f"| {name} | `{entry['policy']}` | {entry['flop_ratio']:.3f} | {entry['param_ratio']:.3f} | "
                f"{row['batch_size']} | {row['mode']} | {row['dense']:,.1f} | {row['compressed']:,.1f} | "
                f"**{row['speedup']:.2f}×** |"
            )
    if result.get("profile"):
        lines += ["", "Device time per inference step by kernel family (resnet50):", "",
                  "| model | matmul/conv ms | norm/elementwise ms | other ms | matmul/conv share |",
                  "|---|---:|---:|---:|---:|"]
        for label, prof in result["profile"].items():
            ms = prof["ms_per_step"]
            lines.append(f"| {label} | {ms['matmul/conv']:.2f} | {ms['norm/elementwise']:.2f} | {ms['other']:.2f} | "
                         f"{prof['share']['matmul/conv']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--batch-sizes", "--batch-size", default="256", help="comma-separated batch sizes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--target-flops", type=float, default=0.5, help="resnet50's FLOPs budget")
    parser.add_argument("--target", default=None, help="deployment target the plans are made for [default: torch-cuda, torch-cpu with --device cpu]")
    parser.add_argument("--no-latency-aware", action="store_true", help="plan without timing layers")
    parser.add_argument("--latency-batch-size", default="256",
                        help="comma-separated batch sizes layers are timed at")
    parser.add_argument("--no-compile", action="store_true", help="eager PyTorch instead of torch.compile")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps [default: 15 on CUDA, 1 on CPU]")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per model")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --device cpu --no-compile for a smoke run")
        torch.backends.cudnn.benchmark = True
    if args.target is None:
        args.target = "torch-cuda" if args.device == "cuda" else "torch-cpu"
    names = args.models.split(",")
    if any(n not in MODELS for n in names):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    warmup = args.warmup if args.warmup is not None else (15 if args.device == "cuda" else 1)
    bf16 = not args.fp32 and args.device == "cuda"
    result: dict[str, Any] = {
        "device": device_name(args.device), "torch": torch.__version__, "bf16": bf16, "compile": not args.no_compile,
        "warmup": warmup, "steps": args.steps, "rounds": args.rounds, "image_size": args.image_size, "models": {},
        "profile": {},
    }
    shape = (1, 3, args.image_size, args.image_size)
    for name in names:
        torch.manual_seed(0)
        dense = build(name, args.image_size)
        compressed, report, policy = compress_model(name, dense, args.image_size, args)
        throughput = measure_throughput(
            {"dense": dense, "compressed": compressed}, shape, batch_sizes, device=args.device, modes=modes,
            bf16=bf16, compile=not args.no_compile, warmup=warmup, steps=args.steps, rounds=args.rounds,
            baseline="dense",
        )
        rows = []
        for mode in modes:
            for batch in batch_sizes:
                by = {r.model: r for r in throughput.results if r.mode == mode and r.batch_size == batch}
                rows.append({"mode": mode, "batch_size": batch, "dense": by["dense"].samples_per_s,
                             "compressed": by["compressed"].samples_per_s, "speedup": by["compressed"].ratio})
        result["models"][name] = {
            "policy": policy,
            "flop_ratio": flops_at_shape(compressed, shape) / flops_at_shape(dense, shape),
            "param_ratio": count_params(compressed) / count_params(dense),
            "factorized_layers": len(report["layers"]),
            "kept_dense": [s for s in report["skipped"] if "latency" in s["reason"] or "budget" in s["reason"]],
            "throughput": rows,
        }
        if name == "resnet50" and not args.no_profile:
            for label, model in (("dense", dense), ("compressed", compressed)):
                result["profile"][f"resnet50 {label}"] = profile_breakdown(
                    model, batch_sizes[0], args.image_size, args.device, bf16, not args.no_compile)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
