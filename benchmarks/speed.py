"""How much of the FLOP saving becomes onnxruntime CPU time, with lrc's default flags.

    .venv/bin/python benchmarks/speed.py                                  # resnet50 + efficientnet_b0, batch 1 and 16
    .venv/bin/python benchmarks/speed.py --models resnet50 --target-latency 0.6 --json speed.json
    .venv/bin/python benchmarks/speed.py --no-latency-aware --round-to 16  # the FLOPs-only plan
    .venv/bin/python benchmarks/speed.py --models efficientnet_b0 --profile  # + kernel time by kind
    .venv/bin/python benchmarks/speed.py --models resnet50 --image-size 64 --batch-sizes 1 --repeats 2  # smoke run

What is measured: torchvision resnet50 and timm efficientnet_b0 (random init, 1000 classes, 224×224)
and each compressed data-free by ``lowrank_compress.compress`` under ``--target-flops`` (default
0.5) or ``--target-latency``, otherwise as ``lrc compress`` does by default: target onnxruntime-cpu
(ranks in multiples of 16, the NCHWc block of onnxruntime's CPU convolutions) and latency-aware
planning (every layer timed dense vs factorized in onnxruntime at its input shape, at each batch
size of ``--latency-batch-size``, default 1 and 16 as in ``lrc``; the budget spent by error per
second of measured time). Both models are exported to ONNX (the parity check must pass) and timed in
one onnxruntime CPU process with ``--threads`` threads (default 2), runs interleaved dense,
compressed, dense, … (lowrank_compress.bench.measure_latency); the figure is the median.

Columns: FLOP ratio = compressed / dense FLOPs (torch.utils.flop_counter, batch 1); latency ratio
= compressed / dense median latency; quotient = latency ratio / FLOP ratio (1.0: time fell as much
as FLOPs; above 1: less); realized = (1 − latency ratio) / (1 − FLOP ratio), the share of the FLOP
saving that became time. Prints a markdown table with the CPU, thread count and machine load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_compress.bench import flops_at_shape
from lowrank_compress.modelrun import count_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _onnx_timing import profile_kernels, time_onnx_pair  # noqa: E402

ARCHS = {"resnet50": "torchvision:resnet50", "efficientnet_b0": "timm:efficientnet_b0"}


def build(arch: str) -> nn.Module:
    """A random-init model from an arch spec (no weights are downloaded)."""
    from lowrank_compress.io.archspec import build_model

    return build_model(arch).eval()


def compress_model(model: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The compressed copy of ``model`` and the policy used, in words (the one call to adjust)."""
    from lowrank_compress.compress import CompressConfig, compress

    budget = {"target_latency": args.target_latency} if args.target_latency else {"target_flops": args.target_flops}
    config = CompressConfig(
        method=args.method, round_to=args.round_to, exclude=args.exclude, target=args.target,
        latency_aware=False if args.no_latency_aware else None, latency_batch_size=args.latency_batch_size,
        **budget,
    )
    compressed, _ = compress(copy.deepcopy(model), config, example, timing_cache=args.timing_cache)
    name, value = next(iter(budget.items()))
    policy = f"--{name.replace('_', '-')} {value} --target {args.target} --method {args.method}"
    if args.round_to:
        policy += f" --round-to {args.round_to}"
    if args.exclude:
        policy += f" --exclude '{args.exclude}'"
    if args.no_latency_aware:
        policy += " --no-latency-aware"
    if args.timing_cache:
        policy += f" --timing-cache {args.timing_cache}"
    return compressed.eval(), policy


def measure(name: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Rows (one per batch size) for one architecture."""
    torch.manual_seed(args.seed)
    shape = (1, 3, args.image_size, args.image_size)
    dense = build(ARCHS[name])
    compressed, policy = compress_model(dense, torch.randn(shape), args)
    flop_ratio = flops_at_shape(compressed, shape) / flops_at_shape(dense, shape)
    param_ratio = count_params(compressed) / count_params(dense)
    report = time_onnx_pair(name, dense, compressed, shape, args, workdir)
    if args.profile:
        print_profile(name, shape, args, workdir)
    rows = []
    for batch in args.batch_sizes:
        by_model = {r.model: r for r in report.results if r.batch_size == batch}
        latency_ratio = by_model["compressed"].ratio
        rows.append({
            "model": name, "policy": policy, "batch_size": batch, "flop_ratio": flop_ratio, "param_ratio": param_ratio,
            "dense_ms": by_model["dense"].median_s * 1e3, "compressed_ms": by_model["compressed"].median_s * 1e3,
            "dense_iqr_ms": by_model["dense"].iqr_s * 1e3, "compressed_iqr_ms": by_model["compressed"].iqr_s * 1e3,
            "latency_ratio": latency_ratio, "quotient": latency_ratio / flop_ratio,
            "realized": (1 - latency_ratio) / (1 - flop_ratio) if flop_ratio < 1 else None,
        })
    return rows


def print_profile(name: str, shape: tuple[int, ...], args: argparse.Namespace, workdir: Path) -> None:
    """Per-kind kernel times of the dense and compressed ONNX files (onnxruntime's profiler), per batch size."""
    for batch in args.batch_sizes:
        times = {label: profile_kernels(workdir / f"{name}-{label}.onnx", shape, batch, args.threads,
                                        args.profile_runs, workdir) for label in ("dense", "compressed")}
        total = sum(times["dense"].values())
        kinds = sorted(set(times["dense"]) | set(times["compressed"]), key=lambda k: -times["dense"].get(k, 0.0))
        print(f"\n{name}, batch {batch}: kernel time by kind (onnxruntime profiler, {args.profile_runs} runs, "
              f"{args.threads} threads)\n")
        print("| kernel | dense ms | share of dense | compressed ms | compressed / dense |\n|---|---:|---:|---:|---:|")
        for kind in kinds + ["all"]:
            d = total if kind == "all" else times["dense"].get(kind, 0.0)
            c = sum(times["compressed"].values()) if kind == "all" else times["compressed"].get(kind, 0.0)
            ratio = f"{c / d:.2f}" if d else "–"
            print(f"| {kind} | {d:.2f} | {d / total:.1%} | {c:.2f} | {ratio} |", flush=True)


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = ["model", "batch", "FLOP ratio", "params ratio", "dense ms", "compressed ms", "latency ratio", "quotient",
               "realized"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        realized = f"{r['realized']:.0%}" if r["realized"] is not None else "–"
        cells = [
            r["model"], str(r["batch_size"]), f"{r['flop_ratio']:.3f}", f"{r['param_ratio']:.3f}",
            f"{r['dense_ms']:.1f}", f"{r['compressed_ms']:.1f}", f"{r['latency_ratio']:.3f}", f"{r['quotient']:.2f}",
            realized,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,efficientnet_b0", help="comma-separated: " + ", ".join(ARCHS))
    parser.add_argument("--target-flops", type=float, default=0.5, help="fraction of the FLOPs to keep")
    parser.add_argument("--target-latency", type=float, default=None, help="instead: latency budget, F × dense")
    parser.add_argument("--target", default="onnxruntime-cpu", help="deployment target the plan is made for")
    parser.add_argument("--round-to", type=int, default=None, help="ranks are multiples of this [default: the target's]")
    parser.add_argument("--method", default="spectral", help="spectral or nkp (speed does not depend on it)")
    parser.add_argument("--exclude", default=None, help="regex of layer names to keep dense")
    parser.add_argument("--no-latency-aware", action="store_true", help="plan by FLOPs alone (no layer timing)")
    parser.add_argument("--latency-batch-size", default="1,16",
                        help="comma-separated batch sizes layers are timed at (lrc's default)")
    parser.add_argument("--timing-cache", type=Path, default=None,
                        help="lrc's timing cache: layer timings reused from (and added to) this JSON file, so that "
                             "runs plan the same and differ only by the latency measured")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also print each model's kernel time by kind (onnxruntime profiler), dense vs compressed")
    parser.add_argument("--profile-runs", type=int, default=10, help="runs profiled per model and batch size")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = args.models.split(",")
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}")

    import onnxruntime

    load_before = f"{os.getloadavg()[0]:.2f}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrc-speed-") as tmp:
        for name in names:
            rows.extend(measure(name, args, Path(tmp)))
    threads = "onnxruntime's default threads" if args.threads is None else f"{args.threads} threads"
    print(
        f"onnxruntime {onnxruntime.__version__} CPU on {cpu_name()} ({torch.get_num_threads()} cores visible), "
        f"{threads}, {args.image_size}×{args.image_size}, median of {args.repeats} interleaved runs"
    )
    print(f"policy: {rows[0]['policy']}; load average before / after: {load_before} / {os.getloadavg()[0]:.2f}\n")
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
