"""Function vs parameter approximation: the error of spectral and nkp as the rank falls (docs/design.md §2).

    .venv/bin/python benchmarks/paper_gap.py                  # d = 64, 256, 1024; CSV + PNG in benchmarks/out/
    .venv/bin/python benchmarks/paper_gap.py --out docs/      # the figure the README shows

What is measured: for each input dimension d, one Gaussian layer W ~ N(0, 1/d) of shape (m, d) with
m = 4d and ReLU after it, no bias (seeded). At each rank r = 1, 2, 4, …, 256 (up to min(m, d)) it is
factorized by ``lowrank_compress.factorize`` — spectral (SVD truncation, the best rank-r fit of
the *weights*) and nkp (the same subspace, rows rescaled to the best rank-r fit of the *function*)
— and scored by ``function_error(..., relative=True)``: E‖relu(Wx) − relu(W'x)‖² / E‖relu(Wx)‖² for
x ~ N(0, I), in closed form (the arc-cosine kernel). 1.0 is the error of predicting zero.

Writes ``paper_gap.csv`` (d, m, rank, spectral, nkp, gap = spectral − nkp) and ``paper_gap.png``
to ``--out`` and prints a markdown table. Runs on one thread in well under two minutes.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from lowrank_compress import factorize
from lowrank_compress.gaussian import function_error
from lowrank_compress.io.files import atomic_output

DIMS = (64, 256, 1024)
RANKS = tuple(2**k for k in range(9))  # 1 … 256
METHODS = ("spectral", "nkp")


def gaussian_layer(d: int, seed: int) -> torch.Tensor:
    """W (4d, d) with iid N(0, 1/d) entries, float64."""
    gen = torch.Generator().manual_seed(seed + d)
    return torch.randn(4 * d, d, generator=gen, dtype=torch.float64) / d**0.5


def measure(dims: tuple[int, ...], ranks: tuple[int, ...], seed: int) -> list[dict[str, float]]:
    """One row per (d, r ≤ min(m, d)): relative function error of each method."""
    rows = []
    for d in dims:
        w = gaussian_layer(d, seed)
        for r in (r for r in ranks if r <= d):
            row: dict[str, float] = {"d": d, "m": 4 * d, "rank": r}
            for method in METHODS:
                row[method] = function_error(w, None, factorize(w, r, method, "relu"), "relu", relative=True)
            row["gap"] = row["spectral"] - row["nkp"]
            rows.append(row)
    return rows


def write_csv(rows: list[dict[str, float]], path: Path) -> None:
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["d", "m", "rank", *METHODS, "gap"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


def write_png(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, d in enumerate(sorted({int(r["d"]) for r in rows})):
        mine = [r for r in rows if r["d"] == d]
        color = f"C{i}"
        ranks = [r["rank"] for r in mine]
        ax.plot(ranks, [r["spectral"] for r in mine], "--", color=color, marker="x", label=f"spectral, d={d}")
        ax.plot(ranks, [r["nkp"] for r in mine], "-", color=color, marker="o", ms=4, label=f"nkp, d={d}")
    ax.set_xscale("log", base=2)
    shown = sorted({int(r["rank"]) for r in rows})
    ax.set_xticks(shown, [str(r) for r in shown])
    ax.set_xlabel("rank r")
    ax.set_ylabel("relative function error  E‖σ(Wx) − σ(W′x)‖² / E‖σ(Wx)‖²")
    ax.set_ylim(0, 1.02)
    ax.set_title("ReLU layer W ~ N(0, 1/d), m = 4d, x ~ N(0, I): spectral (SVD) vs nkp", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict[str, float]]) -> str:
    dims = sorted({int(r["d"]) for r in rows})
    header = "| r | " + " | ".join(f"d={d}: spectral | nkp" for d in dims) + " |"
    lines = [header, "|---|" + "---|---|" * len(dims)]
    for rank in sorted({int(r["rank"]) for r in rows}):
        cells = []
        for d in dims:
            row = next((r for r in rows if r["d"] == d and r["rank"] == rank), None)
            cells += [f"{row['spectral']:.3f}", f"{row['nkp']:.3f}"] if row else ["–", "–"]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the CSV and the PNG")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="input dimensions d (m = 4d)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin against each other
    dims = tuple(int(v) for v in args.dims.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = measure(dims, RANKS, args.seed)
    seconds = time.perf_counter() - start
    write_csv(rows, args.out / "paper_gap.csv")
    write_png(rows, args.out / "paper_gap.png")
    print(markdown(rows))
    print(f"\nrelative function error (1.0 = predicting zero); seed {args.seed}; {seconds:.1f} s; "
          f"wrote {args.out / 'paper_gap.csv'} and {args.out / 'paper_gap.png'}")


if __name__ == "__main__":
    main()
