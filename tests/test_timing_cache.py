"""The timing cache: latency-aware plans made again from stored layer timings are the same plans.

Most tests time layers by a cost model with random noise on every measurement, so that two plans
agree only where the timings came from the cache; one runs the real CLI on onnxruntime twice.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from models import MLP
from safetensors.torch import save_file
from torch import nn

from lowrank_compress import bench
from lowrank_compress.compress import CompressConfig, compress, plan
from lowrank_compress.errors import UsageError
from lowrank_compress.io.timings import load_timing_cache, save_timing_cache
from lowrank_compress.latencyplan import LayerTimer, TimingCache
from lowrank_compress.graph import find_sites
from lowrank_compress.layers import LowRankLinear


def modelled_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """A launch cost per kernel plus one per multiply-add (as in test_latency_aware)."""
    rows = x.numel() // x.shape[-1]
    if isinstance(layer, LowRankLinear):
        return 2e-5 + 1e-9 * rows * layer.rank * (layer.in_features + layer.out_features)
    if isinstance(layer, nn.Linear):
        return 1e-5 + 1e-9 * rows * layer.in_features * layer.out_features
    return sum(modelled_seconds(m, x) for m in layer.children())  # a whole model: its layers at x


@pytest.fixture
def noisy_clock(monkeypatch):
    """Layer and whole-model timings from the cost model × a random factor in [0.6, 1.4]; the
    returned list records the versions timed by each call."""
    noise = random.Random()  # unseeded: two runs time differently
    calls: list[list[str]] = []

    def layer_latencies(layers, x, runtime="torch", device="cpu", **_):
        calls.append(list(layers))
        return {name: modelled_seconds(layer, x) * noise.uniform(0.6, 1.4) for name, layer in layers.items()}

    monkeypatch.setattr(bench, "layer_latencies", layer_latencies)
    return calls


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 192),
                         nn.ReLU(), nn.Linear(192, 64)).eval()


def ranks_of(the_plan) -> dict[str, int | None]:
    return {e.name: e.rank for e in the_plan.entries}


@pytest.mark.parametrize("budget", [{"target_flops": 0.5}, {"target_latency": 0.6}])
def test_a_plan_made_again_from_the_cache_file_is_the_same_and_times_nothing(tmp_path, noisy_clock, budget):
    config = CompressConfig(method="spectral", latency_batch_size=(1, 64), **budget)
    x = torch.randn(1, 256)
    path = tmp_path / "timings.json"
    first = plan(mlp(), config, x, timing_cache=path)
    calls = len(noisy_clock)
    assert calls > 0 and path.is_file()
    stored = json.loads(path.read_text())
    assert stored["format"] == "lrc-timing-cache" and len(stored["entries"]) > 0
    assert all(isinstance(v, float) and v > 0 for v in stored["entries"].values())

    again = plan(mlp(), config, x, timing_cache=path)
    assert len(noisy_clock) == calls  # nothing timed
    assert ranks_of(again) == ranks_of(first)
    assert [e.note for e in again.entries] == [e.note for e in first.entries]
    assert json.loads(path.read_text()) == stored  # nothing new to store


def test_compress_reports_reused_and_measured_timings(tmp_path, noisy_clock):
    config = CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=64)
    cache = TimingCache()
    _, first = compress(mlp(), config, torch.randn(1, 256), timing_cache=cache)
    assert first.timings == {"reused": 0, "measured": len(cache.entries)} and cache.measured > 0
    path = tmp_path / "t.json"
    save_timing_cache(cache, path)
    model, again = compress(mlp(), config, torch.randn(1, 256), timing_cache=path)
    assert again.timings["measured"] == 0 and again.timings["reused"] > 0
    assert {layer.name: layer.rank for layer in again.layers} == {layer.name: layer.rank for layer in first.layers}
    assert "timings" not in again.to_dict()  # the JSON report stays the same run to run


def test_identical_layers_at_the_same_input_shape_are_timed_once(noisy_clock):
    # Layers 0 and 2 are both Linear(256, 256) at a 256-wide input: one set of timings serves both.
    model = mlp()
    x = torch.randn(1, 256)
    sites = find_sites(model, x)
    timer = LayerTimer(model, sites, x, CompressConfig(target_flops=0.5, latency_batch_size=8))
    first = timer.times(sites[0], [32, 64])
    second = timer.times(sites[1], [32, 64])
    assert len(noisy_clock) == 1 and second == first
    timer.times(sites[2], [32])
    assert len(noisy_clock) == 2


def test_a_rank_timed_later_is_scaled_to_the_stored_dense_time(monkeypatch):
    # The machine is twice as slow on the second call: the new rank keeps the ratio it was measured
    # at against dense, relative to the dense time stored first.
    speed = iter([1.0, 2.0])

    def layer_latencies(layers, x, runtime="torch", device="cpu", **_):
        factor = next(speed)
        return {name: factor * modelled_seconds(layer, x) for name, layer in layers.items()}

    monkeypatch.setattr(bench, "layer_latencies", layer_latencies)
    model = mlp()
    x = torch.randn(1, 256)
    sites = find_sites(model, x)
    timer = LayerTimer(model, sites, x, CompressConfig(target_flops=0.5, latency_batch_size=4))
    dense = timer.times(sites[0], [32])[None][0]
    both = timer.times(sites[0], [32, 64])
    assert both[None][0] == dense
    probe = LowRankLinear(256, 256, 64)
    assert both[64][0] == pytest.approx(modelled_seconds(probe, torch.zeros(4, 256)))


def test_timings_of_another_machine_or_runtime_are_not_used(tmp_path, noisy_clock):
    config = CompressConfig(target_flops=0.5, method="spectral", latency_batch_size=64)
    path = tmp_path / "t.json"
    plan(mlp(), config, torch.randn(1, 256), timing_cache=path)
    stored = json.loads(path.read_text())
    fingerprint = bench.runtime_fingerprint("onnxruntime", "cpu")
    assert all(k.startswith(fingerprint + " | ") for k in stored["entries"])
    other = "onnxruntime, cpu, another machine"
    stored["entries"] = {k.replace(fingerprint, other): v for k, v in stored["entries"].items()}
    path.write_text(json.dumps(stored))
    calls = len(noisy_clock)
    _, report = compress(mlp(), config, torch.randn(1, 256), timing_cache=path)
    assert len(noisy_clock) > calls and report.timings["reused"] == 0
    entries = json.loads(path.read_text())["entries"]
    assert all(entries[k] == v for k, v in stored["entries"].items())  # the other machine's are kept
    new = [k for k in entries if k not in stored["entries"]]
    assert new and all(k.startswith(fingerprint + " | ") for k in new)

    def layer_timings(keys: list[str], prefix: str) -> list[str]:
        return sorted(k[len(prefix) + 3:] for k in keys if " | model " not in k)

    # Every layer is timed again here. The whole-model checks need not match: the noisy clock can
    # make a plan whose check gives layers back, and each model it times is a new entry.
    assert layer_timings(new, fingerprint) == layer_timings(list(stored["entries"]), other)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"is not valid \(not JSON\)"),
    ('{"format": "something else", "entries": {}}', "is not an lrc timing cache"),
    ('{"format": "lrc-timing-cache", "version": 9, "entries": {}}', "version 9"),
    ('{"format": "lrc-timing-cache", "version": 1, "entries": []}', '"entries" must be an object'),
    ('{"format": "lrc-timing-cache", "version": 1, "entries": {"k": -1.0}}', "not a positive number"),
    ('{"format": "lrc-timing-cache", "version": 1, "entries": {"k": "1"}}', "not a positive number"),
    ('{"format": "lrc-timing-cache", "version": 1, "entries": {"k": NaN}}', "not a positive number"),
])
def test_a_bad_cache_file_is_a_usage_error_and_the_model_is_untouched(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=message):
        compress(model, CompressConfig(target_flops=0.5), torch.randn(1, 256), timing_cache=path)
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4, 6))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert path.read_text() == content


def test_a_missing_cache_file_starts_empty_and_a_directory_is_refused(tmp_path):
    assert load_timing_cache(tmp_path / "new.json").entries == {}
    with pytest.raises(UsageError, match="is not a regular file"):
        load_timing_cache(tmp_path)


def test_the_cli_plans_the_same_twice_with_a_timing_cache_and_refuses_it_over_the_checkpoint(tmp_path, run_cli):
    # Real onnxruntime timings: the second run measures nothing and writes the same ranks.
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in MLP().state_dict().items()}, str(ckpt))
    cache = tmp_path / "timings.json"
    reports = []
    for i in range(2):
        report = tmp_path / f"r{i}.json"
        result = run_cli("compress", ckpt, "--arch", "models:MLP", "--target-flops", "0.5", "--latency-batch-size", "4",
                         "--timing-cache", cache, "-o", tmp_path / f"c{i}.lrc.safetensors", "--json", report)
        assert result.code == 0, result.err
        reports.append(json.loads(report.read_text()))
    first, second = reports
    assert "0 measured" in result.out
    assert [(layer["name"], layer["rank"]) for layer in first["layers"]] == \
        [(layer["name"], layer["rank"]) for layer in second["layers"]]
    assert first["skipped"] == second["skipped"]

    result = run_cli("compress", ckpt, "--arch", "models:MLP", "--target-flops", "0.5", "--timing-cache", ckpt,
                     "-o", tmp_path / "c.lrc.safetensors")
    assert result.code != 0 and "would overwrite the input" in result.err
    assert not (tmp_path / "c.lrc.safetensors").exists()


def test_the_cli_refuses_a_bad_cache_file_with_one_line_and_writes_nothing(tmp_path, run_cli):
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in MLP().state_dict().items()}, str(ckpt))
    cache = tmp_path / "timings.json"
    cache.write_text('{"format": "lrc-timing-cache", "version": 1, "entries": {"k": 0}}')
    out = tmp_path / "c.lrc.safetensors"
    result = run_cli("compress", ckpt, "--arch", "models:MLP", "--target-flops", "0.5", "--timing-cache", cache,
                     "-o", out, "--json", tmp_path / "r.json")
    assert result.code == 2
    assert len(result.err_lines) == 1 and "timing cache" in result.err and "not a positive number" in result.err
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert cache.read_text().endswith('{"k": 0}}')
