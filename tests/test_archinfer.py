"""Architecture inference from a state dict: keys and shapes against the registries.

The fast tests use a registry restricted to a few families in a temporary cache; the slow ones
identify every torchvision classification model and the walker's timm models with the full
registries, in the user's signature cache ($LRC_CACHE_DIR or ~/.cache/lowrank_compress): slow the
first time, seconds afterwards.
"""

from __future__ import annotations

import time

import pytest
import torch
from models import MODEL_CASES
from safetensors.torch import save_file
from torch import nn

from lowrank_compress.io import archinfer, archsig
from lowrank_compress.io.archinfer import Registry, infer_arch, registry_arch
from lowrank_compress.io.archsig import meta_build, registry_names
from lowrank_compress.io.opening import open_model
from lowrank_compress.io.reading import read_checkpoint
from lowrank_compress.errors import UsageError

FAMILIES = {
    "torchvision": ["resnet18", "resnet34", "mnasnet0_5"],
    "timm": ["resnet18", "resnetblur18", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "efficientnet_b0",
             "tf_efficientnet_b0", "convnext_atto"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("signatures")


@pytest.fixture
def registry(cache):
    return Registry(cache, names=FAMILIES)


def meta_state(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    library, _, name = arch.partition(":")
    return meta_build(library, name, **kwargs).state_dict()


def test_a_torchvision_state_dict_is_identified_and_torchvision_is_preferred(registry):
    found = infer_arch(meta_state("torchvision:resnet18"), registry=registry)
    assert found.arch == "torchvision:resnet18" and found.arch_kwargs == {}
    assert found.same_network == ["timm:resnet18"]  # timm's ResNet-18 keeps torchvision's names and function
    assert found.other_fits == ["timm:resnetblur18"]  # same shapes, another function (blur-pooled strides)
    assert "torchvision:resnet18" in found.message and "pass --arch" in found.message


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("torchvision:resnet18", {"num_classes": 10}), ("timm:convnext_atto", {"num_classes": 7, "in_chans": 1}),
     ("timm:convnext_atto", {"in_chans": 4}), ("timm:convnext_atto", {"num_classes": 0})],
    ids=["tv-classes", "timm-classes-and-chans", "timm-chans", "timm-headless"],
)
def test_num_classes_and_in_chans_come_from_the_head_and_stem(registry, arch, kwargs):
    found = infer_arch(meta_state(arch, **kwargs), registry=registry)
    assert found.arch == arch and found.arch_kwargs == kwargs
    assert all(f"{k}={v}" in found.message for k, v in kwargs.items())


def test_a_pretrained_googlenet_without_its_auxiliary_heads_is_identified(cache):
    from torchvision.models import googlenet

    pretrained_layout = googlenet(weights=None, aux_logits=False, init_weights=False)  # as torchvision loads weights
    names = {"torchvision": ["googlenet", "googlenet+pretrained"], "timm": []}
    found = infer_arch(pretrained_layout.state_dict(), registry=Registry(cache, names=names))
    assert found.arch == "torchvision:googlenet"
    assert found.arch_kwargs == {"aux_logits": False, "transform_input": True}


def test_networks_that_compute_the_same_function_count_once(registry):
    found = infer_arch(meta_state("timm:deit_tiny_patch16_224"), registry=registry)
    assert found.arch == "timm:vit_tiny_patch16_224" and found.same_network == ["timm:deit_tiny_patch16_224"]
    assert not found.other_fits


def test_an_ambiguous_family_lists_the_candidates(registry):
    with pytest.raises(UsageError, match="fits 2 architectures") as info:
        infer_arch(meta_state("timm:efficientnet_b0"), registry=registry)
    assert info.value.candidates == ["timm:efficientnet_b0", "timm:tf_efficientnet_b0"]
    assert "pass --arch" in str(info.value) and info.value.exit_code == 2


def test_a_state_dict_of_no_registry_model_says_so(registry):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 5))
    with pytest.raises(UsageError, match="match no torchvision or timm classification model"):
        infer_arch(cnn.state_dict(), registry=registry)


def test_only_timm_models_whose_stem_the_state_dict_has_are_built(tmp_path, monkeypatch):
    from timm.models import get_pretrained_cfg

    built = []
    build = archsig.signature_entry
    monkeypatch.setattr(archsig, "signature_entry", lambda lib, name: built.append((lib, name)) or build(lib, name))
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(UsageError, match="pass --arch"):
        infer_arch(mlp.state_dict(), "mlp.pt", registry=Registry(tmp_path))
    # no torchvision model (all have a 2-D conv), and of timm only those whose config names no stem conv
    assert built and all(lib == "timm" and not get_pretrained_cfg(name).first_conv for lib, name in built)


def test_signatures_are_cached_per_library_version_and_reused(registry, cache, monkeypatch):
    state = meta_state("torchvision:resnet18")
    infer_arch(state, registry=registry)
    for lib in ("torchvision", "timm"):
        root = cache / f"{lib}-{archsig.library_version(lib)}-v{archsig.CACHE_FORMAT}"
        assert (root / "index.json").is_file() and (root / "models" / "resnet18.json").is_file()
    monkeypatch.setattr(archsig, "signature_entry", lambda *a: pytest.fail("rebuilt a cached signature"))
    monkeypatch.setattr(archinfer, "same_function", lambda *a: pytest.fail("recomputed a cached verdict"))
    start = time.perf_counter()
    found = infer_arch(state, registry=Registry(cache, names=FAMILIES))
    assert time.perf_counter() - start < 5
    assert found.arch == "torchvision:resnet18"


@pytest.mark.parametrize("damaged", ["index.json", "models/resnet18.json"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, damaged):
    names = {"torchvision": ["resnet18"], "timm": []}
    Registry(tmp_path, names=names).matches(meta_state("torchvision:resnet18"))
    (root,) = tmp_path.glob("torchvision-*")
    (root / damaged).write_text("{not json")
    found = infer_arch(meta_state("torchvision:resnet18"), registry=Registry(tmp_path, names=names))
    assert found.arch == "torchvision:resnet18"
    assert archsig.SignatureCache("torchvision", tmp_path).entry("resnet18")["class"].endswith(":ResNet")


def test_a_model_that_does_not_build_is_recorded_not_fatal():
    entry = archsig.signature_entry("timm", "no_such_model_q")
    assert "error" in entry


# ---------------------------------------------------------------- the full registries (user cache)


def torchvision_models() -> list[str]:
    return registry_names("torchvision")


@pytest.fixture(scope="module")
def full_registry():
    return Registry()


@pytest.mark.slow
@pytest.mark.parametrize("key", torchvision_models())
def test_every_torchvision_classification_model_is_identified(full_registry, key):
    name, kwargs = archsig.resolve_key("torchvision", key)  # googlenet+pretrained: as loaded with weights
    found = infer_arch(meta_state(f"torchvision:{key}"), registry=full_registry)
    assert found.arch == f"torchvision:{name}" and found.arch_kwargs == kwargs


WALKER_TIMM = sorted({case.arch for case in MODEL_CASES.values() if case.arch.startswith("timm:")})


@pytest.mark.slow
@pytest.mark.parametrize("arch", WALKER_TIMM)
def test_the_walker_timm_models_are_identified_or_listed(full_registry, arch):
    state = meta_state(arch)
    try:
        found = infer_arch(state, registry=full_registry)
    except UsageError as exc:  # a family whose members have the same shapes but compute different things
        assert arch in exc.candidates
        return
    assert arch in [found.arch, *found.same_network]


@pytest.mark.slow
def test_a_lookup_in_the_warm_cache_takes_seconds(full_registry):
    state = meta_state("torchvision:resnet50")
    infer_arch(state, registry=full_registry)
    start = time.perf_counter()
    found = infer_arch(state, registry=Registry())
    assert time.perf_counter() - start < 5
    assert found.arch == "torchvision:resnet50"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_model_without_arch_uses_the_inferred_architecture(tmp_path, fmt):
    torch.manual_seed(0)
    from torchvision.models import resnet18

    model = resnet18(num_classes=10).eval()
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pt":
        torch.save(model.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = open_model(path)
    assert loaded.arch == "torchvision:resnet18" and loaded.arch_kwargs == {"num_classes": 10}
    assert "torchvision:resnet18, num_classes=10" in loaded.arch_note
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


@pytest.mark.slow
def test_a_pickled_registry_model_gets_its_registry_input_shape(tmp_path):
    from torchvision.models import inception_v3

    path = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, init_weights=False).eval(), path)
    assert registry_arch(read_checkpoint(path, trust_pickle=True)) == "torchvision:inception_v3"
    assert open_model(path, trust_pickle=True).input_shape == (1, 3, 299, 299)


@pytest.mark.slow
def test_bare_compress_of_a_torchvision_resnet50_state_dict(tmp_path, run_cli, monkeypatch):
    from torchvision.models import resnet50

    from lowrank_compress import load
    from lowrank_compress.io.format import read_manifest

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(resnet50().state_dict(), "resnet50.pt")
    result = run_cli("compress", "resnet50.pt", "--rank", "64", "--input-shape", "1,3,64,64", "-q")
    assert result.code == 0, result.err
    assert "architecture torchvision:resnet50" in result.err
    assert read_manifest("resnet50.lrc.safetensors")["arch"] == "torchvision:resnet50"
    with torch.no_grad():
        assert load("resnet50.lrc.safetensors")(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.slow
def test_bare_compress_of_an_ambiguous_state_dict_exits_2_with_the_candidates(tmp_path, run_cli):
    path = tmp_path / "effnet.safetensors"
    import timm

    save_file(timm.create_model("efficientnet_b0").state_dict(), path)
    result = run_cli("compress", path, "--rank", "8")
    assert result.code == 2 and len(result.err_lines) == 1
    assert "timm:efficientnet_b0" in result.err and "timm:tf_efficientnet_b0" in result.err and "--arch" in result.err
