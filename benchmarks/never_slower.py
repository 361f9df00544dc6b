"""Is a compressed model ever slower than its dense original? The walker's test models, default flags.

    .venv/bin/python benchmarks/never_slower.py                       # every model, batch 1 and 16
    .venv/bin/python benchmarks/never_slower.py --models tv_resnet18,mlp --repeats 5
    .venv/bin/python benchmarks/never_slower.py --no-latency-aware    # the same, planned by FLOPs alone

For each model of the graph walker's test list (``tests/models.py`` MODEL_CASES: torchvision
resnet18/resnet50/mobilenet_v3_small/vgg11_bn, timm resnet50/efficientnet_b0/vit_tiny/convnext_atto
at 64×64, two small test networks; random init, BatchNorm statistics randomized): compress data-free
with ``--target-flops 0.5`` and otherwise default flags (target onnxruntime-cpu: ranks in multiples
of 16, latency-aware planning with layers timed at batch 1 and 16), export both to ONNX (parity must
pass) and time them interleaved in onnxruntime on CPU: the median of ``--repeats`` runs (default 30),
or of as many as take ``--min-seconds`` (default 1) of the dense model's time, up to 5000 (the
smallest models run in a few microseconds, and the median of 30 such runs of two identical graphs
once differed by 40%). Prints one row per model and batch size with the FLOP and latency ratios and
how many layers the plan's whole-model check gave back to dense (layers that paid timed alone while
the planned model was not faster than dense), and the worst ratio; exits 1 when a compressed model is
slower than its dense original by more than ``--tolerance`` (timing noise). A model where no layer
pays keeps every layer dense: its ratio is noise around 1 and it is left out of the worst.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from lowrank_compress.bench import flops_at_shape, measure_latency
from lowrank_compress.compress import CompressConfig, compress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _onnx_timing import time_onnx_pair  # noqa: E402

_MODELS = Path(__file__).parents[1] / "tests" / "models.py"


MAX_REPEATS = 5000


def model_cases() -> dict:
    """The walker's test models, from tests/models.py (whose networks are named ``models:NAME``)."""
    sys.path.insert(0, str(_MODELS.parent))
    spec = importlib.util.spec_from_file_location("models", _MODELS)
    module = sys.modules["models"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODEL_CASES


def measure(name: str, case, args: argparse.Namespace, workdir: Path) -> list[dict]:
    dense = case.build()
    shape = tuple(case.input_shape)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    config = CompressConfig(method="spectral", target_flops=args.target_flops, exclude=case.exclude,
                            latency_aware=False if args.no_latency_aware else None, target=args.target)
    compressed, report = compress(copy.deepcopy(dense), config, example)
    quick = measure_latency({"dense": dense}, shape, batch_sizes=args.batch_sizes, runtime="onnxruntime",
                            threads=args.threads, warmup=1, repeats=5)
    fastest = min(r.median_s for r in quick.results)
    repeats = max(args.repeats, min(MAX_REPEATS, math.ceil(args.min_seconds / fastest)))
    timing = time_onnx_pair(name, dense, compressed, shape, argparse.Namespace(**{**vars(args), "repeats": repeats}),
                            workdir)
    flop_ratio = flops_at_shape(compressed, shape) / flops_at_shape(dense, shape)
    return [{"model": name, "arch": case.arch, "batch_size": b, "flop_ratio": flop_ratio,
             "factorized": len(report.layers), "latency_ratio": timing.ratio("compressed", b),
             "repeats": repeats,
             "taken_back": sum(s.reason.startswith("kept dense by the whole-model check") for s in report.skipped),
             "dense_ms": next(r.median_s for r in timing.results if r.model == "dense" and r.batch_size == b) * 1e3}
            for b in args.batch_sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated MODEL_CASES names [default: all]")
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--target", default="onnxruntime-cpu")
    parser.add_argument("--no-latency-aware", action="store_true")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timed runs per model and batch size, "
                        "at least")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="at least this many seconds of the dense model's runs (at its fastest batch size)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed ratio above 1.0 (timing noise)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cases = model_cases()
    names = args.models.split(",") if args.models else list(cases)
    rows = []
    print("| model | batch | factorized layers | taken back by the whole-model check | FLOP ratio | dense ms "
          "| latency ratio |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="lrc-never-slower-") as tmp:
        for name in names:
            rows.extend(measure(name, cases[name], args, Path(tmp)))
            for row in rows[-len(args.batch_sizes):]:
                print(f"| {row['model']} | {row['batch_size']} | {row['factorized']} | {row['taken_back']} | "
                      f"{row['flop_ratio']:.3f} | {row['dense_ms']:.2f} | {row['latency_ratio']:.3f} |", flush=True)
    # A model with nothing factorized is the dense graph again: its ratio is timing noise around 1.
    worst = max((r for r in rows if r["factorized"]), key=lambda r: r["latency_ratio"], default=None)
    if worst is None:
        print("\nno model had a layer that pays on this target: every compressed model is its dense original")
        return
    print(f"\nworst: {worst['model']} batch {worst['batch_size']} at {worst['latency_ratio']:.3f}× dense "
          f"(onnxruntime CPU, {args.threads} threads, median of {worst['repeats']} interleaved runs)")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if worst["latency_ratio"] > 1 + args.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
