"""`lrc compress` / `lrc inspect`: loading, policies, reports, every error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import MLP, ConvBNNet, FunctionalNet, TiedNet, randomize_batchnorm, saved_param_count
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank_compress.graph import find_sites
from lowrank_compress.layers import LowRankLinear
from lowrank_compress.io.format import MANIFEST_KEY, load, read_manifest


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def mlp_ckpt(tmp_path, mlp) -> Path:
    path = tmp_path / "mlp.safetensors"
    save_file(state_of(mlp), str(path))
    return path


@pytest.fixture
def cnn_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    torch.save(state_of(randomize_batchnorm(ConvBNNet(channels=32))), path)
    return path


CNN = ("--arch", "models:ConvBNNet", "--arch-kwargs", '{"channels": 32}', "--input-shape", "1,3,16,16")


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def compress_json(run_cli, ckpt: Path, *args: str) -> dict:
    report = ckpt.parent / "report.json"
    result = run_cli("compress", ckpt, *args, "--json", report, "-q")
    assert result.code == 0, result.err
    return json.loads(report.read_text())


# ---------------------------------------------------------------- loading


WRAPPINGS = {
    "pt-flat": (".pt", lambda sd: sd),
    "pth-state_dict": (".pth", lambda sd: {"state_dict": sd, "epoch": 3}),
    "bin-model": (".bin", lambda sd: {"model": sd}),
    "pt-ddp-prefix": (".pt", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
    "pt-nested-ddp": (".pt", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}),
}


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_every_checkpoint_wrapping_compresses_to_the_same_file(tmp_path, mlp, mlp_ckpt, run_cli, wrapping):
    reference = tmp_path / "reference.lrc.safetensors"
    assert run_cli("compress", mlp_ckpt, "--arch", "models:MLP", "--rank", "6", "-o", reference, "-q").code == 0
    suffix, wrap = WRAPPINGS[wrapping]
    ckpt = tmp_path / f"wrapped{suffix}"
    torch.save(wrap(state_of(mlp)), ckpt)
    result = run_cli("compress", ckpt, "--arch", "models:MLP", "--rank", "6", "-q")
    assert result.code == 0, result.err
    out = tmp_path / "wrapped.lrc.safetensors"
    with safe_open(str(out), "pt") as got, safe_open(str(reference), "pt") as ref:
        assert set(got.keys()) == set(ref.keys())
        for key in ref.keys():
            assert torch.equal(got.get_tensor(key), ref.get_tensor(key)), key


def test_pickled_module_is_refused_without_trust_pickle(tmp_path, mlp, run_cli):
    ckpt = tmp_path / "whole.pt"
    torch.save(mlp, ckpt)
    result = run_cli("compress", ckpt, "--rank", "4")
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert result.err_lines[0].startswith("error: ") and "unpickling runs arbitrary code" in result.err
    assert "--trust-pickle" in result.err
    assert files_in(tmp_path) == ["whole.pt"]


def test_pickled_module_is_accepted_with_trust_pickle_and_no_arch(tmp_path, mlp, run_cli):
    ckpt = tmp_path / "whole.pt"
    torch.save(mlp, ckpt)
    report = compress_json(run_cli, ckpt, "--trust-pickle", "--rank", "4")
    out = tmp_path / "whole.lrc.safetensors"
    assert read_manifest(out)["arch"] == "models:MLP"
    loaded = load(out)
    assert report["params_after"] == saved_param_count(out, loaded)
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert loaded(x).shape == (2, 10)


def test_pickled_module_whose_class_needs_arguments_needs_arch(tmp_path, run_cli):
    ckpt = tmp_path / "whole.pt"
    torch.save(MLP(hidden=32), ckpt)
    result = run_cli("compress", ckpt, "--trust-pickle", "--rank", "4")
    assert result.code == 2 and len(result.err_lines) == 1
    assert "cannot tell how to rebuild the MLP" in result.err and "--arch" in result.err
    assert files_in(tmp_path) == ["whole.pt"]
    result = run_cli("compress", ckpt, "--trust-pickle", "--arch", "models:MLP", "--arch-kwargs", '{"hidden": 32}',
                     "--rank", "4", "-q")
    assert result.code == 0, result.err
    assert load(tmp_path / "whole.lrc.safetensors").fc1.up.weight.shape == (32, 4)


def test_package_module_callable_with_arch_kwargs_through_the_console_script(tmp_path):
    package = tmp_path / "lrcpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width=16):
                super().__init__()
                self.a = nn.Linear(20, width)
                self.b = nn.Linear(width, 3)

            def forward(self, x):
                return self.b(torch.nn.functional.silu(self.a(x)))

        def make(width=16):
            return Net(width)
    """))
    torch.manual_seed(0)
    sys.path.insert(0, str(tmp_path))
    try:
        from lrcpkg.nets import Net

        torch.save(Net(width=40).state_dict(), tmp_path / "net.pt")
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        lrc = str(Path(sys.executable).parent / "lrc")
        done = subprocess.run(
            [lrc, "compress", str(tmp_path / "net.pt"), "--arch", "lrcpkg.nets:make", "--arch-kwargs", '{"width": 40}',
             "--input-shape", "2,20", "--rank", "4", "--json", str(tmp_path / "r.json"), "--quiet"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        out = tmp_path / "net.lrc.safetensors"
        manifest = read_manifest(out)
        assert manifest["arch"] == "lrcpkg.nets:make" and manifest["arch_kwargs"] == {"width": 40}
        report = json.loads((tmp_path / "r.json").read_text())
        assert {layer["name"]: layer["activation"] for layer in report["layers"]} == {"a": "silu", "b": "identity"}
        # a factory function may not be named by a file: the caller names it
        loaded = load(out, arch="lrcpkg.nets:make")
        assert isinstance(loaded.a, LowRankLinear) and loaded.a.rank == 4 and loaded.a.out_features == 40
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lrcpkg.nets", None)
        sys.modules.pop("lrcpkg", None)


def test_tied_modules_are_factorized_once_and_stay_tied(tmp_path, run_cli):
    torch.manual_seed(0)
    model = TiedNet().eval()
    ckpt = tmp_path / "tied.pt"
    torch.save(model.state_dict(), ckpt)
    report = compress_json(run_cli, ckpt, "--arch", "models:TiedNet", "--input-shape", "2,24", "--rank", "8")
    names = [layer["name"] for layer in report["layers"]]
    assert names.count("shared") == 1 and "alias" not in names
    assert {item["name"]: item["reason"] for item in report["skipped"]}["c"].startswith("weight is shared with")
    loaded = load(tmp_path / "tied.lrc.safetensors")
    assert loaded.shared is loaded.alias and loaded.c.weight is loaded.d.weight
    assert report["params_after"] == saved_param_count(tmp_path / "tied.lrc.safetensors", loaded)


# ---------------------------------------------------------------- policies and reports


def test_json_report_has_the_documented_fields_and_figures(cnn_ckpt, run_cli):
    report = compress_json(run_cli, cnn_ckpt, *CNN, "--rank-ratio", "0.25")
    assert report["params_before"] == sum(p.numel() for p in ConvBNNet(channels=32).parameters())
    assert report["params_after"] < report["params_before"] and report["flops_after"] < report["flops_before"]
    layers = {layer["name"]: layer for layer in report["layers"]}
    conv2 = layers["conv2"]
    assert (conv2["kind"], conv2["activation"], conv2["shape"], conv2["rank"]) == ("Conv2d", "relu", [64, 288], 16)
    fitted_bias = load(cnn_ckpt.with_name("cnn.lrc.safetensors")).conv2.up.bias is not None
    assert conv2["params_before"] == 64 * 288
    assert conv2["params_after"] == 16 * (64 + 288) + (64 if fitted_bias else 0)
    for layer in layers.values():
        assert 0 <= layer["error_nkp"] <= layer["error_spectral"] * (1 + 1e-9) + 1e-12
    assert report["skipped"] == []


def test_tables_and_totals_are_printed_without_quiet(cnn_ckpt, run_cli):
    result = run_cli("compress", cnn_ckpt, *CNN, "--rank", "4")
    assert result.code == 0, result.err
    for text in ("compressed layers", "conv1", "conv2", "head", "err nkp", "totals", "params", "FLOPs", "3 factorized"):
        assert text in result.out, text
    assert result.err_lines[-1] == f"wrote {cnn_ckpt.with_name('cnn.lrc.safetensors')}"


def test_rank_is_capped_at_the_max_useful_rank(tmp_path, mlp_ckpt, run_cli):
    report = compress_json(run_cli, mlp_ckpt, "--arch", "models:MLP", "--rank", "10000", "--method", "spectral")
    sites = {s.name: s for s in find_sites(MLP(), torch.randn(1, 48))}
    for layer in report["layers"]:
        assert layer["rank"] == sites[layer["name"]].max_useful_rank
        assert layer["note"] == f"rank 10000 capped at the max useful rank {layer['rank']}"
        assert layer["params_after"] < layer["params_before"]
    assert [layer["rank"] for layer in report["layers"]] == [31, 47, 47, 9]


def test_include_exclude_and_round_to(cnn_ckpt, run_cli):
    report = compress_json(run_cli, cnn_ckpt, *CNN, "--rank-ratio", "0.3", "--include", "conv", "--exclude", "conv1",
                           "--round-to", "8")
    assert [(layer["name"], layer["rank"]) for layer in report["layers"]] == [("conv2", 16)]
    assert layer_note(report, "conv2") == "rank 19 rounded to 16"
    skipped = {item["name"]: item["reason"] for item in report["skipped"]}
    assert skipped == {"conv1": "matched by --exclude", "head": "not matched by --include"}
    loaded = load(cnn_ckpt.with_name("cnn.lrc.safetensors"))
    assert isinstance(loaded.conv1, nn.Conv2d) and isinstance(loaded.head, nn.Linear) and loaded.conv2.rank == 16


def layer_note(report: dict, name: str) -> str | None:
    return next(layer["note"] for layer in report["layers"] if layer["name"] == name)


def test_skip_reasons_for_too_small_and_non_saving_layers(tmp_path, run_cli):
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=64, classes=1)
    ckpt = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), ckpt)
    report = compress_json(run_cli, ckpt, "--arch", "models:MLP", "--arch-kwargs",
                           '{"d_in": 8, "hidden": 64, "classes": 1}', "--rank-ratio", "1.0")
    skipped = {item["name"]: item["reason"] for item in report["skipped"]}
    assert skipped["fc1"] == "rank 8 would not save parameters (max useful rank 7)"
    assert skipped["fc2"] == "rank 64 would not save parameters (max useful rank 31)"
    assert skipped["head"] == "too small: no rank saves parameters"
    assert report["layers"] == [] and report["params_after"] == report["params_before"]


@pytest.mark.parametrize(("flag", "key"), [("--target-params", "params"), ("--target-flops", "flops")])
@pytest.mark.parametrize("fraction", ["0.5", "0.3"])
def test_budget_keeps_at_most_the_target_fraction(cnn_ckpt, run_cli, flag, key, fraction):
    # --no-latency-aware: the budget alone (timed planning keeps layers dense that do not pay)
    report = compress_json(run_cli, cnn_ckpt, *CNN, flag, fraction, "--method", "spectral", "--no-latency-aware")
    ratio = report[f"{key}_after"] / report[f"{key}_before"]
    assert ratio <= float(fraction)
    assert report["layers"]


def test_output_path_and_json_can_be_chosen(tmp_path, mlp_ckpt, run_cli):
    out = tmp_path / "sub" / "custom.lrc.safetensors"
    out.parent.mkdir()
    result = run_cli("compress", mlp_ckpt, "--arch", "models:MLP", "--rank", "4", "-o", out, "-q")
    assert result.code == 0 and out.is_file()
    assert not mlp_ckpt.with_name("mlp.lrc.safetensors").exists()
    assert read_manifest(out)["layers"]["fc1"]["rank"] == 4


# ---------------------------------------------------------------- error paths


def _garbage(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


ERROR_CASES = {
    "missing-file": (lambda t, c: [t / "nope.pt", "--arch", "models:MLP", "--rank", "4"], "no such file"),
    "directory": (lambda t, c: [t, "--arch", "models:MLP", "--rank", "4"], "is a directory"),
    "empty-file": (lambda t, c: [_garbage(t, "e.pt", b""), "--arch", "models:MLP", "--rank", "4"], "is empty"),
    "garbage-pt": (lambda t, c: [_garbage(t, "g.pt", b"junk junk"), "--arch", "models:MLP", "--rank", "4"],
                   "cannot read"),
    "garbage-safetensors": (lambda t, c: [_garbage(t, "g.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{{{{{{{{"),
                                          "--arch", "models:MLP", "--rank", "4"], "not a valid safetensors file"),
    "no-arch": (lambda t, c: [c, "--rank", "4"], "pass --arch"),
    "arch-no-colon": (lambda t, c: [c, "--arch", "MLP", "--rank", "4"], "bad --arch 'MLP'"),
    "arch-unknown-torchvision": (lambda t, c: [c, "--arch", "torchvision:nonet", "--rank", "4"],
                                 "unknown torchvision model 'nonet'"),
    "arch-unknown-timm": (lambda t, c: [c, "--arch", "timm:nonet", "--rank", "4"], "unknown timm model 'nonet'"),
    "arch-no-module": (lambda t, c: [c, "--arch", "no_such_pkg_q.m:Net", "--rank", "4"], "cannot import"),
    "arch-kwargs-not-json": (lambda t, c: [c, "--arch", "models:MLP", "--arch-kwargs", "{x}", "--rank", "4"],
                             "not valid JSON"),
    "arch-kwargs-not-object": (lambda t, c: [c, "--arch", "models:MLP", "--arch-kwargs", "[1]", "--rank", "4"],
                               "must be a JSON object"),
    "arch-kwargs-unknown": (lambda t, c: [c, "--arch", "models:MLP", "--arch-kwargs", '{"depth": 3}', "--rank", "4"],
                            "cannot build models:MLP"),
    "missing-keys": (lambda t, c: [c, "--arch", "models:ConvBNNet", "--rank", "4"], "missing keys: conv1.weight"),
    "shape-mismatch": (lambda t, c: [c, "--arch", "models:MLP", "--arch-kwargs", '{"hidden": 32}', "--rank", "4"],
                       "shape mismatches: fc1.weight (96, 48) vs (32, 48)"),
    "two-policies": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--rank-ratio", "0.5"],
                     "got --rank and --rank-ratio"),
    "no-policy": (lambda t, c: [c, "--arch", "models:MLP"], "give exactly one rank policy"),
    "rank-ratio-zero": (lambda t, c: [c, "--arch", "models:MLP", "--rank-ratio", "0"], r"must be in (0, 1]"),
    "param-ratio-above-one": (lambda t, c: [c, "--arch", "models:MLP", "--param-ratio", "1.5"], "must be in (0, 1]"),
    "target-params-negative": (lambda t, c: [c, "--arch", "models:MLP", "--target-params", "-0.5"],
                               "must be in (0, 1]"),
    "rank-zero": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "0"], "--rank must be a positive integer"),
    "rank-not-int": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "four"], "Invalid value for '--rank'"),
    "unknown-method": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--method", "svd"],
                       "unknown method 'svd'"),
    "bad-include": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--include", "("], "bad --include regex"),
    "round-to-zero": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--round-to", "0"],
                      "--round-to must be a positive integer"),
    "bad-input-shape": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--input-shape", "1,a"],
                        "bad --input-shape"),
    "wrong-input-shape": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--input-shape", "1,3,8,8"],
                          "the model does not run on an input of shape (1, 3, 8, 8)"),
    "output-dir-missing": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "-o", t / "no" / "x.safetensors"],
                           "does not exist"),
    "output-is-directory": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "-o", t], "is a directory"),
    "json-dir-missing": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--json", t / "no" / "r.json"],
                         "does not exist"),
    "unknown-option": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--frobnicate"], "--frobnicate"),
    "calib-batch-size": (lambda t, c: [c, "--arch", "models:MLP", "--rank", "4", "--calib-batch-size", "0"],
                         "--calib-batch-size must be ≥ 1"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_every_error_exits_non_zero_with_one_line_and_writes_nothing(tmp_path, mlp_ckpt, run_cli, case):
    make_args, message = ERROR_CASES[case]
    args = make_args(tmp_path, mlp_ckpt)
    before = files_in(tmp_path)
    result = run_cli("compress", *args)
    assert result.code == 2, (result.code, result.err)
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith("error: ")
    assert message in result.err_lines[0]
    assert "Traceback" not in result.err
    assert files_in(tmp_path) == before  # no output, no temporary file


def test_console_script_refusal_is_one_line_in_a_real_process(tmp_path, mlp):
    ckpt = tmp_path / "whole.pt"
    torch.save(mlp, ckpt)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([str(Path(sys.executable).parent / "lrc"), "compress", str(ckpt), "--rank", "4"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unpickling runs arbitrary code" in lines[0]
    assert done.stdout == "" and files_in(tmp_path) == ["whole.pt"]


def test_debug_shows_the_traceback(tmp_path, run_cli):
    result = run_cli("--debug", "compress", tmp_path / "nope.pt", "--arch", "models:MLP", "--rank", "4")
    assert result.code == 2
    assert "Traceback" in result.err and "no such file" in result.err


def test_a_file_that_names_a_function_as_its_arch_is_refused(tmp_path, mlp, run_cli, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    ckpt = tmp_path / "evil.safetensors"
    save_file(state_of(mlp), str(ckpt), metadata={"arch": "os:system", "arch_kwargs": '{"command": "touch pwned"}'})
    result = run_cli("compress", ckpt, "--rank", "4")
    assert result.code == 2 and len(result.err_lines) == 1
    assert "names the architecture 'os:system', which is not an nn.Module class" in result.err
    assert calls == [] and files_in(tmp_path) == ["evil.safetensors"]


# ---------------------------------------------------------------- inspect


def test_inspect_lists_every_candidate_layer_with_json(tmp_path, run_cli):
    torch.manual_seed(0)
    ckpt = tmp_path / "functional.pt"
    torch.save(randomize_batchnorm(FunctionalNet()).state_dict(), ckpt)
    json_path = tmp_path / "inspect.json"
    result = run_cli("inspect", ckpt, "--arch", "models:FunctionalNet", "--input-shape", "1,3,32,32", "--json", json_path)
    assert result.code == 0, result.err
    for text in ("conv1", "conv2", "fc1", "fc2", "relu (affine after)", "gelu", "eligible", "max rank"):
        assert text in result.out, text
    data = json.loads(json_path.read_text())
    assert data["arch"] == "models:FunctionalNet" and data["input_shape"] == [1, 3, 32, 32]
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["conv1"] == {
        "name": "conv1", "kind": "Conv2d", "shape": [16, 27], "activation": "relu", "bn_before": None,
        "affine_after": "bn1", "params": 16 * 27 + 16, "max_useful_rank": 10, "eligible": True,
        "skip_reason": None, "notes": [],
    }
    assert layers["fc1"]["activation"] == "gelu" and layers["fc2"]["activation"] == "identity"
    assert layers["conv2"]["max_useful_rank"] == (32 * 144 - 1) // (32 + 144)


def test_inspect_shows_skip_reasons(tmp_path, run_cli):
    ckpt = tmp_path / "mnv3.safetensors"
    import torchvision

    save_file(state_of(torchvision.models.mobilenet_v3_small()), str(ckpt))
    json_path = tmp_path / "i.json"
    result = run_cli("inspect", ckpt, "--arch", "torchvision:mobilenet_v3_small", "--input-shape", "1,3,64,64",
                     "--json", json_path)
    assert result.code == 0, result.err
    assert "skip:" in result.out and "depthwise" in result.out
    layers = {layer["name"]: layer for layer in json.loads(json_path.read_text())["layers"]}
    assert "depthwise" in layers["features.1.block.0.0"]["skip_reason"]
    assert layers["features.0.0"]["activation"] == "hardswish" and layers["features.0.0"]["bn_before"] == "features.0.1"


def test_inspect_on_a_compressed_file_reads_only_the_manifest(tmp_path, mlp_ckpt, run_cli, monkeypatch):
    assert run_cli("compress", mlp_ckpt, "--arch", "models:MLP", "--rank", "4", "-q").code == 0
    compressed = tmp_path / "mlp.lrc.safetensors"
    # A file whose architecture cannot even be built: inspect must not try.
    manifest = read_manifest(compressed)
    manifest["arch"] = "nowhere_pkg_z.models:Gone"
    with safe_open(str(compressed), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    crafted = tmp_path / "crafted.lrc.safetensors"
    save_file(tensors, str(crafted), metadata={MANIFEST_KEY: json.dumps(manifest)})

    import safetensors.torch

    from lowrank_compress.io import format as file_format
    from lowrank_compress.io import opening

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded tensors or built the model")

    for module, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load_model"),
                         (file_format, "build_model"), (opening, "open_model")):
        monkeypatch.setattr(module, name, refuse)
    json_path = tmp_path / "m.json"
    result = run_cli("inspect", crafted, "--json", json_path)
    assert result.code == 0, result.err
    for text in ("fc1", "fc2", "fc3", "head", "LowRankLinear", "nowhere_pkg_z.models:Gone"):
        assert text in result.out, text
    data = json.loads(json_path.read_text())
    assert data["manifest"]["layers"]["fc1"] == {"kind": "LowRankLinear", "rank": 4, "bias": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope.pt", "--arch", "models:MLP"], "no such file"),
        (["{ckpt}"], "pass --arch"),
        (["{ckpt}", "--arch", "models:MLP", "--input-shape", "0,4"], "bad --input-shape"),
        (["{ckpt}", "--arch", "models:MLP", "--json", "missing/x.json"], "does not exist"),
    ],
    ids=["missing", "no-arch", "bad-shape", "json-dir"],
)
def test_inspect_errors_are_one_line(tmp_path, mlp_ckpt, run_cli, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(mlp_ckpt) if a == "{ckpt}" else a for a in args]
    before = files_in(tmp_path)
    result = run_cli("inspect", *args)
    assert result.code == 2 and len(result.err_lines) == 1 and message in result.err
    assert files_in(tmp_path) == before
