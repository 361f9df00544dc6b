"""Compression end to end on real architectures and the rank policies (docs/design.md §4).

Each architecture of ``models.MODEL_CASES`` is compressed once per module (random weights, small
inputs) at rank ratio 0.25; the tests then check the activations found, the outputs, the report
against the saved tensors, the save → load round trip and the CLI on a state dict.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from models import MLP, MODEL_CASES, ConvBNNet, ModelCase, randomize_batchnorm, saved_param_count
from safetensors.torch import save_file
from torch import nn

from lowrank_compress.compress import CompressConfig, CompressReport, compress, count_flops, count_params
from lowrank_compress.config import Skip
from lowrank_compress.errors import UsageError
from lowrank_compress.graph import LayerSite, find_sites
from lowrank_compress.layers import LOW_RANK_TYPES
from lowrank_compress.io.format import load, save
from lowrank_compress.pipeline import output_error

# One test item per model and entry point: pytest-xdist (with pytest 9) cannot keep the tests that
# share a module-scoped model on one worker, so each item compresses its model once and checks
# every point of the issue on it.


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _example(case: ModelCase) -> torch.Tensor:
    return torch.randn(case.input_shape, generator=torch.Generator().manual_seed(1))


def check_known_activations(case: ModelCase, sites: dict[str, LayerSite]) -> None:
    for name, expected in case.expect.items():
        site = sites[name]
        if isinstance(expected, str):
            assert site.skip_reason is not None and expected in site.skip_reason, (name, site.skip_reason)
            continue
        activation, bn_before, affine_after = expected
        assert site.activation == activation, (name, site.activation, site.notes)
        assert (site.bn_before.name if site.bn_before else None) == bn_before, name
        assert (site.affine_after.name if site.affine_after else None) == affine_after, name


def check_layer_reports(layers: list[dict], sites: dict[str, LayerSite], model: nn.Module) -> None:
    """Rank round(0.25·min(m, d)), the activation found, params that add up, nkp ≤ spectral."""
    assert len(layers) >= 3
    for layer in layers:
        name, (m, d) = layer["name"], layer["shape"]
        assert layer["rank"] == max(1, round(0.25 * min(m, d))), name
        assert layer["activation"] == sites[name].activation, name
        module = model.get_submodule(name)
        assert isinstance(module, LOW_RANK_TYPES) and module.rank == layer["rank"], name
        assert layer["params_after"] == sum(p.numel() for p in module.parameters()), name
        assert layer["params_before"] == sites[name].params, name
        assert layer["params_after"] < layer["params_before"], name
        assert layer["error_nkp"] <= layer["error_spectral"] * (1 + 1e-9) + 1e-12, name
        assert 0.0 <= layer["error_nkp"] <= 1.0 + 1e-9, name


def check_skipped(report: dict, sites: dict[str, LayerSite], model: nn.Module, exclude: str | None) -> None:
    reported = {layer["name"] for layer in report["layers"]}
    skipped = {item["name"]: item["reason"] for item in report["skipped"]}
    assert reported.isdisjoint(skipped) and reported | set(skipped) == set(sites)
    for name, reason in skipped.items():
        assert reason, name
        assert not isinstance(model.get_submodule(name), LOW_RANK_TYPES), name
    if exclude:
        excluded = [n for n, s in sites.items() if exclude in n and s.eligible]
        assert excluded and all(skipped[n] == "matched by --exclude" for n in excluded)


def check_totals(report: dict, path: Path, loaded: nn.Module, params_before: int) -> None:
    assert report["params_before"] == params_before
    assert report["params_after"] == saved_param_count(path, loaded) == count_params(loaded)
    saved = sum(layer["params_before"] - layer["params_after"] for layer in report["layers"])
    assert report["params_before"] - report["params_after"] == saved
    assert report["flops_after"] < report["flops_before"]


@pytest.mark.parametrize("key", list(MODEL_CASES))
def test_compress_at_quarter_rank_ratio_then_save_and_load(key, tmp_path):
    """Activations found, finite outputs of the right shape, report = saved tensors, exact round trip."""
    case = MODEL_CASES[key]
    model = case.build()
    x = _example(case)
    reference = _outputs(model, x)
    params_before = sum(p.numel() for p in model.parameters())
    sites = {s.name: s for s in find_sites(model, x)}
    check_known_activations(case, sites)

    same, report = compress(model, CompressConfig(rank_ratio=0.25, exclude=case.exclude), x)
    assert same is model
    out = _outputs(model, x)
    assert out.shape == reference.shape and bool(torch.isfinite(out).all())
    assert not torch.equal(out, reference)
    data = report.to_dict()
    check_layer_reports(data["layers"], sites, model)
    check_skipped(data, sites, model, case.exclude)

    path = tmp_path / f"{key}.lrc.safetensors"
    save(model, path, arch=case.arch, arch_kwargs=case.arch_kwargs or {}, input_shape=list(case.input_shape))
    loaded = load(path)
    check_totals(data, path, loaded, params_before)
    assert torch.equal(_outputs(loaded, x), out)  # save → load reproduces the outputs exactly


@pytest.mark.parametrize("key", list(MODEL_CASES))
def test_cli_compress_end_to_end_on_a_state_dict(key, tmp_path, run_cli):
    case = MODEL_CASES[key]
    model = case.build()
    params_before = sum(p.numel() for p in model.parameters())
    x = _example(case)
    reference = _outputs(model, x)
    checkpoint = tmp_path / f"{key}.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    report_path = tmp_path / "report.json"
    result = run_cli("compress", checkpoint, *case.cli_args(), "--rank-ratio", "0.25", "--json", report_path, "--quiet")
    assert result.code == 0, result.err
    output = tmp_path / f"{key}.lrc.safetensors"  # default: CKPT stem + .lrc.safetensors
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.name, output.name, report_path.name])
    assert result.err_lines == [f"wrote {output}"] and result.out == ""  # --quiet: no tables
    report = json.loads(report_path.read_text())
    assert set(report) >= {"params_before", "params_after", "flops_before", "flops_after", "layers", "skipped"}
    assert set(report["layers"][0]) >= {"name", "kind", "activation", "shape", "rank", "params_before",
                                        "params_after", "error_spectral", "error_nkp"}
    loaded = load(output)
    sites = {s.name: s for s in find_sites(case.build(), x)}
    check_layer_reports(report["layers"], sites, loaded)
    check_skipped(report, sites, loaded, case.exclude)
    check_totals(report, output, loaded, params_before)
    out = _outputs(loaded, x)
    assert out.shape == reference.shape and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------- rank policies on small models


def small_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_batchnorm(ConvBNNet(channels=32)).eval(), torch.randn(1, 3, 16, 16)


def ranks_of(report: CompressReport) -> dict[str, int]:
    return {layer.name: layer.rank for layer in report.layers}


def test_rank_ratio_policy():
    model, x = small_cnn()
    _, report = compress(model, CompressConfig(rank_ratio=0.3), x)
    # conv1 32×27, conv2 64×288, head 10×64
    assert ranks_of(report) == {"conv1": 8, "conv2": 19, "head": 3}


def test_param_ratio_policy_keeps_that_share_of_each_layer():
    model, x = small_cnn()
    _, report = compress(model, CompressConfig(param_ratio=0.5, method="spectral"), x)
    expected = {name: math.floor(0.5 * m * d / (m + d)) for name, (m, d) in
                (("conv1", (32, 27)), ("conv2", (64, 288)), ("head", (10, 64)))}
    assert ranks_of(report) == expected
    for layer in report.layers:
        m, d = layer.shape
        assert layer.rank * (m + d) <= 0.5 * m * d


def test_rank_is_capped_at_the_max_useful_rank_with_a_note():
    model = MLP(d_in=64, hidden=64, classes=10).eval()
    sites = {s.name: s for s in find_sites(model, torch.randn(2, 64))}
    _, report = compress(model, CompressConfig(rank=1000, method="spectral"), torch.randn(2, 64))
    for layer in report.layers:
        assert layer.rank == sites[layer.name].max_useful_rank
        assert layer.note == f"rank 1000 capped at the max useful rank {layer.rank}"
        assert layer.params_after < layer.params_before
    # 64×64: 32·128 = 64·64 ties with dense, so the largest saving rank is 31
    assert ranks_of(report)["fc2"] == 31


def test_uniform_rank_below_the_cap_is_used_as_given():
    model = MLP().eval()
    _, report = compress(model, CompressConfig(rank=5), torch.randn(2, 48))
    assert set(ranks_of(report).values()) == {5}
    assert all(layer.note is None for layer in report.layers)


def test_layers_that_would_not_save_parameters_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2), nn.Linear(2, 2)).eval()
    _, report = compress(model, CompressConfig(rank_ratio=1.0), torch.randn(3, 64))
    skipped = {item.name: item.reason for item in report.skipped}
    assert skipped["0"] == "rank 64 would not save parameters (max useful rank 31)"
    assert skipped["2"] == "rank 2 would not save parameters (max useful rank 1)"
    assert skipped["3"] == "too small: no rank saves parameters"
    assert report.layers == [] and report.params_after == report.params_before
    assert not any(isinstance(m, LOW_RANK_TYPES) for m in model.modules())


def test_a_fitted_bias_never_makes_a_layer_bigger_than_dense():
    # 16×17 without bias, BN before ReLU: at the max useful rank 8 the factors have 264 < 272 weights,
    # but nkp fits a bias (16 more) for the folded BN: 280 > 272.
    model = randomize_batchnorm(nn.Sequential(nn.Linear(17, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU())).eval()
    params_before = count_params(model)
    _, report = compress(model, CompressConfig(rank=100), torch.randn(2, 17))
    assert all(layer.params_after < layer.params_before for layer in report.layers)
    assert report.params_after <= params_before


def test_include_and_exclude_select_layers_by_regex():
    model, x = small_cnn()
    _, report = compress(model, CompressConfig(rank=4, include=r"^conv"), x)
    assert set(ranks_of(report)) == {"conv1", "conv2"}
    assert Skip("head", "not matched by --include") in report.skipped
    model, x = small_cnn()
    _, report = compress(model, CompressConfig(rank=4, exclude=r"conv2|head"), x)
    assert set(ranks_of(report)) == {"conv1"}
    assert Skip("conv2", "matched by --exclude") in report.skipped
    assert isinstance(model.conv2, nn.Conv2d) and isinstance(model.head, nn.Linear)


def test_round_to_gives_multiples_below_the_cap():
    model, x = small_cnn()
    _, report = compress(model, CompressConfig(rank_ratio=0.3, round_to=8), x)
    ranks = ranks_of(report)
    # conv1 round(8.1) = 8; conv2 round(19.2) = 19 → 16; head round(3) = 3 → 8 (its max useful rank)
    assert ranks == {"conv1": 8, "conv2": 16, "head": 8}
    assert next(layer.note for layer in report.layers if layer.name == "conv2") == "rank 19 rounded to 16"


def test_compress_is_in_place_and_outputs_stay_close_at_high_rank():
    model, x = small_cnn()
    reference = _outputs(model, x)
    same, report = compress(model, CompressConfig(param_ratio=0.9), x)
    assert same is model
    out = _outputs(model, x)
    assert float((out - reference).norm() / reference.norm()) < 0.5
    assert report.config["_type"] == "CompressConfig" and report.config["_data"]["param_ratio"] == 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one rank policy"),
        ({"rank": 4, "rank_ratio": 0.5}, "got --rank and --rank-ratio"),
        ({"rank": 0}, "--rank must be a positive integer"),
        ({"rank": 2.5}, "--rank must be a positive integer"),
        ({"rank_ratio": 0.0}, r"--rank-ratio must be in \(0, 1\]"),
        ({"rank_ratio": 1.5}, r"--rank-ratio must be in \(0, 1\]"),
        ({"param_ratio": float("nan")}, r"--param-ratio must be in \(0, 1\]"),
        ({"target_params": -0.1}, r"--target-params must be in \(0, 1\]"),
        ({"target_flops": 2}, r"--target-flops must be in \(0, 1\]"),
        ({"rank": 4, "method": "svd"}, "unknown method 'svd'"),
        ({"rank": 4, "round_to": 0}, "--round-to must be a positive integer"),
        ({"rank": 4, "include": "("}, "bad --include regex"),
        ({"rank": 4, "exclude": "[a"}, "bad --exclude regex"),
    ],
)
def test_bad_configs_are_refused_before_any_work(kwargs, message):
    with pytest.raises(UsageError, match=message):
        CompressConfig(**kwargs)


def test_config_round_trips_through_its_dict():
    config = CompressConfig(rank_ratio=0.25, exclude="classifier", round_to=8)
    again = CompressConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(UsageError, match="not a CompressConfig"):
        CompressConfig.from_dict({"_type": "os.system", "_data": {}})


# ---------------------------------------------------------------- budgets


@pytest.fixture(scope="module")
def resnet18_small():
    import torchvision

    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18()).eval(), torch.randn(1, 3, 64, 64)


# The budget allocation itself does not depend on the method; spectral error curves are fast on a
# resnet (nkp curves run the per-row fit at every candidate rank: about a minute on resnet18).
@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_target_params_keeps_at_most_that_fraction(resnet18_small, fraction):
    model, x = copy.deepcopy(resnet18_small[0]), resnet18_small[1]
    _, report = compress(model, CompressConfig(target_params=fraction, method="spectral"), x)
    ratio = report.params_after / report.params_before
    assert fraction - 0.05 <= ratio <= fraction  # at most F, and the budget is spent
    assert report.params_after == count_params(model)
    assert len({layer.rank for layer in report.layers}) > 1  # ranks differ across layers


def test_target_flops_keeps_at_most_that_fraction(resnet18_small):
    model, x = copy.deepcopy(resnet18_small[0]), resnet18_small[1]
    _, report = compress(model, CompressConfig(target_flops=0.5, method="spectral", latency_aware=False), x)
    ratio = report.flops_after / report.flops_before
    assert 0.45 <= ratio <= 0.5
    assert report.flops_after == count_flops(model, x)
    kept = {item.name for item in report.skipped if item.reason == "kept dense by the budget allocation"}
    names = {s.name for s in find_sites(copy.deepcopy(resnet18_small[0]), x)}
    assert kept | {layer.name for layer in report.layers} == names


@pytest.mark.parametrize("policy", ["target_params", "target_flops"])
def test_nkp_budgets_on_a_small_cnn(policy):
    model, x = small_cnn()
    # latency_aware=False: the FLOPs budget alone (timed planning may keep layers dense that do not pay)
    _, report = compress(model, CompressConfig(**{policy: 0.4}, latency_aware=False), x)
    before, after = (report.params_before, report.params_after) if policy == "target_params" else (
        report.flops_before, report.flops_after)
    assert after / before <= 0.4
    assert report.layers


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.emb(input_ids))


def test_output_error_leaves_padded_token_positions_out():
    torch.manual_seed(0)
    original = _Tokens().eval()
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed.fc.weight.add_(0.1 * torch.randn_like(changed.fc.weight))
    ids = torch.randint(0, 10, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    other_padding = ids.clone()
    other_padding[0, 4:] = (ids[0, 4:] + 3) % 10  # other tokens where the mask says padding
    error = output_error(original, changed, [{"input_ids": ids, "attention_mask": mask}])
    assert error > 0
    assert error == output_error(original, changed, [{"input_ids": other_padding, "attention_mask": mask}])
    real = [{"input_ids": ids[:1, :4], "attention_mask": mask[:1, :4]}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    assert error == pytest.approx(output_error(original, changed, real), rel=1e-6)  # only the real tokens count
    unmasked = output_error(original, changed, [{"input_ids": other_padding, "attention_mask": torch.ones_like(mask)}])
    assert unmasked != pytest.approx(error)
