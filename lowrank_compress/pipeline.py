"""The compress job end to end: load, calibrate, compress, measure, write (what ``lrc compress`` runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io.opening import open_model
from .io.records import LoadedModel
from .compress import compress
from .config import CompressConfig, CompressReport, ProgressFn
from .modelrun import batch_size, call_model, model_dtype, output_tensors, padding_mask
from .sensitivity import output_metric
from .errors import BudgetExceeded, LrcError, UsageError
from .io.files import atomic_output, check_writable
from .io.format import save
from .io.timings import load_timing_cache, save_timing_cache


@dataclass
class CompressJob:
    """Everything ``lrc compress`` takes."""

    checkpoint: Path
    config: CompressConfig
    output: Path | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None
    calib: str | None = None
    calib_batch_size: int = 32
    json_path: Path | None = None
    onnx_path: Path | None = None
    plot_path: Path | None = None
    max_output_error: float | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.calib_batch_size < 1:
            raise UsageError(f"--calib-batch-size must be ≥ 1, got {self.calib_batch_size}")


@dataclass
class JobResult:
    report: CompressReport
    output: Path
    model: nn.Module
    loaded: LoadedModel
    parity: Any = None
    failure: Exception | None = None


def default_output(checkpoint: Path) -> Path:
    """``resnet50.pt`` → ``resnet50.lrc.safetensors`` beside it."""
    name = checkpoint.name
    for suffix in (".lrc.safetensors", ".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return checkpoint.with_name(name + ".lrc.safetensors")


def output_error(original: nn.Module, compressed: nn.Module, batches: list[Any]) -> float:
    """‖f(x) − f̃(x)‖ / ‖f(x)‖ over all outputs of all batches (Frobenius norms); a keyword batch's
    attention_mask leaves padded token positions out (as :func:`sensitivity.output_metric` does)."""
    return _error_against(_model_outputs(original, batches), compressed, batches)


def _model_outputs(model: nn.Module, batches: list[Any]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [output_tensors(call_model(model, batch), floating_only=False) for batch in batches]


def _error_against(references: list[list[torch.Tensor]], compressed: nn.Module, batches: list[Any]) -> float:
    """:func:`output_error` against outputs of the original model recorded earlier."""
    num, den = 0.0, 0.0
    for batch, refs, news in zip(batches, references, _model_outputs(compressed, batches)):
        n, d = output_metric(refs, news, "mse", padding_mask(batch))
        num, den = num + n, den + d
    return (num / den) ** 0.5 if den > 0 else 0.0


def _new_inputs(job: CompressJob, loaded: LoadedModel, calibration: list[Any], dtype: torch.dtype) -> Any:
    """What distillation trains on instead of the stored calibration batches, or None.

    A folder of fewer images than ``--calib-samples`` was filled up with random views of them: new
    views each step (:class:`views.ViewStream`). A text file of at least twice ``--calib-samples``
    texts: those beyond the first ``--calib-samples``, which calibration did not read, each once
    (:class:`views.TextStream`; its first batches, as many as calibration holds out, are the held-out check).
    """
    if job.config.distill_steps == 0 or job.calib == "gaussian":
        return None
    from .calibdata import read_texts
    from .distill import MAX_STEPS, batch_size_for
    from .views import TextStream, ViewStream

    samples, size = job.config.calib_samples, batch_size_for(sum(batch_size(b) for b in calibration))
    if loaded.hf is not None:
        # No more texts than the steps can take: the held-out check (at most a batch per
        # calibration sample) and then a batch per step. A large corpus is not read whole.
        steps = MAX_STEPS if job.config.distill_steps is None else job.config.distill_steps
        texts = read_texts(job.calib, samples + (samples + steps) * size)
        if len(texts) < 2 * samples:
            return None
        rest = f"the {len(texts) - samples} texts of {job.calib} after the first {samples}, each once"
        return TextStream(texts[samples:], loaded.hf.tokenize, loaded.hf.by_length, size, seed=job.config.seed + 1,
                          description=rest)
    if not Path(job.calib).is_dir():
        return None
    views = ViewStream(job.calib, loaded.input_shape, loaded.data_config, samples, size, seed=job.config.seed + 1,
                       dtype=dtype)
    return views if len(views.files) < samples else None


def run_compress(job: CompressJob, progress: ProgressFn | None = None, raise_on_failure: bool = True) -> JobResult:
    """Run a compress job. Outputs are written atomically; a missed budget or a failed ONNX parity
    check is raised after writing (or left in ``result.failure`` with ``raise_on_failure=False``)."""
    from .calibdata import calibration_batches

    out = job.output or default_output(job.checkpoint)
    for path in (out, job.json_path, job.onnx_path, job.plot_path, job.timing_cache):
        if path is not None:
            check_writable(path)
    if job.max_output_error is not None and not job.max_output_error >= 0:
        raise UsageError(f"--max-output-error must be ≥ 0, got {job.max_output_error}")
    timings = load_timing_cache(job.timing_cache) if job.timing_cache is not None else None  # checked before any work
    torch.manual_seed(job.config.seed)
    loaded = open_model(job.checkpoint, job.arch, job.arch_kwargs, job.trust_pickle, job.input_shape)
    shape = loaded.input_shape
    if shape is None:
        raise UsageError(f"cannot tell the input shape of {job.checkpoint}; pass --input-shape, e.g. 1,3,224,224")
    model = loaded.model
    if loaded.arch is None:
        raise UsageError(
            f"cannot tell how to rebuild the {type(model).__name__} pickled in {job.checkpoint} from its class alone; "
            "pass --arch (and --arch-kwargs) that builds it, to record in the output's manifest"
        )
    gen = torch.Generator().manual_seed(job.config.seed)
    dtype = model_dtype(model)
    example = loaded.hf.example() if loaded.hf is not None else torch.randn(shape, generator=gen).to(dtype)
    _check_runs(model, example)
    calibration = None
    if job.calib is not None:
        calibration = calibration_batches(
            job.calib, shape, loaded.data_config, job.config.calib_samples, job.calib_batch_size, job.config.seed, dtype,
            hf=loaded.hf,
        )
    check = calibration[:4] if calibration else [example if loaded.hf is not None else torch.randn((8, *shape[1:]), generator=gen).to(dtype)]
    # The original's outputs, not a copy of the original: a copy would double the peak memory.
    references = _model_outputs(model, check)
    distill_inputs = _new_inputs(job, loaded, calibration, dtype) if calibration else None
    model, report = compress(model, job.config, example, calibration=calibration, progress=progress,
                             curves=job.plot_path is not None, timing_cache=timings, distill_inputs=distill_inputs)
    if timings is not None:
        save_timing_cache(timings, job.timing_cache)
    report.output_error = _error_against(references, model, check)
    del references

    save(model, out, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs, input_shape=list(shape),
         data_config=_jsonable(loaded.data_config.to_dict()), hf=loaded.hf.manifest() if loaded.hf is not None else None)
    if job.json_path is not None:
        with atomic_output(job.json_path) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    parity = None
    if job.onnx_path is not None:
        from .export import export_onnx
        from .textexport import export_text_onnx

        if loaded.hf is not None:
            parity = export_text_onnx(model, job.onnx_path, loaded.hf, calib_inputs=calibration[:2] if calibration else None)
        else:
            parity = export_onnx(model, job.onnx_path, input_shape=shape,
                                 calib_inputs=calibration[:2] if calibration else None)
    if job.plot_path is not None:
        from .plots import plot_compression

        plot_compression(report, job.plot_path)
    result = JobResult(report=report, output=out, model=model, loaded=loaded, parity=parity)
    if parity is not None and not parity.passed:
        result.failure = LrcError(
            f"ONNX parity failed: max relative error {parity.max_rel_error:.2e} > tolerance {parity.rtol:.0e} "
            f"(file kept at {job.onnx_path})"
        )
    elif job.max_output_error is not None and report.output_error > job.max_output_error:
        result.failure = BudgetExceeded(f"output error {report.output_error:.4f} > budget {job.max_output_error:.4f}")
    if raise_on_failure and result.failure is not None:
        raise result.failure
    return result


def _check_runs(model: nn.Module, example: Any) -> None:
    try:
        with torch.no_grad():
            call_model(model, example)
    except Exception as exc:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else list(example)
        raise UsageError(
            f"the model does not run on an input of shape {shape} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); check --input-shape"
        ) from None


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))
