"""ONNX export with a parity check against PyTorch.

Exporter: by default (``auto``) the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``)
at opset 17. On torch 2.14 it traces the torchvision and timm CNNs and ViTs in well under a second,
folds eval-mode BatchNorm into the convolutions and emits only default-domain ops (Conv, Gemm,
MatMul, Add, Relu, LayerNormalization, …), which downstream quantizers accept. Where it fails
(e.g. adaptive pooling to a size that does not divide the input, as VGG at 32×32), ``auto`` falls
back to the torch.export-based exporter, which is ~20× slower and writes opset ≥ 18.

The file has one input named ``input`` and one output named ``output`` (``output_0``, ``output_1``,
… for several), with a dynamic batch axis 0 on each.

Parity: the file is run in onnxruntime (CPU, all graph optimizations on, as deployed) and compared
with the PyTorch model on the same inputs — Gaussian inputs at two batch sizes (checks the dynamic
axis too) and, when given, calibration inputs. For each run

    abs error = max |y_onnx − y_torch|,    rel error = max |y_onnx − y_torch| / max |y_torch|,

maxima over every element of every output of that run; the report keeps the largest of each over
all runs. The relative error is scaled by the output's largest magnitude, not elementwise, so
outputs near zero do not blow it up. Parity passes when rel error ≤ ``rtol``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import LrcError, UsageError, reraise_interrupt
from .io.files import atomic_output, check_writable
from .io.files import quiet_output as _quiet_output
from .modelrun import model_device, model_dtype

DEFAULT_OPSET = 17
# Opset ranges on torch 2.14 (torch.onnx._constants); the dynamo exporter starts at 18.
MIN_OPSET, MAX_OPSET = 7, 23
TORCHSCRIPT_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 18
EXPORTERS = ("auto", "torchscript", "dynamo")
INPUT_NAME = "input"
# Calibration inputs are run through both runtimes in chunks of this many samples.
CALIB_CHUNK = 16
# Batched input rank of each convolution type.
_CONV_RANKS = ((nn.Conv1d, 3), (nn.Conv2d, 4), (nn.Conv3d, 5))


@dataclass
class ParityReport:
    """How closely an ONNX file reproduces its PyTorch model (see the module docstring)."""

    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    max_abs_error: float
    max_rel_error: float
    rtol: float
    passed: bool
    batch_sizes: list[int] = field(default_factory=list)
    calib_samples: int = 0
    op_types: list[str] = field(default_factory=list)
    nonstandard_ops: list[str] = field(default_factory=list)
    exporter: str | None = None  # which exporter wrote the file, when export_onnx did

    def to_dict(self) -> dict:
        return asdict(self)


def reference_forward(model: nn.Module, example: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run ``model`` once on ``example`` without gradients; a shape the model cannot take is a UsageError.

    The check runs before any output is written, so a wrong ``--input-shape`` costs one line and
    leaves no file behind. PyTorch convolutions also accept unbatched inputs, so a shape that
    forgot its batch axis (3,224,224) would run and then export a graph whose "batch" axis is the
    channels; hooks on the convolutions catch that.
    """
    def check(module: nn.Module, inputs: tuple) -> None:
        want = next(rank for cls, rank in _CONV_RANKS if isinstance(module, cls))
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == want - 1:
            raise UsageError(f"{type(module).__name__} got a {want - 1}-D input; the shape needs a leading batch axis")

    convs = [m for m in model.modules() if isinstance(m, tuple(cls for cls, _ in _CONV_RANKS))]
    handles = [m.register_forward_pre_hook(check) for m in convs]
    try:
        with torch.no_grad():
            return model(example)
    except (RuntimeError, ValueError, IndexError, AssertionError, TypeError) as exc:
        raise UsageError(f"input shape {tuple(example.shape)} does not fit the model ({_one_line(exc)})") from None
    finally:
        for handle in handles:
            handle.remove()


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"bad input shape {tuple(input_shape)}: every dimension must be a positive integer")
    return shape


def _output_names(outputs: torch.Tensor | tuple | list) -> list[str]:
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, (tuple, list)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return [f"output_{i}" for i in range(len(outputs))]
    raise UsageError(f"the model returns {type(outputs).__name__}; ONNX export needs a tensor or a tuple of tensors")


def _as_arrays(outputs: torch.Tensor | tuple | list) -> list[np.ndarray]:
    items = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    return [o.detach().float().cpu().numpy() for o in items]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).strip().splitlines()[:1])[:200] or type(exc).__name__


def _export_once(
    model: nn.Module, path: str | os.PathLike, example: torch.Tensor, opset: int, dynamic_batch: bool,
    output_names: list[str], dynamo: bool,
) -> None:
    kwargs: dict = {"input_names": [INPUT_NAME], "output_names": output_names, "opset_version": opset}
    if dynamo:
        # Weights inline: a side file would be named after the temporary path and not renamed with it.
        kwargs["external_data"] = False
    if dynamo and dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]}
    with warnings.catch_warnings(), _quiet_output():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=dynamo, verbose=False, **kwargs)


def write_graph(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> tuple[list[str], str, int]:
    """Write ``model`` traced at ``example`` to ``path`` (not atomic, no checks).

    ``exporter``: ``torchscript``, ``dynamo`` or ``auto`` (TorchScript, then dynamo where it fails;
    dynamo exports at opset ≥ 18). The model must be in eval mode. Exporter warnings and output
    are silenced: they are about PyTorch internals, not the user's model.
    Returns (output names, exporter used, opset used).
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"opset {opset} is outside the supported range {MIN_OPSET}–{MAX_OPSET}")
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise UsageError(f"the torchscript exporter supports opsets up to {TORCHSCRIPT_MAX_OPSET}, not {opset}")
    with torch.no_grad():
        outputs = model(example)
    output_names = _output_names(outputs)
    first_error: Exception | None = None
    if exporter != "dynamo" and opset <= TORCHSCRIPT_MAX_OPSET:
        try:
            _export_once(model, path, example, opset, dynamic_batch, output_names, dynamo=False)
            return output_names, "torchscript", opset
        except Exception as exc:  # tracers fail in many ways; each becomes one line for the user
            reraise_interrupt(exc)
            if exporter == "torchscript":
                raise LrcError(f"ONNX export failed ({_one_line(exc)})") from exc
            first_error = exc
    dynamo_opset = max(opset, DYNAMO_MIN_OPSET)
    try:
        _export_once(model, path, example, dynamo_opset, dynamic_batch, output_names, dynamo=True)
    except Exception as exc:
        reason = _one_line(first_error if first_error is not None else exc)
        raise LrcError(f"ONNX export failed ({reason})") from exc
    return output_names, "dynamo", dynamo_opset


def ort_session(path: str | os.PathLike, threads: int | None = None, device: str = "cpu",
                optimized_path: str | os.PathLike | None = None, profile_prefix: str | os.PathLike | None = None,
                spin_between_runs: bool = True):
    """An onnxruntime session with all graph optimizations on (what a deployment would use).

    ``threads`` sets the intra-op thread pool (None: onnxruntime's default, one per physical core).
    ``device`` cuda runs on the CUDA execution provider (onnxruntime-gpu), CPU for what it lacks.
    ``optimized_path``: also write the graph as optimized for this machine there.
    ``profile_prefix``: turn on onnxruntime's profiler, its JSON written under this prefix
    (``session.end_profiling()`` returns the file). ``spin_between_runs=False``: the intra-op
    threads spin during a run, as a deployment's do, and stop as soon as it returns instead of
    spinning on for a while, so that sessions timed one after another in one process do not take
    the cores from each other (:func:`lowrank_compress.bench.time_interleaved`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if not spin_between_runs:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def _load_graph_proto(path: str | os.PathLike):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf decode errors for a file that is not ONNX
        raise UsageError(f"{path} is not a readable ONNX file ({_one_line(exc)})") from None


def _input_shape_of(proto) -> tuple[int, ...]:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    # A symbolic dimension (the dynamic batch axis) reads as 1.
    return tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)


def onnx_input_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape of an ONNX file's first input, with symbolic (dynamic) axes read as 1."""
    return _input_shape_of(_load_graph_proto(path))


def _batches(calib_inputs: torch.Tensor | Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    if calib_inputs is None:
        return []
    if isinstance(calib_inputs, torch.Tensor):
        return list(calib_inputs.split(CALIB_CHUNK))
    return [b for batch in calib_inputs for b in batch.split(CALIB_CHUNK)]


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    rtol: float = 1e-4,
    calib_inputs: torch.Tensor | Iterable[torch.Tensor] | None = None,
    batch_sizes: Sequence[int] | None = None,
    seed: int = 0,
) -> ParityReport:
    """Run the ONNX file at ``path`` in onnxruntime and compare it with ``model`` (see module docstring).

    ``input_shape`` (N, …) defaults to the file's input shape with batch 1; Gaussian inputs are drawn
    at ``batch_sizes`` (default N and N + 2). ``calib_inputs`` (n, …) tensors, or an iterable of
    batches, are compared too. The model is compared in eval mode and left as it was.
    """
    proto = _load_graph_proto(path)
    shape = _check_shape(input_shape) if input_shape is not None else _input_shape_of(proto)
    sizes = list(batch_sizes) if batch_sizes else [shape[0], shape[0] + 2]
    graph = proto.graph
    input_names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    output_names = [o.name for o in graph.output]
    session = ort_session(path)
    dtype, device = model_dtype(model), model_device(model)
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn((b, *shape[1:]), generator=gen) for b in sizes]
    calib = _batches(calib_inputs)
    was_training = model.training
    model.eval()
    max_abs = max_rel = 0.0
    try:
        for x in inputs + calib:
            ref = _as_arrays(reference_forward(model, x.to(device=device, dtype=dtype)))
            got = session.run(None, {input_names[0]: x.float().cpu().numpy()})
            if len(got) != len(ref):
                raise LrcError(f"the ONNX file has {len(got)} outputs, the model {len(ref)}")
            for g, r in zip(got, ref):
                if g.shape != r.shape:
                    raise LrcError(f"ONNX output shape {g.shape} differs from the model's {r.shape}")
                diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
                abs_err = float(diff.max()) if diff.size else 0.0
                if not np.isfinite(abs_err):
                    abs_err = float("inf")
                scale = float(np.abs(r).max()) if r.size else 0.0
                rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
                max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    finally:
        model.train(was_training)
    ops = sorted({n.op_type for n in graph.node})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ParityReport(
        path=str(path),
        opset=opset,
        input_names=input_names,
        output_names=output_names,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        rtol=rtol,
        passed=max_rel <= rtol,
        batch_sizes=sizes,
        calib_samples=sum(len(b) for b in calib),
        op_types=ops,
        nonstandard_ops=custom,
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    example_inputs: torch.Tensor | None = None,
    rtol: float = 1e-4,
    calib_inputs: torch.Tensor | Iterable[torch.Tensor] | None = None,
    batch_sizes: Sequence[int] | None = None,
    exporter: str = "auto",
) -> ParityReport:
    """Export ``model`` to ONNX at ``path``, check the graph and compare it with PyTorch.

    ``input_shape`` (N, C, H, W) or (N, d) — or ``example_inputs``, a tensor of that shape — fixes
    every axis but the batch. The file is written atomically: on an export or checker failure,
    or Ctrl-C, no file is left. A parity miss is *not* an exception: the file is kept for
    inspection and ``report.passed`` is False, so the caller decides what to do. Models in another
    float dtype are exported as a float32 copy (onnxruntime's CPU kernels are float32).
    """
    import onnx

    if example_inputs is None and input_shape is None:
        raise UsageError("export needs an input shape or example inputs")
    if not rtol > 0:
        raise UsageError(f"the parity tolerance must be positive, got {rtol}")
    shape = _check_shape(example_inputs.shape if example_inputs is not None else input_shape)
    check_writable(path)
    device = model_device(model)
    source = model if model_dtype(model) == torch.float32 else copy.deepcopy(model).float()
    example = torch.randn(shape) if example_inputs is None else example_inputs.detach().float()
    example = example.to(device)
    was_training = source.training
    source.eval()
    try:
        reference_forward(source, example)
        with atomic_output(path) as tmp:
            _, used, _ = write_graph(source, tmp, example, opset=opset, dynamic_batch=True, exporter=exporter)
            try:
                onnx.checker.check_model(str(tmp))
            except onnx.checker.ValidationError as exc:
                raise LrcError(f"the exported graph fails onnx.checker ({_one_line(exc)})") from None
            report = verify_onnx(tmp, source, shape, rtol=rtol, calib_inputs=calib_inputs, batch_sizes=batch_sizes)
    finally:
        source.train(was_training)
    report.path = str(Path(path))
    report.exporter = used
    return report
