"""The graph walker: what each Linear/Conv output feeds, and why layers are skipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import ConvBNNet, FunctionalNet, TiedNet, randomize_batchnorm
from torch import nn

from lowrank_compress.graph import LayerSite, find_sites


def sites_by_name(model: nn.Module, example) -> dict:
    return {s.name: s for s in find_sites(model, example)}


class Wrap(nn.Module):
    """Linear(8→16) → ``between`` → Linear(16→4)."""

    def __init__(self, between):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.between = between
        self.last = nn.Linear(16, 4)

    def forward(self, x):
        return self.last(self.between(self.first(x)))


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ACTIVATION_FORMS = [
    (nn.ReLU(inplace=True), "relu"),
    (nn.ReLU(), "relu"),
    (Fn(F.relu), "relu"),
    (Fn(torch.relu), "relu"),
    (Fn(lambda x: F.relu(x, inplace=True)), "relu"),
    (nn.GELU(), "gelu"),
    (Fn(F.gelu), "gelu"),
    (nn.SiLU(), "silu"),
    (Fn(F.silu), "silu"),
    (nn.Hardswish(), "hardswish"),
    (nn.Sigmoid(), "sigmoid"),
    (Fn(torch.sigmoid), "sigmoid"),
    (nn.Tanh(), "tanh"),
    (Fn(torch.tanh), "tanh"),
    (nn.LeakyReLU(), "leaky_relu"),
    (nn.LeakyReLU(0.1), "leaky_relu(0.1)"),
    (Fn(lambda x: F.leaky_relu(x, 0.3)), "leaky_relu(0.3)"),
    (nn.ReLU6(), "relu6"),
    (nn.Hardsigmoid(), "hardsigmoid"),
    (nn.Mish(), "mish"),
    (nn.ELU(), "elu"),
    (nn.Identity(), "identity"),
]


@pytest.mark.parametrize(("between", "expected"), ACTIVATION_FORMS, ids=[f"{i}-{e}" for i, (_, e) in enumerate(ACTIVATION_FORMS)])
def test_activation_found_as_module_or_function(between, expected):
    sites = sites_by_name(Wrap(between), torch.randn(2, 8))
    assert sites["first"].activation == expected
    assert sites["last"].activation == "identity"
    assert sites["first"].bn_before is None and sites["first"].affine_after is None


PASS_THROUGH = [
    (nn.Sequential(nn.Dropout(0.2), nn.ReLU()), "relu"),
    (nn.Sequential(nn.Dropout(0.2), nn.Dropout(0.1), nn.GELU()), "gelu"),
    (Fn(lambda x: torch.tanh(x.reshape(2, 4, 4).reshape(2, 16))), "tanh"),
    (Fn(lambda x: torch.sigmoid(x.unsqueeze(1).squeeze(1).contiguous())), "sigmoid"),
    (Fn(lambda x: F.silu(F.pad(x, (0, 0)))), "silu"),
]


@pytest.mark.parametrize(("between", "expected"), PASS_THROUGH, ids=["dropout", "two-dropouts", "reshape", "squeeze", "pad"])
def test_walk_passes_through_dropout_padding_and_reshapes(between, expected):
    assert sites_by_name(Wrap(between), torch.randn(2, 8))["first"].activation == expected


class ConvThen(nn.Module):
    def __init__(self, then):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.then = then
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.then(self.conv(x)))


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        (nn.Sequential(nn.MaxPool2d(2), nn.ReLU()), "relu"),
        (nn.Sequential(nn.AvgPool2d(2), nn.Hardswish()), "hardswish"),
        (Fn(lambda x: F.relu(F.pad(x, (1, 1, 1, 1), mode="reflect"))), "relu"),
        (Fn(lambda x: F.relu(F.pad(x, (1, 1, 1, 1)))), "relu"),
        (Fn(lambda x: F.gelu(F.adaptive_avg_pool2d(x, 4))), "gelu"),
    ],
    ids=["maxpool", "avgpool", "reflect-pad", "zero-pad", "adaptive-pool"],
)
def test_walk_passes_through_pooling_and_padding_of_convs(then, expected):
    assert sites_by_name(ConvThen(then), torch.randn(1, 3, 16, 16))["conv"].activation == expected


# ---------------------------------------------------------------- BatchNorm before / after


def test_batchnorm_before_the_activation_is_folded_for_the_math():
    model = randomize_batchnorm(ConvBNNet(), seed=1).eval()
    sites = sites_by_name(model, torch.randn(1, 3, 16, 16))
    site = sites["conv2"]
    assert site.activation == "relu" and site.bn_before.name == "bn2" and site.affine_after is None
    w, b = site.effective_weight()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    conv, bn = model.conv2.double(), model.bn2.double()
    folded = F.conv2d(x, w.reshape(conv.weight.shape), b, stride=2, padding=1)
    with torch.no_grad():
        assert torch.allclose(folded, bn(conv(x)), atol=1e-10)
    assert site.module is model.conv2
    assert site.shape == (32, 16 * 9)


def test_batchnorm_after_the_relu_becomes_per_row_weights():
    model = randomize_batchnorm(FunctionalNet(), seed=2).eval()
    sites = sites_by_name(model, torch.randn(1, 3, 32, 32))
    for conv, bn in (("conv1", model.bn1), ("conv2", model.bn2)):
        site = sites[conv]
        assert site.activation == "relu" and site.bn_before is None and site.affine_after.name == bn_name(model, bn)
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        assert torch.allclose(site.row_weights(), scale**2, rtol=1e-12)
        shift = bn.bias.detach().double() - bn.running_mean.double() * scale
        assert torch.allclose(site.affine_after.shift, shift, rtol=1e-12)
    assert sites["fc1"].activation == "gelu" and sites["fc2"].activation == "identity"
    assert sites["fc1"].row_weights() is None


def bn_name(model: nn.Module, bn: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is bn)


# ---------------------------------------------------------------- identity: merges, fan-out, outputs


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


class FanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h)) + self.c(torch.tanh(h))


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.a(x), -1)


def test_residual_add_before_the_activation_counts_as_identity():
    sites = sites_by_name(Residual(), torch.randn(1, 8, 8, 8))
    assert sites["conv1"].activation == "relu"
    assert sites["conv2"].activation == "identity" and sites["conv2"].bn_before.name == "bn2"
    assert any("residual add" in note for note in sites["conv2"].notes)


def test_concatenation_before_the_activation_counts_as_identity():
    sites = sites_by_name(Concat(), torch.randn(2, 8))
    for name in ("a", "b"):
        assert sites[name].activation == "identity"
        assert any("concatenation" in note for note in sites[name].notes)


def test_several_consumers_count_as_identity():
    sites = sites_by_name(FanOut(), torch.randn(2, 8))
    assert sites["a"].activation == "identity"
    assert any("2 consumers" in note for note in sites["a"].notes)


def test_model_output_and_unknown_ops_count_as_identity():
    sites = sites_by_name(Wrap(nn.ReLU()), torch.randn(2, 8))
    assert any("model output" in note for note in sites["last"].notes)
    soft = sites_by_name(Softmaxed(), torch.randn(2, 8))["a"]
    assert soft.activation == "identity" and any("softmax" in note for note in soft.notes)


# ---------------------------------------------------------------- skipped layers


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_internals_are_skipped_with_a_reason():
    sites = sites_by_name(WithAttention(), torch.randn(2, 5, 16))
    assert "nn.MultiheadAttention" in sites["attn.out_proj"].skip_reason
    assert sites["proj"].eligible


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.tiny = nn.Conv2d(16, 1, 1)
        self.unused = nn.Linear(4, 4)
        self.conv1d = nn.Conv1d(1, 12, 5)

    def forward(self, x):
        h = self.tiny(torch.relu(self.grouped(torch.relu(self.depthwise(x)))))
        return self.conv1d(h.flatten(2))


def test_depthwise_grouped_tiny_and_unused_layers_are_skipped_with_reasons():
    sites = sites_by_name(Convs(), torch.randn(1, 8, 6, 6))
    assert "depthwise" in sites["depthwise"].skip_reason
    assert "groups=2" in sites["grouped"].skip_reason
    assert "no rank saves parameters" in sites["tiny"].skip_reason
    assert "not called" in sites["unused"].skip_reason
    assert sites["conv1d"].eligible and sites["conv1d"].kind == "Conv1d" and sites["conv1d"].shape == (12, 5)
    assert sites["depthwise"].activation == "relu"  # found even though it is skipped


def test_shared_module_is_one_site_called_twice_and_tied_weights_are_skipped():
    sites = sites_by_name(TiedNet(), torch.randn(3, 24))
    assert "alias" not in sites
    assert sites["shared"].eligible and sites["shared"].calls == 2 and sites["shared"].activation == "relu"
    assert any("called 2 times" in note for note in sites["shared"].notes)
    assert "weight is shared with" in sites["c"].skip_reason
    assert "weight is shared with" in sites["d"].skip_reason


class ReadsWeight(nn.Module):
    """An attention-like block whose code reads ``qkv.weight`` instead of calling ``qkv`` (timm's EVA-02)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(48, 16)

    def forward(self, x):
        return self.proj(torch.relu(F.linear(x, self.qkv.weight, self.qkv.bias)))


def test_a_weight_read_by_other_code_is_found_and_noted():
    block = ReadsWeight()
    model = nn.Sequential(block)
    sites = sites_by_name(model, torch.randn(2, 16))
    qkv = sites["0.qkv"]
    assert qkv.eligible and qkv.activation == "relu" and qkv.calls == 1
    assert any("read directly by 0's forward" in note for note in qkv.notes)
    assert not any("read directly" in note for note in sites["0.proj"].notes)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.never = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > -1:  # data-dependent control flow: tracing fails
            return self.b(h)
        return self.never(h)


def test_tracing_failure_falls_back_to_an_eager_walk_with_identity():
    sites = find_sites(DataDependent(), torch.randn(2, 8))
    by_name = {s.name: s for s in sites}
    assert [s.name for s in sites] == ["a", "b", "never"]
    assert by_name["a"].activation == "identity"  # not known without a trace
    assert by_name["a"].eligible and by_name["a"].calls == 1
    assert any(note.startswith("tracing failed") for note in by_name["a"].notes)
    assert "not called" in by_name["never"].skip_reason


class InterruptedWhileTraced(nn.Module):
    """A signal that lands while torch.export runs the model, wrapped by the tracer in an error of its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        if not torch.compiler.is_exporting():
            return self.a(x)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("tracing stopped") from interrupt


def test_an_interrupt_while_tracing_stops_the_walk_instead_of_falling_back_to_the_eager_walk():
    # Any other tracing error falls back (above); Ctrl-C must stop the command.
    with pytest.raises(KeyboardInterrupt):
        find_sites(InterruptedWhileTraced(), torch.randn(2, 8))


def test_an_interrupt_wrapped_by_an_exporter_is_raised_again():
    from lowrank_compress.errors import reraise_interrupt

    reraise_interrupt(RuntimeError("a plain failure"))  # no interrupt in the chain: nothing raised
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("wrapped")  # an implicit __context__, as libraries that re-raise leave
    except ValueError as wrapped:
        with pytest.raises(KeyboardInterrupt):
            reraise_interrupt(wrapped)


def test_eager_walk_on_a_model_that_does_not_run_raises_value_error():
    with pytest.raises(ValueError, match="does not run on the example inputs"):
        find_sites(DataDependent(), torch.randn(2, 5))


# ---------------------------------------------------------------- order, shapes, inputs, max useful rank


def test_sites_come_in_execution_order_with_flattened_shapes():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.z_last = nn.Linear(32, 3)
            self.a_first = nn.Conv2d(3, 8, (3, 5))

        def forward(self, x):
            return self.z_last(F.adaptive_avg_pool2d(torch.relu(self.a_first(x)), 2).flatten(1))

    sites = find_sites(Backwards(), torch.randn(1, 3, 12, 12))
    assert [s.name for s in sites] == ["a_first", "z_last"]
    assert sites[0].shape == (8, 45) and sites[0].kind == "Conv2d"
    assert sites[1].shape == (3, 32) and sites[1].params == 3 * 32 + 3


def test_keyword_and_tuple_example_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x, y):
            return torch.relu(self.a(x)) * torch.sigmoid(self.b(y))

    model = TwoInputs()
    by_kw = {s.name: s.activation for s in find_sites(model, {"x": torch.randn(2, 8), "y": torch.randn(2, 8)})}
    by_tuple = {s.name: s.activation for s in find_sites(model, (torch.randn(2, 8), torch.randn(2, 8)))}
    assert by_kw == by_tuple == {"a": "relu", "b": "sigmoid"}


@pytest.mark.parametrize(
    ("m", "d", "expected"),
    [(64, 147, 44), (64, 64, 31), (1000, 512, 338), (2, 2, 0), (1, 5, 0), (3, 6, 1), (4096, 25088, 3521)],
)
def test_max_useful_rank_is_the_largest_rank_that_saves_parameters(m, d, expected):
    site = LayerSite("layer", nn.Identity(), "Linear", (m, d))
    assert site.max_useful_rank == expected
    r = site.max_useful_rank
    assert r * (m + d) < m * d or r == 0
    assert (r + 1) * (m + d) >= m * d


def test_find_sites_puts_the_model_in_eval_mode_and_describes_sites():
    model = ConvBNNet().train()
    sites = find_sites(model, torch.randn(1, 3, 8, 8))
    assert not model.training
    described = sites[0].describe()
    assert described == {
        "name": "conv1", "kind": "Conv2d", "shape": [16, 27], "activation": "relu", "bn_before": "bn1",
        "affine_after": None, "params": 432, "max_useful_rank": 10, "eligible": True, "skip_reason": None,
        "notes": [],
    }
