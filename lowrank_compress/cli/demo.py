"""``lrc demo``: the bundled digits CNN end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, out


@app.command("demo")
def demo_command(
    out_dir: Path = typer.Option(Path("lrc-demo"), "--out", help="Folder for report.json, summary.md, the PNG plots and the fine-tuned model (created if missing; files in it are replaced)."),
    fast: bool = typer.Option(False, "--fast", help="Less calibration, refinement and fine-tuning, and no data-free nkp row (what the test suite runs, well under a minute)."),
) -> None:
    """Compress the bundled digits CNN (spectral vs nkp, two budgets), fine-tune, export to ONNX, write a report."""
    from rich.table import Table

    from ..examples.demo import percent, run_demo

    result = run_demo(out_dir, fast=fast, log=lambda message: console.print(f"[dim]demo:[/] {message}", highlight=False))
    o = result.original
    table = Table(title=f"digits CNN before fine-tuning ({o['test_samples']} held-out digits)", title_justify="left")
    for column in ("method", "--target-params", "params kept", "FLOPs kept", "test accuracy"):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row(f"original ({o['params']:,} params)", "–", "1.000", "1.000", percent(o["accuracy"]))
    for run in result.runs:
        table.add_row(run.label, str(run.target_params), f"{run.param_ratio:.3f}", f"{run.flop_ratio:.3f}", percent(run.accuracy))
    out.print(table)
    ft, onnx = result.finetune, result.onnx
    out.print(f"fine-tuned {ft['run']} ({ft['steps']} steps of distillation): test accuracy "
              f"{percent(ft['accuracy_before'])} → {percent(ft['accuracy_after'])}", highlight=False)
    out.print(f"ONNX {onnx['file']}: max abs error {onnx['max_abs_error']:.2e}, parity "
              f"{'passed' if onnx['passed'] else 'FAILED'}", highlight=False)
    out.print(f"report: {result.out_dir / 'summary.md'} (and report.json, error_vs_rank.png, accuracy_vs_params.png) "
              f"in {result.seconds:.0f} s", highlight=False)
