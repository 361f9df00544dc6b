"""ONNX export of Hugging Face text models: token inputs by name, dynamic batch and sequence axes.

The graph takes the tokenizer's inputs (``input_ids``, ``attention_mask``, ``token_type_ids`` …, int64,
axes named ``batch`` and ``sequence``) and returns the model's first output (``last_hidden_state``
for an encoder, ``logits`` for a language model). Parity is checked in onnxruntime as for
:func:`export.export_onnx`: max |onnx − torch| / max |torch| over random token batches of two
batch sizes and two lengths, some rows padded, plus the given calibration batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import LrcError, UsageError, reraise_interrupt
from .export import DEFAULT_OPSET, TORCHSCRIPT_MAX_OPSET, ParityReport, ort_session
from .io.files import atomic_output, check_writable
from .io.files import quiet_output as _quiet_output
from .modelrun import batch_size, call_model


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).strip().splitlines()[:1])[:200] or type(exc).__name__


class _TextGraph(nn.Module):
    """The model called with keyword inputs given positionally, returning its first output tensor."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return first_output(self.model(**dict(zip(self.names, inputs))))


def first_output(result: Any) -> torch.Tensor:
    """A Hugging Face model's first output tensor (``last_hidden_state``, ``logits``)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, dict):
        return next(v for v in result.values() if isinstance(v, torch.Tensor))
    return result[0]


def output_name(model: nn.Module, example: dict[str, torch.Tensor]) -> str:
    with torch.no_grad():
        result = call_model(model, example)
    if isinstance(result, dict):
        return next(k for k, v in result.items() if isinstance(v, torch.Tensor))
    return "output"


def token_batches(hf: Any, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token batches (1 × 6 and 3 × 11, the last row padded after 4 tokens) for parity checks."""
    batches = []
    for i, (batch, length) in enumerate(((1, 6), (3, 11))):
        inputs = hf.random_inputs(batch, length, seed=seed + i)
        if batch > 1 and "attention_mask" in inputs:
            inputs["attention_mask"][-1, 4:] = 0
        batches.append(inputs)
    return batches


def _export(graph: nn.Module, path: str | os.PathLike, example: dict[str, torch.Tensor], output: str, opset: int,
            exporter: str) -> str:
    names = list(example)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, output]}
    errors = []
    for dynamo in ((False, True) if exporter == "auto" else (exporter == "dynamo",)):
        kwargs: dict[str, Any] = {"input_names": names, "output_names": [output]}
        if dynamo:
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
            kwargs.update(dynamic_shapes=tuple(dims for _ in names), external_data=False, opset_version=max(opset, 18))
        else:
            kwargs.update(dynamic_axes=axes, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET))
        try:
            with warnings.catch_warnings(), _quiet_output():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, tuple(example.values()), str(path), dynamo=dynamo, verbose=False, **kwargs)
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:  # tracers fail in many ways; each becomes one line for the user
            reraise_interrupt(exc)
            errors.append(exc)
    raise LrcError(f"ONNX export failed ({_one_line(errors[0])})")


def verify_text_onnx(path: str | os.PathLike, model: nn.Module, batches: list[dict[str, torch.Tensor]],
                     rtol: float) -> tuple[float, float]:
    """(max abs error, max relative error) of the ONNX file against ``model`` over ``batches``."""
    session = ort_session(path)
    wanted = [i.name for i in session.get_inputs()]
    max_abs = max_rel = 0.0
    for batch in batches:
        with torch.no_grad():
            ref = first_output(call_model(model, batch)).float().numpy().astype(np.float64)
        got = session.run(None, {n: batch[n].long().numpy() for n in wanted})[0].astype(np.float64)
        if got.shape != ref.shape:
            raise LrcError(f"ONNX output shape {got.shape} differs from the model's {ref.shape}")
        abs_err = float(np.abs(got - ref).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    return max_abs, max_rel


def export_text_onnx(model: nn.Module, path: str | os.PathLike, hf: Any, opset: int = DEFAULT_OPSET,
                     rtol: float = 1e-4, calib_inputs: Iterable[dict[str, torch.Tensor]] | None = None,
                     exporter: str = "auto") -> ParityReport:
    """Export a Hugging Face text model (``hf``: its ``io.hf.HFModel``) to ``path`` atomically and check
    parity; a parity miss keeps the file and sets ``report.passed`` False (as :func:`export.export_onnx`)."""
    import onnx

    if not rtol > 0:
        raise UsageError(f"the parity tolerance must be positive, got {rtol}")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise UsageError(f"unknown exporter {exporter!r}; use auto, torchscript or dynamo")
    check_writable(path)
    model = model.float().eval()
    checks = token_batches(hf)
    example = {k: v for k, v in checks[1].items()}
    graph = _TextGraph(model, list(example)).eval()
    name = output_name(model, example)
    calib = list(calib_inputs or [])
    with atomic_output(path) as tmp:
        used = _export(graph, tmp, example, name, opset, exporter)
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise LrcError(f"the exported graph fails onnx.checker ({_one_line(exc)})") from None
        max_abs, max_rel = verify_text_onnx(tmp, model, checks + calib, rtol)
        proto = onnx.load(str(tmp), load_external_data=False)
    graph_proto = proto.graph
    return ParityReport(
        path=str(Path(path)), opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        input_names=[i.name for i in graph_proto.input], output_names=[o.name for o in graph_proto.output],
        max_abs_error=max_abs, max_rel_error=max_rel, rtol=rtol, passed=max_rel <= rtol,
        batch_sizes=[batch_size(b) for b in checks], calib_samples=sum(batch_size(b) for b in calib),
        op_types=sorted({n.op_type for n in graph_proto.node}),
        nonstandard_ops=sorted({f"{n.domain}::{n.op_type}" for n in graph_proto.node
                                if n.domain not in ("", "ai.onnx")}),
        exporter=used,
    )
