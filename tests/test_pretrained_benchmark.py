"""The figures ``benchmarks/pretrained.py`` derives from a compressed model's outputs, on constructed
embeddings whose answer is known (the benchmark itself needs wheels the tests may not download)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

_BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "pretrained.py"
_spec = importlib.util.spec_from_file_location("lrc_pretrained_benchmark", _BENCHMARK)
pretrained = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrained)


def _embeddings(n: int = 40, dim: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and documents that differ along a few strong directions, as sentence embeddings do."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(0, -2, dim)
    docs = F.normalize(torch.randn(n, dim, generator=gen) * spread, dim=-1)
    queries = F.normalize(docs + 0.3 * torch.randn(n, dim, generator=gen) * spread, dim=-1)
    return queries, docs


def test_an_error_along_the_leading_directions_is_found_there_and_removing_it_restores_agreement():
    ref_q, ref_d = _embeddings()
    ref = torch.cat([ref_q, ref_d]).double()
    basis = torch.linalg.svd(ref - ref.mean(0), full_matrices=False).Vh[:4].T
    gen = torch.Generator().manual_seed(1)
    error = (torch.randn(len(ref), 4, generator=gen, dtype=torch.float64) @ basis.T) * 0.5
    out = pretrained.error_by_direction(*(ref + error).float().split(len(ref_q)), ref_q, ref_d)
    by_k = {r["directions"]: r for r in out}
    assert [r["directions"] for r in out] == [*pretrained.ERROR_DIRECTIONS, "mean"]
    assert by_k[4]["error_share"] > 0.999 and by_k[128]["error_share"] > 0.999
    assert by_k[4]["agreement_without"] == 1.0
    q, d = F.normalize(ref + error, dim=-1).float().split(40)
    plain = (q @ d.T).argmax(-1)
    assert by_k[4]["agreement_with_only"] == round(float((plain == torch.arange(40)).float().mean()), 4) < 1.0


def test_an_error_off_the_leading_directions_carries_no_share_of_them():
    ref_q, ref_d = _embeddings(seed=2)
    ref = torch.cat([ref_q, ref_d]).double()
    directions = torch.linalg.svd(ref - ref.mean(0), full_matrices=True).Vh
    tail = directions[150:].T  # orthogonal to every direction the 80 embeddings vary along
    gen = torch.Generator().manual_seed(3)
    error = torch.randn(len(ref), tail.shape[1], generator=gen, dtype=torch.float64) @ tail.T * 0.01
    out = pretrained.error_by_direction(*(ref + error).float().split(len(ref_q)), ref_q, ref_d)
    assert all(r["error_share"] < 1e-6 for r in out if r["directions"] != "mean")
    assert all(r["agreement_with_only"] == 1.0 for r in out if r["directions"] != "mean")


def test_the_mean_direction_row_measures_the_error_along_the_mean_embedding():
    ref_q, ref_d = _embeddings(seed=4)
    ref = torch.cat([ref_q, ref_d]).double()
    mean = ref.mean(0) / ref.mean(0).norm()
    error = 0.05 * torch.linspace(-1, 1, len(ref), dtype=torch.float64)[:, None] * mean
    out = pretrained.error_by_direction(*(ref + error).float().split(len(ref_q)), ref_q, ref_d)
    row = out[-1]
    assert row["directions"] == "mean" and row["error_share"] > 0.999 and row["agreement_without"] == 1.0
