"""What the onnxruntime speed benchmarks share: export a dense and a compressed model, time them together."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from lowrank_compress.bench import LatencyReport, measure_latency
from lowrank_compress.export import export_onnx


def time_onnx_pair(name: str, dense: nn.Module, compressed: nn.Module, shape: tuple[int, ...], args: argparse.Namespace,
                   workdir: Path) -> LatencyReport:
    """Both models exported to ONNX under ``workdir`` (parity checked) and timed interleaved on onnxruntime CPU
    with ``args.batch_sizes``, ``args.threads``, ``args.warmup`` and ``args.repeats``; ratios against "dense"."""
    files = {}
    for label, model in (("dense", dense), ("compressed", compressed)):
        files[label] = workdir / f"{name}-{label}.onnx"
        parity = export_onnx(model, files[label], shape)
        if not parity.passed:
            raise SystemExit(f"{name} {label}: ONNX parity failed ({parity.max_rel_error:.2e})")
    return measure_latency(files, shape, batch_sizes=args.batch_sizes, runtime="onnxruntime", threads=args.threads,
                           warmup=args.warmup, repeats=args.repeats, baseline="dense")
