"""Safe checkpoint loading and architecture specs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import MLP, ConvBNNet
from safetensors.torch import save_file
from torch import nn

from lowrank_compress.io.archspec import build_model
from lowrank_compress.io.checks import parse_arch_kwargs, parse_input_shape
from lowrank_compress.io.dataconfig import default_input_shape
from lowrank_compress.io.opening import open_model
from lowrank_compress.io.reading import load_weights, read_checkpoint, unwrap_state_dict
from lowrank_compress.errors import UsageError


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def plain(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


WRAPPINGS = {
    "flat": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 7, "optimizer": {"lr": 0.1}},
    "model": lambda sd: {"model": sd, "args": {"arch": "mlp"}},
    "model_state_dict": lambda sd: {"model_state_dict": sd},
    "ddp-prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "nested-ddp": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "compile-prefix": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "lightning-prefix": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_torch_checkpoints_in_every_wrapping_load_the_same_weights(tmp_path, mlp, wrapping, suffix):
    path = tmp_path / f"ckpt{suffix}"
    torch.save(WRAPPINGS[wrapping](plain(mlp)), path)
    loaded = open_model(path, "models:MLP")
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), mlp(x))
    assert loaded.arch == "models:MLP" and not loaded.model.training


@pytest.mark.parametrize("wrapping", ["flat", "ddp-prefix"])
def test_safetensors_state_dicts_load(tmp_path, mlp, wrapping):
    path = tmp_path / "ckpt.safetensors"
    save_file(WRAPPINGS[wrapping](plain(mlp)), str(path))
    state = read_checkpoint(path)
    assert set(state) == set(mlp.state_dict())
    loaded = open_model(path, "models:MLP")
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), mlp(x))


def test_safetensors_metadata_may_name_a_module_class(tmp_path, mlp):
    path = tmp_path / "ckpt.safetensors"
    save_file(plain(mlp), str(path), metadata={"arch": "models:MLP", "input_shape": "[4, 48]"})
    loaded = open_model(path)
    assert loaded.arch == "models:MLP" and loaded.input_shape == (4, 48)


@pytest.mark.parametrize("spec", ["os:system", "models:make_mlp", "builtins:eval", "subprocess:Popen"])
def test_safetensors_metadata_cannot_name_a_function(tmp_path, mlp, spec, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    path = tmp_path / "ckpt.safetensors"
    save_file(plain(mlp), str(path), metadata={"arch": spec, "arch_kwargs": json.dumps({"command": "true"})})
    with pytest.raises(UsageError, match="not an nn.Module class"):
        open_model(path)
    assert calls == []


# ---------------------------------------------------------------- pickled modules


def test_pickled_module_is_refused_without_trust(tmp_path, mlp):
    path = tmp_path / "whole.pt"
    torch.save(mlp, path)
    with pytest.raises(UsageError, match=r"pickled Python objects \(models.MLP\); unpickling runs arbitrary code") as info:
        read_checkpoint(path)
    assert "--trust-pickle" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError, match="arbitrary code"):
        open_model(path, "models:MLP")


def test_pickled_module_is_accepted_with_trust_and_needs_no_arch(tmp_path, mlp):
    path = tmp_path / "whole.pt"
    torch.save(mlp, path)
    assert isinstance(read_checkpoint(path, trust_pickle=True), MLP)
    loaded = open_model(path, trust_pickle=True)
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), mlp(x))
    assert loaded.arch == "models:MLP"  # its class rebuilds it: what a manifest can record
    assert loaded.input_shape == (1, 48)


def test_pickled_module_inside_a_dict_is_found_with_trust(tmp_path, mlp):
    path = tmp_path / "whole.pt"
    torch.save({"epoch": 3, "net": mlp}, path)
    assert isinstance(read_checkpoint(path, trust_pickle=True), MLP)


def test_pickled_module_whose_class_needs_arguments_has_no_rebuild_spec(tmp_path):
    model = MLP(hidden=32).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    assert open_model(path, trust_pickle=True).arch is None
    loaded = open_model(path, "models:MLP", {"hidden": 32}, trust_pickle=True)
    assert loaded.arch == "models:MLP" and loaded.arch_kwargs == {"hidden": 32}
    with pytest.raises(UsageError, match="does not build the structure of the model pickled"):
        open_model(path, "models:MLP", trust_pickle=True)


# ---------------------------------------------------------------- strict loading


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, mlp):
    state = plain(mlp)
    del state["fc1.weight"], state["fc2.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["head.weight"] = torch.zeros(3, 96)
    with pytest.raises(UsageError) as info:
        load_weights(MLP(), state, "ckpt.pt")
    message = str(info.value)
    assert message.startswith("ckpt.pt does not match the architecture")
    assert "missing keys: fc1.weight, fc2.bias (2)" in message
    assert "unexpected keys: extra.weight (1)" in message
    assert "shape mismatches: head.weight (3, 96) vs (10, 96) (1)" in message
    assert "\n" not in message


def test_long_key_lists_are_cut_to_the_first_few(mlp):
    model = ConvBNNet()
    with pytest.raises(UsageError, match=r"missing keys: conv1.weight, bn1.weight, bn1.bias, bn1.running_mean … \(14\)"):
        load_weights(model, {"unrelated": torch.zeros(1)})


def test_a_failed_load_leaves_the_model_unchanged(mlp):
    model = MLP()
    before = plain(model)
    state = plain(mlp)
    state["head.weight"] = torch.zeros(3, 96)
    with pytest.raises(UsageError):
        load_weights(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_half_precision_checkpoint_gives_a_half_precision_model(tmp_path, mlp):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in plain(mlp).items()}, str(path))
    model = open_model(path, "models:MLP").model
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (None, ".pt", "no such file"),
        (b"", ".pt", "is empty"),
        (b"not a zip and not a pickle", ".pt", "cannot read .* as a PyTorch checkpoint"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage", ".safetensors", "is not a valid safetensors file"),
    ],
    ids=["missing", "empty", "garbage-pt", "garbage-safetensors"],
)
def test_unreadable_files_raise_usage_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        open_model(path, "models:MLP")


def test_directory_and_non_state_dict_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        read_checkpoint(tmp_path)
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UsageError, match="does not hold a state dict"):
        read_checkpoint(path)
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(UsageError, match="holds no tensors"):
        read_checkpoint(path)


def test_state_dict_without_arch_is_refused(tmp_path, mlp):
    path = tmp_path / "ckpt.pt"
    torch.save(plain(mlp), path)
    with pytest.raises(UsageError, match="holds a state dict; pass --arch"):
        open_model(path)


def test_unwrap_strips_prefixes_only_when_every_key_has_them():
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert set(unwrap_state_dict(mixed)) == {"module.a", "b"}
    assert set(unwrap_state_dict({"module._orig_mod.a": torch.zeros(1)})) == {"a"}


# ---------------------------------------------------------------- architecture specs


def test_torchvision_timm_and_callable_specs_build_models():
    assert type(build_model("torchvision:resnet18")).__name__ == "ResNet"
    timm_model = build_model("timm:resnet18", {"num_classes": 3})
    assert timm_model.fc.out_features == 3
    mlp = build_model("models:make_mlp", {"hidden": 20})
    assert isinstance(mlp, MLP) and mlp.fc1.out_features == 20
    assert isinstance(build_model("models:MLP", {"hidden": 20}, restricted=True), MLP)
    assert type(build_model("torchvision:resnet18", restricted=True)).__name__ == "ResNet"


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("resnet18", {}, "use torchvision:NAME, timm:NAME or package.module:callable"),
        ("torchvision:resnet_nope", {}, "unknown torchvision model 'resnet_nope'"),
        ("timm:nope_net", {}, "unknown timm model 'nope_net'"),
        ("no_such_package_xyz.models:Net", {}, "cannot import no_such_package_xyz.models"),
        ("models:NoSuchNet", {}, "has no attribute NoSuchNet"),
        ("models:MODEL_CASES", {}, "MODEL_CASES is not callable"),
        ("models:MLP", {"bogus": 1}, "cannot build models:MLP with kwargs"),
        ("torch:zeros", {"size": [2]}, "returned Tensor, not an nn.Module"),
    ],
    ids=["no-colon", "tv-unknown", "timm-unknown", "no-module", "no-attr", "not-callable", "bad-kwargs", "not-module"],
)
def test_bad_arch_specs_raise_usage_errors(spec, kwargs, message):
    with pytest.raises(UsageError, match=message):
        build_model(spec, kwargs)


def test_restricted_specs_refuse_functions_and_never_call_them(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    for spec in ("os:system", "models:make_mlp", "builtins:exec"):
        with pytest.raises(UsageError, match="not an nn.Module class"):
            build_model(spec, {"command": "touch pwned"} if spec == "os:system" else {}, restricted=True)
    assert calls == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,3,224,224", (1, 3, 224, 224)), ("1x3x64x64", (1, 3, 64, 64)), (" 2, 1024 ", (2, 1024)), ("8", (8,)),
     (None, None), ("", None)],
)
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["a,b", "1,0,3", "1,-3", "1.5,2", ",,"])
def test_bad_input_shapes_raise_usage_errors(text):
    with pytest.raises(UsageError, match="bad --input-shape"):
        parse_input_shape(text)


def test_parse_arch_kwargs():
    assert parse_arch_kwargs('{"img_size": 64, "drop": 0.1}') == {"img_size": 64, "drop": 0.1}
    assert parse_arch_kwargs(None) == {} and parse_arch_kwargs("") == {}
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_arch_kwargs("{img_size: 64}")
    with pytest.raises(UsageError, match="must be a JSON object"):
        parse_arch_kwargs("[64]")


def test_default_input_shapes():
    assert default_input_shape("timm:resnet18", build_model("timm:resnet18")) == (1, 3, 224, 224)
    assert default_input_shape("torchvision:resnet18", build_model("torchvision:resnet18")) == (1, 3, 224, 224)
    assert default_input_shape("models:MLP", MLP()) == (1, 48)
    assert default_input_shape("models:ConvBNNet", ConvBNNet()) is None
    assert default_input_shape(None, MLP(), {"input_shape": "[4, 48]"}) == (4, 48)
