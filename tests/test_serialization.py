"""The .lrc.safetensors format: manifest, strict round trip, tied modules, restricted arch specs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import MLP, ConvBNNet, TiedNet, randomize_batchnorm, saved_param_count
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.errors import UsageError
from lowrank_compress.layers import LowRankConv2d, LowRankLinear
from lowrank_compress.io.format import FORMAT_VERSION, MANIFEST_KEY, load, read_manifest, save


def compressed_convbn():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBNNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    compress(model, CompressConfig(rank=4), x)
    return model, x


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, x = compressed_convbn()
    path = tmp_path_factory.mktemp("ser") / "convbn.lrc.safetensors"
    manifest = save(model, path, arch="models:ConvBNNet", arch_kwargs={}, input_shape=[2, 3, 16, 16])
    return model, x, path, manifest


def rewrite_manifest(src, dst, **changes):
    """Copy a compressed file with manifest fields changed (a crafted file)."""
    manifest = read_manifest(src)
    manifest.update(changes)
    save_file(load_file(str(src)), str(dst), metadata={MANIFEST_KEY: json.dumps(manifest)})
    return dst


def test_save_load_reproduces_outputs_exactly(saved):
    model, x, path, _ = saved
    loaded = load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.conv1, LowRankConv2d) and loaded.conv1.rank == 4
    assert isinstance(loaded.head, LowRankLinear)
    assert not loaded.training


def test_manifest_records_how_to_rebuild(saved):
    model, _, path, manifest = saved
    on_disk = read_manifest(path)
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format_version"] == FORMAT_VERSION
    assert on_disk["arch"] == "models:ConvBNNet" and on_disk["arch_kwargs"] == {}
    assert on_disk["input_shape"] == [2, 3, 16, 16]
    assert on_disk["method"] == "nkp" and on_disk["dtype"] == "float32"
    assert on_disk["layers"] == {
        "conv1": {"kind": "LowRankConv2d", "rank": 4, "bias": model.conv1.up.bias is not None},
        "conv2": {"kind": "LowRankConv2d", "rank": 4, "bias": model.conv2.up.bias is not None},
        "head": {"kind": "LowRankLinear", "rank": 4, "bias": True},
    }


def test_saved_tensors_are_exactly_the_model_state(saved):
    model, _, path, _ = saved
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert keys == set(model.state_dict())
        for key in keys:
            assert torch.equal(f.get_tensor(key), model.state_dict()[key])
    assert saved_param_count(path, model) == sum(p.numel() for p in model.parameters())


def test_read_manifest_does_not_need_the_architecture(saved, tmp_path):
    _, _, path, _ = saved
    crafted = rewrite_manifest(path, tmp_path / "x.lrc.safetensors", arch="nowhere_pkg.models:Gone")
    assert read_manifest(crafted)["arch"] == "nowhere_pkg.models:Gone"


@pytest.mark.parametrize("spec", ["os:system", "builtins:exec", "subprocess:Popen", "models:make_mlp"])
def test_a_crafted_manifest_cannot_name_an_arbitrary_function(saved, tmp_path, spec, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    _, _, path, _ = saved
    crafted = rewrite_manifest(path, tmp_path / "evil.lrc.safetensors", arch=spec, arch_kwargs={"command": "touch pwned"})
    with pytest.raises(UsageError, match=f"names the architecture '{spec}', which is not an nn.Module class"):
        load(crafted)
    assert calls == []
    assert not (tmp_path / "pwned").exists()


def test_a_factory_function_arch_loads_when_the_caller_names_it(tmp_path):
    model = MLP(hidden=40).eval()
    x = torch.randn(3, 48)
    compress(model, CompressConfig(rank_ratio=0.25), x)
    path = tmp_path / "mlp.lrc.safetensors"
    save(model, path, arch="models:make_mlp", arch_kwargs={"hidden": 40}, input_shape=[3, 48])
    with pytest.raises(UsageError, match="not an nn.Module class"):
        load(path)
    loaded = load(path, arch="models:make_mlp")  # kwargs come from the manifest
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_tied_modules_are_saved_once_and_still_tied_after_load(tmp_path):
    torch.manual_seed(0)
    model = TiedNet().eval()
    x = torch.randn(4, 24)
    _, report = compress(model, CompressConfig(rank=8), x)
    assert model.shared is model.alias and isinstance(model.shared, LowRankLinear)
    assert [layer.name for layer in report.layers].count("shared") == 1  # factorized once
    assert "alias" not in [layer.name for layer in report.layers]
    path = tmp_path / "tied.lrc.safetensors"
    manifest = save(model, path, arch="models:TiedNet")
    assert manifest["layers"]["alias"] == {"kind": "LowRankLinear", "rank": 8, "bias": True, "tied_to": "shared"}
    loaded = load(path)
    assert loaded.shared is loaded.alias
    assert loaded.c.weight is loaded.d.weight  # the tied (dense) weight stays tied too
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert saved_param_count(path, loaded) == sum(p.numel() for p in loaded.parameters()) == report.params_after
    with safe_open(str(path), "pt") as f:
        stored = sorted(k.split(".", 1)[1] for k in f.keys() if k.split(".")[0] in ("shared", "alias"))
    assert stored == ["down.weight", "up.bias", "up.weight"]  # one copy under one of the two names


def test_half_precision_model_round_trips_in_its_dtype(tmp_path):
    model, _ = compressed_convbn()
    model.half()
    path = tmp_path / "half.lrc.safetensors"
    assert save(model, path, arch="models:ConvBNNet")["dtype"] == "float16"
    loaded = load(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_compress_records_method_policy_and_input_shape_for_save(tmp_path):
    model = MLP().eval()
    compress(model, CompressConfig(param_ratio=0.5, method="spectral"), torch.randn(5, 48))
    manifest = save(model, tmp_path / "m.lrc.safetensors", arch="models:MLP")
    assert manifest["method"] == "spectral" and manifest["policy"] == {"param_ratio": 0.5}
    assert manifest["input_shape"] == [5, 48]


def test_the_manifest_travels_beside_the_model_and_in_the_report_not_on_it(tmp_path):
    model = MLP().eval()
    _, report = compress(model, CompressConfig(rank=4, method="spectral"), torch.randn(5, 48))
    assert not hasattr(model, "lrc_manifest")
    assert report.manifest.method == "spectral" and report.manifest.input_shape == [5, 48]
    assert "manifest" not in report.to_dict()
    fresh = MLP().eval()  # a model compress never saw: the report's manifest is passed explicitly
    compress(fresh, CompressConfig(rank=4), torch.randn(5, 48))
    assert save(fresh, tmp_path / "r.lrc.safetensors", report, arch="models:MLP")["method"] == "spectral"


def test_save_of_a_loaded_model_round_trips_its_file(saved, tmp_path):
    _, x, path, _ = saved
    loaded = load(path)
    assert not hasattr(loaded, "lrc_manifest")
    again = tmp_path / "again.lrc.safetensors"
    save(loaded, again)  # no arch given: the loaded file's manifest is kept beside the model
    assert read_manifest(again) == read_manifest(path)
    assert load_file(str(again)).keys() == load_file(str(path)).keys()
    with torch.no_grad():
        assert torch.equal(load(again)(x), loaded(x))


# ---------------------------------------------------------------- refusals


def test_save_without_an_arch_is_refused_and_writes_nothing(tmp_path):
    model, _ = compressed_convbn()
    path = tmp_path / "x.lrc.safetensors"
    with pytest.raises(UsageError, match="needs the architecture spec"):
        save(model, path)
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_directory_is_refused(tmp_path):
    model, _ = compressed_convbn()
    with pytest.raises(UsageError, match="does not exist"):
        save(model, tmp_path / "nope" / "x.lrc.safetensors", arch="models:ConvBNNet")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    model, _ = compressed_convbn()
    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "x.lrc.safetensors", arch="models:ConvBNNet")
    assert list(tmp_path.iterdir()) == []


def test_a_plain_safetensors_file_has_no_manifest(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UsageError, match="is not a compressed lrc model"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("{not json", r"corrupt lrc manifest \(not JSON\)"),
        (json.dumps({"format_version": 1}), r"corrupt lrc manifest \(no layer table\)"),
        (json.dumps({"format_version": 99, "layers": {}}), "uses manifest format 99"),
    ],
    ids=["not-json", "no-layers", "future-version"],
)
def test_corrupt_manifests_are_refused(tmp_path, metadata, message):
    path = tmp_path / "bad.lrc.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={MANIFEST_KEY: metadata})
    with pytest.raises(UsageError, match=message):
        load(path)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"conv1": {"kind": "LowRankConv3d", "rank": 4}}, "unknown kind"),
        ({"conv1": {"kind": "LowRankConv2d", "rank": 0}}, "bad rank 0"),
        ({"nope": {"kind": "LowRankLinear", "rank": 4}}, "names layer 'nope', which the architecture does not have"),
        ({"conv1": {"kind": "LowRankConv2d", "rank": 4, "tied_to": "ghost"}}, "ties 'conv1' to an unknown layer"),
        ({"conv1": {"kind": "LowRankConv2d", "rank": 5, "bias": False}}, "tensors do not fit the manifest's structure"),
    ],
    ids=["kind", "rank", "layer", "tie", "shapes"],
)
def test_manifests_that_do_not_fit_the_architecture_are_refused(saved, tmp_path, layers, message):
    _, _, path, manifest = saved
    crafted = rewrite_manifest(path, tmp_path / "bad.lrc.safetensors", layers={**manifest["layers"], **layers})
    with pytest.raises(UsageError, match=message):
        load(crafted)
