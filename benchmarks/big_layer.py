"""Peak memory of ``lrc compress`` on one very large layer: a 16384×16384 Linear at rank 64.

    .venv/bin/python benchmarks/big_layer.py                          # 16384², rank 64, budget 4 GB
    .venv/bin/python benchmarks/big_layer.py --size 8192 --rank 32    # a quicker run
    .venv/bin/python benchmarks/big_layer.py --json big_layer.json

What is measured: a state dict holding one Linear (``size``×``size`` float32 weight, N(0, 1/size),
plus a bias) followed by a ReLU is written to a temporary folder, then ``lrc compress CKPT --rank R``
runs in a child process exactly as a user would run it (data-free nkp, the default). The figure is
the child's peak resident set size (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: everything the process
touched, including the Python runtime and torch's own ~0.6 GiB), and its wall time. The output is
then checked: the layer is factorized at rank R and its factors are finite.

The budget is 4 GB = 4·10⁹ bytes (3.73 GiB). For scale: the weight alone is 1 GiB in float32 and
2 GiB in float64, and loading a checkpoint holds the file's tensors and the model's at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class BigLinear(nn.Module):
    """Linear(size → size) → ReLU: the architecture the benchmark's checkpoint is loaded into."""

    def __init__(self, size: int = 16384):
        super().__init__()
        self.fc = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def write_checkpoint(path: Path, size: int, seed: int = 0) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, size, generator=gen)
    weight /= size**0.5
    save_file({"fc.weight": weight, "fc.bias": 0.01 * torch.randn(size, generator=gen)}, str(path))


def check_output(path: Path, size: int, rank: int) -> dict:
    """Read the compressed file's manifest and factors (no dense model is built)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        manifest = json.loads(f.metadata()["lrc"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    layer = manifest["layers"]["fc"]
    shapes = {key: list(t.shape) for key, t in tensors.items()}
    assert layer["rank"] == rank, layer
    assert shapes["fc.down.weight"] == [rank, size] and shapes["fc.up.weight"] == [size, rank], shapes
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), "non-finite factors"
    return {"rank": layer["rank"], "kind": layer["kind"], "tensors": shapes}


def run(size: int, rank: int, budget_bytes: float, workdir: Path) -> dict:
    checkpoint = workdir / "big_linear.safetensors"
    output = workdir / "big_linear.lrc.safetensors"
    write_checkpoint(checkpoint, size)
    command = [
        sys.executable, "-m", "lowrank_compress", "compress", str(checkpoint), "--arch", "big_layer:BigLinear",
        "--arch-kwargs", json.dumps({"size": size}), "--input-shape", f"1,{size}", "--rank", str(rank),
        "--quiet", "-o", str(output),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lrc compress failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    return {
        "size": size,
        "rank": rank,
        "weight_bytes": size * size * 4,
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 3),
        "budget_bytes": budget_bytes,
        "within_budget": peak <= budget_bytes,
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "output": check_output(output, size, rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="m = d of the Linear layer")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--budget-gb", type=float, default=4.0, help="peak RSS budget in GB (10⁹ bytes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrc-big-layer-") as tmp:
        result = run(args.size, args.rank, args.budget_gb * 1e9, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if not result["within_budget"]:
        raise SystemExit(f"peak RSS {result['peak_rss_gib']} GiB exceeds the {args.budget_gb} GB budget")


if __name__ == "__main__":
    main()
