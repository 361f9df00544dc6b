"""Rich rendering for the CLI: tables of layer sites, compression reports and manifests; the compress progress bar."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..compress import CompressReport
from ..config import Skip
from ..graph import LayerSite

if TYPE_CHECKING:
    from ..benchjob import BenchResult
    from ..export import ParityReport


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_err(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def sites_table(sites: list[LayerSite], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col, justify in (("layer", "left"), ("kind", "left"), ("shape m×d", "right"), ("activation", "left"),
                         ("params", "right"), ("max rank", "right"), ("status", "left")):
        table.add_column(col, justify=justify)
    for s in sites:
        act = s.activation + (" (BN before)" if s.bn_before is not None else "") + (" (affine after)" if s.affine_after is not None else "")
        status = "[green]eligible[/]" if s.eligible else f"[yellow]skip:[/] {s.skip_reason}"
        table.add_row(s.name, s.kind, f"{s.shape[0]}×{s.shape[1]}", act, _fmt_int(s.params), str(s.max_useful_rank), status)
    return table


def manifest_table(manifest: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("layer", "kind", "rank", "bias"):
        table.add_column(col)
    for name, entry in manifest.get("layers", {}).items():
        rank = str(entry.get("rank")) + (f" (tied to {entry['tied_to']})" if "tied_to" in entry else "")
        table.add_row(name, str(entry.get("kind")), rank, "yes" if entry.get("bias") else "no")
    return table


def report_table(report: CompressReport) -> Table:
    calibrated = any(len(layer.candidates) > 2 for layer in report.layers)
    table = Table(title="compressed layers", title_justify="left")
    columns = ["layer", "act", "shape", "rank", "params", "gauss err spectral", "gauss err nkp"]
    if calibrated:
        columns += ["held-out spectral", "kept", "held-out kept"]
    noted = any(layer.note for layer in report.layers)  # e.g. latency-aware planning's measured times
    if noted:
        columns.append("note")
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "act", "kept", "note") else "right", overflow="fold")
    for layer in report.layers:
        row = [
            layer.name, layer.activation, "×".join(map(str, layer.shape)), str(layer.rank),
            f"{_fmt_int(layer.params_before)}→{_fmt_int(layer.params_after)}",
            _fmt_err(layer.error_spectral), _fmt_err(layer.error_nkp),
        ]
        if calibrated:
            row += [_fmt_err(layer.candidates.get("spectral")), layer.method, _fmt_err(layer.candidates.get(layer.method))]
        if noted:
            row.append(layer.note or "")
        table.add_row(*row)
    return table


def totals_table(report: CompressReport) -> Table:
    table = Table(title="totals", title_justify="left")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("params", _fmt_int(report.params_before), _fmt_int(report.params_after),
                  f"{report.params_after / max(report.params_before, 1):.3f}")
    table.add_row("FLOPs", _fmt_int(report.flops_before), _fmt_int(report.flops_after),
                  f"{report.flops_after / max(report.flops_before, 1):.3f}")
    if report.output_error is not None:
        table.add_row("output error", "", f"{report.output_error:.4f}", "")
    distilled = report.distillation
    if distilled is not None:  # held-out output metric before and after label-free distillation
        table.add_row(f"distillation {distilled['metric']}", f"{distilled['before']:.4f}", f"{distilled['after']:.4f}",
                      _distill_steps(distilled))
        if distilled["steps"]:  # the step size, given or chosen by the probe
            how = "probed" if distilled.get("lr_probe") else ""
            table.add_row("distillation lr", "", f"{distilled['lr']:g}", how)
    table.add_row("layers", "", f"{len(report.layers)} factorized", f"{len(report.skipped)} skipped")
    return table


def _distill_steps(distilled: dict) -> str:
    """'600 steps (auto)', '40 steps' when asked for, 'skipped (auto)' where none fit its budget."""
    schedule = distilled.get("schedule") or ""
    if schedule.startswith("auto: skipped"):
        return "skipped (auto: over budget)"
    return f"{distilled['steps']} steps" + (" (auto)" if schedule.startswith("auto") else "")


def skipped_table(skipped: list[Skip]) -> Table:
    table = Table(title="left dense", title_justify="left")
    table.add_column("layer")
    table.add_column("reason")
    for item in skipped:
        table.add_row(item.name, item.reason)
    return table


def compress_progress(console: Console, quiet: bool) -> tuple[Progress, Callable[[str, int, int], None]]:
    """The progress bar of ``lrc compress`` and the per-layer callback that advances it."""
    progress = Progress(TextColumn("[bold]compress[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, disable=quiet, transient=True)
    task = progress.add_task("", total=None)

    def on_layer(name: str, done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=name)

    return progress, on_layer


def print_compress_result(out: Console, console: Console, result: Any, onnx_path: Path | None, quiet: bool) -> None:
    """What ``lrc compress`` prints for a ``pipeline.CompressResult``: tables unless ``quiet``, then the output."""
    report = result.report
    if not quiet:
        out.print(report_table(report))
        if report.skipped:
            out.print(skipped_table(report.skipped))
        out.print(totals_table(report))
        for note in report.notes:
            console.print(f"[yellow]note:[/] {note}")
        if report.timings is not None:
            out.print(f"layer timings: {report.timings['reused']} reused from the timing cache, "
                      f"{report.timings['measured']} measured")
        if result.parity is not None:
            out.print(f"ONNX {onnx_path}: max abs error {result.parity.max_abs_error:.2e}, max rel error {result.parity.max_rel_error:.2e}")
    if result.loaded.arch_note:
        console.print(result.loaded.arch_note, highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {result.output}", highlight=False, soft_wrap=True, markup=False)


def bench_tables(result: BenchResult) -> list[Table]:
    """``lrc bench``: the size table, then the throughput or latency table."""
    shape, base = result.shape, result.sizes.get("baseline")
    table = Table(title=f"size (FLOPs per sample at {'×'.join(map(str, shape[1:]))})")
    for column in ("", "file", "params", "GFLOPs", "params ratio", "FLOPs ratio"):
        table.add_column(column, justify="right" if column not in ("", "file") else "left")
    for name, info in result.sizes.items():
        p_ratio = f"{info['params'] / base['params']:.3f}" if base else ""
        f_ratio = f"{info['flops'] / base['flops']:.3f}" if base and info["flops"] and base["flops"] else ""
        gflops = f"{info['flops'] / 1e9:.3f}" if info["flops"] is not None else "–"
        table.add_row(name, info["path"], f"{info['params']:,}", gflops, p_ratio, f_ratio)
    timing = _throughput_table(result) if result.throughput else _latency_table(result)
    return [table, timing]


def _throughput_table(result: BenchResult) -> Table:
    job, report = result.job, result.report
    how = ", ".join(w for w, on in (("bf16 autocast", report.bf16), ("channels_last", report.channels_last),
                                     ("torch.compile", report.compiled)) if on) or "eager float32"
    table = Table(title=f"throughput on {job.device} ({how}), median of {job.repeats} rounds of {job.steps} steps")
    for column in ("", "mode", "batch", "samples/s", "step ms", "ratio"):
        table.add_column(column, justify="right" if column not in ("", "mode") else "left")
    for r in sorted(report.results, key=lambda r: (r.mode, r.batch_size, r.model != "baseline")):
        ratio = f"{r.ratio:.3f}" if job.vs is not None and r.ratio is not None else ""
        table.add_row(r.model, r.mode, str(r.batch_size), f"{r.samples_per_s:,.1f}", f"{r.step_s * 1e3:.2f}", ratio)
    return table


def _latency_table(result: BenchResult) -> Table:
    job, report = result.job, result.report
    threads_text = "default threads" if job.threads is None else f"{job.threads} thread{'' if job.threads == 1 else 's'}"
    table = Table(title=f"latency: {job.runtime} on {job.device}, {threads_text}, median of {job.repeats} interleaved runs")
    for column in ("", "batch", "median ms", "IQR ms", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    for r in sorted(report.results, key=lambda r: (r.batch_size, r.model != "baseline")):
        ratio = f"{r.ratio:.3f}" if job.vs is not None and r.ratio is not None else ""
        table.add_row(r.model, str(r.batch_size), f"{r.median_s * 1e3:.2f}", f"{r.iqr_s * 1e3:.2f}", ratio)
    return table


def parity_table(report: ParityReport, onnx: Path, rtol: float) -> Table:
    """``lrc export``: the ONNX parity check of ``report`` (an ``export.ParityReport``)."""
    table = Table(title=escape(f"{onnx} ({report.exporter} exporter, opset {report.opset})"))
    for column in ("max abs error", "max rel error", "tolerance", "checked", "parity"):
        table.add_column(column, justify="right")
    checked = f"batches {','.join(map(str, report.batch_sizes))}" + (f" + {report.calib_samples} calib" if report.calib_samples else "")
    table.add_row(
        f"{report.max_abs_error:.2e}", f"{report.max_rel_error:.2e}", f"{rtol:.0e}", checked,
        "[green]pass[/]" if report.passed else "[red]FAIL[/]",
    )
    return table
