"""``lrc export``: ONNX export with a parity check."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import LrcError, UsageError
from .app import app, out
from ..io.checks import require_input_shape
from .options import ARCH_HELP


@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A compressed .lrc.safetensors, or an original checkpoint with --arch."),
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the ONNX file (written atomically)."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W (or N,D) to trace at; the batch axis stays dynamic \\[default: the model's recorded shape, else the arch config]."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (7–20 with the torchscript exporter, up to 23 with dynamo)."),
    exporter: str = typer.Option("auto", "--exporter", help="torchscript, dynamo, or auto (torchscript, then dynamo where it fails)."),
    rtol: float = typer.Option(1e-4, "--rtol", help="Parity tolerance on max|onnx − torch| / max|torch| over the checked inputs."),
    arch: str | None = typer.Option(None, "--arch", help=ARCH_HELP),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint holding a pickled model (runs code from the file)."),
    calib: str | None = typer.Option(None, "--calib", help="Also compare on these inputs: an image folder, a tensor file (.npy/.pt/.safetensors, first axis = samples) or 'gaussian'."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="At most this many --calib samples."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the parity report here as JSON."),
) -> None:
    """Export to ONNX (input "input", output "output", dynamic batch), check it, compare with PyTorch in onnxruntime."""
    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..io.opening import open_model
    from ..export import export_onnx
    from ..io.files import check_distinct_paths, check_writable, write_json
    from .render import parity_table

    check_distinct_paths({"MODEL": model, "--calib": calib if calib != "gaussian" else None}, {"--onnx": onnx, "--json": json_path})
    shape = parse_input_shape(input_shape)
    if not rtol > 0:
        raise UsageError(f"--rtol must be positive, got {rtol}")
    check_writable(onnx)
    if json_path is not None:
        check_writable(json_path)
    loaded = open_model(model, arch, parse_arch_kwargs(arch_kwargs), trust_pickle, shape)
    if loaded.hf is not None:  # a Hugging Face text model: token inputs by name, batch and sequence axes
        report = _export_text(loaded, onnx, calib, calib_samples, opset, rtol, exporter)
    else:
        shape = require_input_shape(loaded.input_shape, shape, model)
        calib_inputs = None
        if calib is not None:
            from ..calibdata import calibration_batches
            from ..export import CALIB_CHUNK

            calib_inputs = calibration_batches(calib, shape, loaded.data_config, calib_samples, CALIB_CHUNK,
                                               views=False)
        report = export_onnx(loaded.model, onnx, shape, opset=opset, rtol=rtol, calib_inputs=calib_inputs, exporter=exporter)
    out.print(parity_table(report, onnx, rtol))
    ops = ", ".join(report.op_types)
    out.print(f"ops: {ops}" + (f"; non-standard: {', '.join(report.nonstandard_ops)}" if report.nonstandard_ops else ""), highlight=False)
    if json_path is not None:
        write_json(report.to_dict(), json_path)
    if not report.passed:
        raise LrcError(
            f"ONNX parity failed: max relative error {report.max_rel_error:.2e} > tolerance {rtol:.0e}; "
            f"{onnx} was kept for inspection"
        )


def _export_text(loaded, onnx: Path, calib: str | None, calib_samples: int, opset: int, rtol: float, exporter: str):
    from ..calibdata import text_batches
    from ..export import CALIB_CHUNK
    from ..textexport import export_text_onnx

    calib_inputs = text_batches(calib, loaded.hf, calib_samples, CALIB_CHUNK) if calib is not None else None
    return export_text_onnx(loaded.model, onnx, loaded.hf, opset=opset, rtol=rtol, calib_inputs=calib_inputs,
                            exporter=exporter)
