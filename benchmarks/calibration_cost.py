"""What calibrated compression costs on a full-size network: wall time and peak memory.

    .venv/bin/python benchmarks/calibration_cost.py                    # timm resnet50, --target-params 0.5
    .venv/bin/python benchmarks/calibration_cost.py --extra=--allocation=layer   # the per-layer allocation

Builds timm's resnet50 with random weights (nothing is downloaded; the figure is about time and
memory, not accuracy), saves its state dict as safetensors, and runs the real CLI in a subprocess:

    lrc compress resnet50.safetensors --arch timm:resnet50 --target-params 0.5 \\
        --calib gaussian --calib-samples 64 -o r50.lrc.safetensors --json r50.json --quiet

Prints the wall time, the child's CPU time and its peak resident memory (getrusage of the child),
and the kept fractions from the report. Exit status 1 when it takes more than 5 minutes or 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="timm model name")
    parser.add_argument("--target-params", default="0.5")
    parser.add_argument("--calib-samples", default="64")
    parser.add_argument("--extra", action="append", default=[], help="more lrc compress flags, e.g. --extra=--distill-steps=50")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrc-cost-") as tmp:
        work = Path(tmp)
        model = timm.create_model(args.arch, pretrained=False).eval()
        checkpoint = work / f"{args.arch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        del model
        report = work / "report.json"
        command = [
            sys.executable, "-m", "lowrank_compress", "compress", str(checkpoint), "--arch", f"timm:{args.arch}",
            "--target-params", args.target_params, "--calib", "gaussian", "--calib-samples", args.calib_samples,
            "-o", str(work / "out.lrc.safetensors"), "--json", str(report), "--quiet",
            *[a for extra in args.extra for a in extra.split("=", 1)],
        ]
        start = time.perf_counter()
        proc = subprocess.run(command, check=False, capture_output=True, text=True, env=dict(os.environ))
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"lrc compress failed ({proc.returncode}): {proc.stderr.strip()}")
        data = json.loads(report.read_text())
    peak_gb = usage.ru_maxrss * 1024 / 1e9
    load = os.getloadavg()[0]
    print(f"command: lrc compress {args.arch}.safetensors --arch timm:{args.arch} --target-params {args.target_params} "
          f"--calib gaussian --calib-samples {args.calib_samples} {' '.join(args.extra)}")
    print("| machine | wall | user CPU | peak memory (max RSS) | params kept | FLOPs kept |")
    print("|---|---|---|---|---|---|")
    print(f"| {os.cpu_count()} CPU cores (load average {load:.1f}) | {wall / 60:.0f} min {wall % 60:.0f} s | "
          f"{usage.ru_utime / 60:.0f} min {usage.ru_utime % 60:.0f} s | {peak_gb:.2f} GB | "
          f"{data['params_after'] / data['params_before']:.3f} | {data['flops_after'] / data['flops_before']:.3f} |")
    if wall > 300 or peak_gb > 8:
        print(f"- FAIL: {wall:.0f} s, {peak_gb:.2f} GB (target ≤ 300 s and ≤ 8 GB)")
        sys.exit(1)
    print(f"- PASS: {wall:.0f} s, {peak_gb:.2f} GB (target ≤ 300 s and ≤ 8 GB)")


if __name__ == "__main__":
    main()
