"""Deployment targets and latency-aware planning: rank rounding, layers kept dense where factorizing
does not pay, FLOPs and latency budgets allocated by measured time.

Most tests replace the timer by a deterministic cost model (time ∝ multiply-adds, plus a fixed cost
per kernel), so that the planning logic is tested without timing noise; one test times real layers
in onnxruntime where the difference is many-fold.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowrank_compress import bench
from lowrank_compress.compress import CompressConfig, compress, plan
from lowrank_compress.config import TARGETS as TARGET_NAMES
from lowrank_compress.errors import UsageError
from lowrank_compress.layers import LowRankLinear
from lowrank_compress.modelrun import count_flops
from lowrank_compress.ranks import TARGETS, _site_multiple

KERNEL_S = 1e-4  # fixed cost of one kernel launch in the cost model
MAC_S = 1e-9  # seconds per multiply-add


def modelled_seconds(layer: nn.Module, x: torch.Tensor, slow: set[tuple[int, int]] = frozenset()) -> float:
    """Cost model: each Linear costs KERNEL_S + MAC_S per multiply-add; factorized layers whose
    (in, out) widths are in ``slow`` cost 3× their dense form (a layer whose pair runs badly)."""
    rows = x.numel() // x.shape[-1]
    if isinstance(layer, LowRankLinear):
        if (layer.in_features, layer.out_features) in slow:
            return 3 * (KERNEL_S + MAC_S * rows * layer.in_features * layer.out_features)
        return 2 * KERNEL_S + MAC_S * rows * layer.rank * (layer.in_features + layer.out_features)
    return KERNEL_S + MAC_S * rows * layer.in_features * layer.out_features


class Slow(set):
    """The (in, out) widths whose factorized pair runs 3× slow, and a cost that every pair adds
    only inside a whole model (``pair_in_model_s``: a kernel the model's graph cannot fuse)."""

    pair_in_model_s = 0.0


@pytest.fixture
def cost_model(monkeypatch):
    """Time layers and whole models by :func:`modelled_seconds` instead of a clock."""
    slow = Slow()

    def layer_latencies(layers, x, runtime="torch", device="cpu", **_):
        return {name: model_seconds(layer, x, slow) for name, layer in layers.items()}

    def measure_latency(models, input_shape, batch_sizes=(1,), baseline=None, **_):
        report = bench.LatencyReport("modelled", "cpu", None, list(input_shape), baseline or next(iter(models)))
        x = torch.zeros(batch_sizes[0], *input_shape[1:])
        times = {name: model_seconds(model, x, slow) for name, model in models.items()}
        for name, t in times.items():
            report.results.append(bench.LatencyResult(name, batch_sizes[0], t, 0.0, 1, t / times[report.baseline]))
        return report

    monkeypatch.setattr(bench, "layer_latencies", layer_latencies)
    monkeypatch.setattr(bench, "measure_latency", measure_latency)
    return slow


def model_seconds(model: nn.Module, x: torch.Tensor, slow: Slow) -> float:
    """The cost model summed over a model's dense and factorized layers."""
    inner = {id(m) for p in model.modules() if isinstance(p, LowRankLinear) for m in (p.down, p.up)}
    seconds = sum(modelled_seconds(m, x, slow) for m in model.modules()
                  if isinstance(m, (nn.Linear, LowRankLinear)) and id(m) not in inner)
    if not isinstance(model, (nn.Linear, LowRankLinear)):
        seconds += slow.pair_in_model_s * sum(isinstance(m, LowRankLinear) for m in model.modules())
    return seconds


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 240), nn.ReLU(), nn.Linear(240, 128),
                         nn.ReLU(), nn.Linear(128, 64)).eval()


# ---------------------------------------------------------------- targets and rounding


def test_every_target_named_in_the_config_has_a_spec():
    assert set(TARGETS) == set(TARGET_NAMES)
    assert TARGETS["onnxruntime-cpu"].rank_multiple == 16 and TARGETS["torch-cuda"].rank_multiple == 8


def test_speed_budget_ranks_are_multiples_of_the_targets_multiple_and_size_budgets_are_not_rounded():
    x = torch.randn(1, 256)
    for target, multiple in (("onnxruntime-cpu", 16), ("torch-cuda", 8)):
        config = CompressConfig(target_flops=0.5, target=target, method="spectral", latency_aware=False)
        ranks = plan(mlp(), config, x).ranks
        assert ranks and all(r % multiple == 0 for r in ranks.values()), (target, ranks)
    ranks = plan(mlp(), CompressConfig(target_params=0.5, method="spectral"), x).ranks
    assert ranks and any(r % 8 for r in ranks.values()), ranks


def test_an_explicit_rank_is_not_rounded_and_round_to_overrides_the_target():
    x = torch.randn(1, 256)
    assert set(plan(mlp(), CompressConfig(rank=5), x).ranks.values()) == {5}
    ranks = plan(mlp(), CompressConfig(target_params=0.5, round_to=4, method="spectral"), x).ranks
    assert any(r % 8 for r in ranks.values()) and all(r % 4 == 0 for r in ranks.values())


def test_a_small_layer_takes_half_the_multiple_until_two_fit():
    assert _site_multiple(51, 16, explicit=False) == 16  # resnet50's narrowest 1×1 keeps 16
    assert _site_multiple(9, 16, explicit=False) == 4
    assert _site_multiple(9, 16, explicit=True) == 16


def test_latency_aware_planning_is_on_by_default_only_with_a_flops_or_latency_budget():
    assert CompressConfig(target_flops=0.5).times_layers
    assert CompressConfig(target_latency=0.6).times_layers
    assert not CompressConfig(target_params=0.5).times_layers
    assert not CompressConfig(rank=8).times_layers
    assert not CompressConfig(target_flops=0.5, latency_aware=False).times_layers


@pytest.mark.parametrize(("given", "sizes"), [(None, (1, 16)), (64, (64,)), ("16, 1,16", (1, 16)), ([8, 2], (2, 8))])
def test_latency_batch_sizes_are_normalized_and_survive_a_round_trip(given, sizes):
    extra = {} if given is None else {"latency_batch_size": given}
    config = CompressConfig(target_flops=0.5, **extra)
    assert config.latency_batch_size == sizes
    assert CompressConfig.from_dict(json.loads(json.dumps(config.to_dict()))).latency_batch_size == sizes


@pytest.mark.parametrize("bad", [0, "1,0", "one", "", True, 1.5, [1, -2]])
def test_bad_latency_batch_sizes_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--latency-batch-size must be positive integers"):
        CompressConfig(target_flops=0.5, latency_batch_size=bad)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_flops": 0.5, "target": "tpu"}, "--target must be one of"),
    ({"target_latency": 0.6, "latency_aware": False}, "cannot run with --no-latency-aware"),
    ({"target_latency": 1.5}, r"--target-latency must be in \(0, 1\]"),
    ({"target_latency": 0.5, "target_flops": 0.5}, "exactly one rank policy"),
])
def test_bad_target_settings_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        CompressConfig(**kwargs)


# ---------------------------------------------------------------- planning by measured time


def test_a_layer_that_is_slower_factorized_stays_dense_and_the_flops_budget_still_holds(cost_model):
    cost_model.add((256, 240))  # layer 2's factorized pair runs at 3× its dense time
    x = torch.randn(1, 256)
    model, report = compress(mlp(), CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=64), x)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["2"].startswith("kept dense by latency-aware planning")
    assert "ms" in reasons["2"] and isinstance(model[2], nn.Linear)
    assert report.flops_after / report.flops_before <= 0.5
    notes = {layer.name: layer.note for layer in report.layers}
    assert notes and all("dense" in n and "factorized" in n and "ms" in n for n in notes.values())


def test_a_layer_must_pay_at_every_timing_batch_size(cost_model):
    # In the cost model a pair pays at batch 64 (multiply-adds dominate) and not at batch 1 (its
    # second kernel launch dominates): planned for batch 64 alone the layers are factorized,
    # planned for both they stay dense, each reason giving the times at both batch sizes.
    x = torch.randn(1, 256)
    _, alone = compress(mlp(), CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=64), x)
    assert len(alone.layers) >= 2
    assert all("batch 64" in layer.note and "batch 1:" not in layer.note for layer in alone.layers)
    _, both = compress(mlp(), CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=(1, 64)), x)
    assert not both.layers
    for skip in both.skipped:
        assert skip.reason.startswith("kept dense by latency-aware planning"), skip
        assert "batch 1: dense" in skip.reason and "batch 64: dense" in skip.reason, skip


def test_without_latency_aware_the_slow_layer_is_factorized(cost_model):
    cost_model.add((256, 240))
    config = CompressConfig(target_flops=0.5, method="spectral", latency_aware=False, latency_batch_size=64)
    _, report = compress(mlp(), config, torch.randn(1, 256))
    assert "2" in {layer.name for layer in report.layers}


def test_a_flops_plan_whose_whole_model_is_not_faster_gives_back_the_layers_that_save_least(cost_model):
    # Both planned pairs pay timed alone; inside the model each costs a further 2.6 ms, so with
    # both the model is barely faster than dense (0.99×, not below 0.97×). The whole-model check
    # gives back layer 2 (it saves 2.3 ms alone, layer 0 3.05 ms), and with layer 0 alone the model
    # takes 0.96× the dense time.
    x, x64 = torch.randn(1, 256), torch.zeros(64, 256)
    config = CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=64)
    _, free = compress(mlp(), config, x)
    assert {layer.name for layer in free.layers} == {"0", "2"}
    assert all("whole model measured at" in layer.note for layer in free.layers)
    assert not any("whole-model check" in s.reason for s in free.skipped)
    cost_model.pair_in_model_s = 2.6e-3
    planned = {"0": free.layers[0].rank, "2": free.layers[1].rank}
    model, report = compress(mlp(), config, x)
    back = {s.name: s.reason for s in report.skipped if "whole-model check" in s.reason}
    assert set(back) == {"2"} and isinstance(model[2], nn.Linear) and isinstance(model[0], LowRankLinear)
    assert "with 2 layers factorized the model measured batch 64 0.99×" in back["2"]
    assert model[0].rank == planned["0"]
    assert model_seconds(model, x64, cost_model) < model_seconds(mlp(), x64, cost_model)
    assert "whole model measured at 0.96× dense" in report.layers[0].note


def test_a_flops_plan_slower_than_dense_with_every_layer_becomes_the_dense_model(cost_model):
    cost_model.pair_in_model_s = 1.0  # every pair costs a second inside the model
    x = torch.randn(1, 256)
    model, report = compress(mlp(), CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=64), x)
    assert not report.layers and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model)
    back = {s.name: s.reason for s in report.skipped if "whole-model check" in s.reason}
    assert set(back) == {"0", "2"}
    # Checked with both layers, layer 2 (saving less) went back; then with layer 0 alone, it did.
    assert "with 2 layers factorized" in back["2"] and "with 1 layer factorized" in back["0"]


def test_a_latency_budget_is_met_by_the_modelled_whole_model_time(cost_model):
    x = torch.randn(1, 256)
    model = mlp()
    dense_s = bench.measure_latency({"m": model}, (1, 256), [64]).results[0].median_s
    config = CompressConfig(target_latency=0.6, method="spectral", latency_batch_size=64)
    compressed, report = compress(mlp(), config, x)
    after_s = bench.measure_latency({"m": compressed}, (1, 256), [64]).results[0].median_s
    assert after_s / dense_s <= 0.6
    assert after_s / dense_s > 0.4  # the budget is spent, not overshot
    assert all("whole model measured at" in layer.note for layer in report.layers)


def test_a_latency_budget_allocates_by_time_not_flops(cost_model):
    # The other layers are cheap to factorize in time; the one slow pair never pays.
    cost_model.add((128, 64))
    config = CompressConfig(target_latency=0.7, method="spectral", latency_batch_size=64)
    the_plan = plan(mlp(), config, torch.randn(1, 256))
    entry = {e.name: e for e in the_plan.entries}
    assert entry["6"].rank is None and "latency-aware" in entry["6"].reason
    assert entry["0"].rank is not None


# ---------------------------------------------------------------- real timing


def _small_and_big() -> nn.Sequential:
    # A big layer at a tiny rank (much faster factorized) and a small one near its max useful rank
    # (two small matmuls instead of one: slower).
    return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 64)).eval()


def test_latency_aware_keeps_dense_the_layers_onnxruntime_runs_slower_factorized():
    # At the default timing batch sizes (1 and 16) the small layer's multiply-adds are next to
    # nothing and the pair's second kernel is pure cost; at batch 64 the two were close enough for
    # a loaded machine to time the pair faster now and then.
    torch.manual_seed(0)
    config = CompressConfig(rank=31, latency_aware=True, include="^(0|4)$", refine_steps=0)
    model, report = compress(_small_and_big(), config, torch.randn(1, 2048))
    kept = {layer.name for layer in report.layers}
    reverted = {s.name: s.reason for s in report.skipped if "latency-aware" in s.reason}
    assert "0" in kept and isinstance(model[0], LowRankLinear)
    assert "4" in reverted and isinstance(model[4], nn.Linear)
    assert "onnxruntime-cpu batch 1: dense" in reverted["4"] and "; batch 16: dense" in reverted["4"]


def test_without_latency_aware_both_layers_are_factorized():
    model, report = compress(_small_and_big(), CompressConfig(rank=31, include="^(0|4)$"), torch.randn(1, 2048))
    assert {layer.name for layer in report.layers} == {"0", "4"}


def test_where_no_layer_pays_a_flops_budget_leaves_the_model_dense(cost_model):
    # At batch 1 the cost model's kernel launches outweigh the multiply-adds: every pair is slower.
    x = torch.randn(1, 256)
    model, report = compress(mlp(), CompressConfig(target_flops=0.5, method="spectral"), x)
    assert not report.layers and report.flops_after == report.flops_before == count_flops(model, x)
    assert all(s.reason.startswith("kept dense by latency-aware planning") for s in report.skipped)
