"""What the onnxruntime speed benchmarks share: export a dense and a compressed model, time them together."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from lowrank_compress.bench import LatencyReport, measure_latency
from lowrank_compress.export import export_onnx, ort_session


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


def _conv_kind(event: dict) -> str:
    """An onnxruntime profile event's kernel, by kind: convolutions split by their weight's shape."""
    op = event["args"].get("op_name", "?")
    if "Conv" not in op:
        return op
    shapes = [next(iter(s.values())) for s in event["args"].get("input_type_shape", [])]
    weight = shapes[1] if len(shapes) > 1 else []
    if len(weight) == 4 and weight[1] == 1 and weight[0] > 1:
        return "Conv depthwise"
    if len(weight) == 4 and weight[2:] == [1, 1]:
        return "Conv 1×1"
    return "Conv k×k" if len(weight) == 4 else "Conv"


def profile_kernels(path: Path, shape: tuple[int, ...], batch: int, threads: int, runs: int,
                    workdir: Path) -> dict[str, float]:
    """Milliseconds per run spent in each kind of kernel (onnxruntime's own profiler, in a session
    set up as the timed ones are, ``runs`` sequential runs after a warm-up run, whose events are
    dropped), for the model at ``path``."""
    import json

    import numpy as np

    session = ort_session(path, threads, profile_prefix=workdir / f"{path.stem}-b{batch}", spin_between_runs=False)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *shape[1:]),
                                                                                  dtype=np.float32)}
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    seen: set[str] = set()
    for event in sorted(events, key=lambda e: e.get("ts", 0)):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            if event["name"] not in seen:  # the node's first run is the warm-up
                seen.add(event["name"])
                continue
            kind = _conv_kind(event)
            totals[kind] = totals.get(kind, 0.0) + event["dur"] / 1e3 / runs
    return totals
