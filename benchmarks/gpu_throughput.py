"""Training throughput of dense vs compressed ResNet-50 on one GPU, against their FLOP ratio.

    .venv/bin/python benchmarks/gpu_throughput.py --json gpu_throughput.json          # CUDA, batch 256
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --batch-size 8 --steps 2  # smoke run

What is measured: torchvision resnet50 (random init, 1000 classes) and the same network compressed
data-free with nkp at rank ratio 0.25 (every eligible conv/linear at rank round(0.25·min(m, d)),
docs/design.md §4). Each trains on synthetic 224×224 images — SGD with momentum, cross-entropy, bf16
autocast, channels_last, cudnn.benchmark — for ``--warmup`` untimed steps, then ``--steps`` timed
steps between two device synchronizations. images/s = batch × steps / seconds.

FLOPs are those of one training step per image (forward + backward, counted by
torch.utils.flop_counter at batch 1, float32); the FLOP ratio dense/compressed is the speed-up the
compressed model would get if time followed FLOPs. Prints a markdown table with the device name
and writes the figures as JSON with ``--json``. On an H100 the whole run takes well under a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def build_models(rank_ratio: float, image_size: int) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(dense resnet50, its nkp compression at ``rank_ratio``, compress report as a dict); CPU, float32."""
    import torchvision

    from lowrank_compress.compress import CompressConfig, compress

    torch.manual_seed(0)
    dense = torchvision.models.resnet50(weights=None)
    compressed, report = compress(
        copy.deepcopy(dense),
        CompressConfig(method="nkp", rank_ratio=rank_ratio),
        torch.zeros(1, 3, image_size, image_size),
    )
    return dense, compressed, report.to_dict()


def train_flops_per_image(model: nn.Module, image_size: int) -> int:
    """FLOPs of forward + backward of one image (batch 1, float32, CPU)."""
    model = copy.deepcopy(model).train()
    x = torch.randn(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long)).backward()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(
    model: nn.Module, device: torch.device, batch_size: int, image_size: int, warmup: int, steps: int, bf16: bool
) -> float:
    """Training images/s of ``model`` on synthetic data: ``warmup`` untimed steps, then ``steps`` timed."""
    model = copy.deepcopy(model).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device, generator=generator)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    d, c = result["dense"], result["compressed"]
    lines = [
        f"Training throughput on {result['device']} — batch {result['batch_size']}, "
        f"{result['image_size']}×{result['image_size']}, "
        f"{'bf16 autocast' if result['bf16'] else 'float32'}, channels_last, {result['steps']} timed steps "
        f"after {result['warmup']} warm-up (torch {result['torch']})",
        "",
        "| model | params | train GFLOPs / image | images / s |",
        "|---|---:|---:|---:|",
        f"| resnet50 dense | {d['params'] / 1e6:.2f} M | {d['train_flops_per_image'] / 1e9:.2f} | "
        f"{d['images_per_s']:,.0f} |",
        f"| resnet50 nkp, rank ratio {result['rank_ratio']} | {c['params'] / 1e6:.2f} M | "
        f"{c['train_flops_per_image'] / 1e9:.2f} | {c['images_per_s']:,.0f} |",
        "",
        f"Measured speed-up (compressed / dense images/s): **{result['speedup']:.2f}×**; "
        f"FLOP ratio (dense / compressed): {result['flop_ratio']:.2f}×.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first [default: 10 on CUDA, 1 on CPU]")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --device cpu for a smoke run")
        torch.backends.cudnn.benchmark = True
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)

    dense, compressed, report = build_models(args.rank_ratio, args.image_size)
    models = {"dense": dense, "compressed": compressed}
    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "batch_size": args.batch_size,
        "image_size": args.image_size, "bf16": not args.fp32, "warmup": warmup, "steps": args.steps,
        "rank_ratio": args.rank_ratio, "factorized_layers": len(report["layers"]),
    }
    for name, model in models.items():
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "train_flops_per_image": train_flops_per_image(model, args.image_size),
            "images_per_s": images_per_second(
                model, device, args.batch_size, args.image_size, warmup, args.steps, not args.fp32
            ),
        }
    result["speedup"] = result["compressed"]["images_per_s"] / result["dense"]["images_per_s"]
    result["flop_ratio"] = result["dense"]["train_flops_per_image"] / result["compressed"]["train_flops_per_image"]
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
