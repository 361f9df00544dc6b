"""``lrc demo``: the whole tool on the embedded digits CNN, on a CPU, in a few minutes.

Steps (all on the shipped model ``assets/digits_cnn.safetensors`` and its held-out split):
1. compress it at ``--target-params`` from 0.5 down to 0.05 four ways — spectral (SVD truncation,
   data-free), nkp data-free (left out in fast mode), nkp calibrated on training images with the
   per-layer rank allocation, and network-aware (output-aware allocation, then the default label-free
   distillation on the calibration images) — and measure test
   accuracy before any fine-tuning: the budgets where the methods part ways;
2. fine-tune the per-layer calibrated model at the smallest budget, the one calibration alone
   leaves short, briefly by distillation from the original (``train.finetune`` on an image folder of the
   training split, CPU);
3. export the fine-tuned model to ONNX and check parity with PyTorch in onnxruntime;
4. write ``report.json``, ``summary.md`` and two PNG plots into the output folder.

The test split is never used for calibration or training: calibration and fine-tuning draw from
the training split (the same seeded split the model was trained on). Everything runs on one CPU
thread with deterministic kernels: the model is tiny, so one thread is the fastest setting on a
shared machine, and a rerun gives the same figures.
"""

from __future__ import annotations

import copy
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import digits
from ..compress import CompressConfig, CompressReport, compress, count_flops, count_params
from ..errors import LrcError, UsageError
from ..io.files import atomic_output, write_json

BUDGETS = (0.5, 0.25, 0.1, 0.05)
FAST_BUDGETS = (0.1,)
# (label, --method, calibrated, --allocation): the rows of the comparison, in the order they are shown.
Variant = tuple[str, str, bool, str]
SPECTRAL: Variant = ("spectral", "spectral", False, "auto")
NKP_DATA_FREE: Variant = ("nkp (data-free)", "nkp", False, "auto")
NKP_CALIBRATED: Variant = ("nkp (calibrated)", "nkp", True, "layer")
NETWORK_AWARE: Variant = ("nkp (network-aware)", "nkp", True, "output")

REPORT_VERSION = 1

# File names inside the output folder.
REPORT_JSON = "report.json"
SUMMARY_MD = "summary.md"
ERROR_PLOT = "error_vs_rank.png"
ACCURACY_PLOT = "accuracy_vs_params.png"
CALIB_FILE = "calibration.safetensors"
FINETUNED_MODEL = "digits_finetuned.lrc.safetensors"
FINETUNE_LR = 5e-3  # 20 epochs from 27.59%: 95.37% (1e-2: 94.26%; 10 epochs at 5e-4: 60.74%, 5e-3: 86.85%)
FINETUNED_ONNX = "digits_finetuned.onnx"


@dataclass(frozen=True)
class DemoSettings:
    """How much work each step does; ``fast`` is the test-suite size (well under a minute).

    Fast mode leaves out data-free nkp: it spends most of its time on the per-layer error curves
    of the rank allocation (the nonlinear row fit at every candidate rank), and it exercises no
    code the other two rows do not.
    """

    variants: tuple[Variant, ...]
    budgets: tuple[float, ...]
    calib_samples: int
    refine_steps: int
    finetune_epochs: int
    finetune_max_steps: int | None
    seed: int = 0

    @property
    def finetuned(self) -> tuple[str, float]:
        """The run that is fine-tuned and exported: per-layer calibration at the smallest budget, the one
        calibration alone leaves short (network-aware compression with its distillation gets close to
        the original there, and fine-tuning with labels on cropped images had little to add)."""
        return NKP_CALIBRATED[0], min(self.budgets)

    @property
    def plotted(self) -> tuple[str, float]:
        """The run whose layers are plotted and reported: network-aware at the smallest budget."""
        return NETWORK_AWARE[0], min(self.budgets)

    @classmethod
    def for_mode(cls, fast: bool) -> DemoSettings:
        if fast:
            return cls((SPECTRAL, NKP_CALIBRATED, NETWORK_AWARE), FAST_BUDGETS, calib_samples=64, refine_steps=200,
                       finetune_epochs=1, finetune_max_steps=4)
        return cls((SPECTRAL, NKP_DATA_FREE, NKP_CALIBRATED, NETWORK_AWARE), BUDGETS, calib_samples=512,
                   refine_steps=200, finetune_epochs=20, finetune_max_steps=None)


@dataclass
class DemoRun:
    """One compression: which variant, at which budget, what it kept and how accurate it is."""

    label: str
    method: str
    calibrated: bool
    target_params: float
    params: int
    flops: int
    param_ratio: float
    flop_ratio: float
    accuracy: float
    seconds: float
    ranks: dict[str, int]


@dataclass
class DemoResult:
    """Everything ``lrc demo`` measured; ``to_dict`` is what ``report.json`` holds."""

    out_dir: Path
    fast: bool
    settings: DemoSettings
    original: dict[str, Any]
    runs: list[DemoRun]
    finetune: dict[str, Any]
    onnx: dict[str, Any]
    files: list[str]
    seconds: float = 0.0
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "fast": self.fast,
            "settings": asdict(self.settings),
            "original": self.original,
            "runs": [asdict(r) for r in self.runs],
            "finetune": self.finetune,
            "onnx": self.onnx,
            "files": self.files,
            "seconds": self.seconds,
            "layers": self.layers,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "machine": platform.machine(), "threads": 1},
        }


def percent(fraction: float) -> str:
    """The one format of an accuracy everywhere the demo shows it (terminal, summary.md, tests)."""
    return f"{100.0 * fraction:.2f}%"


def _require_extras() -> None:
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UsageError(
            f"lrc demo needs {' and '.join(missing)} (the digits data and the plots): "
            "pip install 'lowrank-compress[dev]', or run `make demo`"
        )


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, a read-only or full file system
        raise UsageError(f"cannot create --out {out_dir} ({exc.strerror})") from None
    return out_dir


def _compress_variant(
    original: nn.Module,
    method: str,
    calibrated: bool,
    allocation: str,
    target_params: float,
    settings: DemoSettings,
    calibration: list[torch.Tensor],
    curves: bool,
) -> tuple[nn.Module, CompressReport, float]:
    """A compressed copy of ``original`` made as ``lrc compress`` makes it; (model, report, seconds)."""
    # The per-layer row is calibration as it was before network-aware compression: no block
    # reconstruction, no distillation.
    per_layer = allocation == "layer"
    config = CompressConfig(method=method, target_params=target_params, refine_steps=settings.refine_steps,
                            calib_samples=settings.calib_samples, allocation=allocation, seed=settings.seed,
                            block_steps=0 if per_layer else CompressConfig.block_steps,
                            distill_steps=0 if per_layer else None)
    # The same seeding and example input as pipeline.run_compress, so the CLI command in
    # summary.md does the same computation (up to rounding differences from the thread count).
    torch.manual_seed(config.seed)
    example = torch.randn(digits.INPUT_SHAPE, generator=torch.Generator().manual_seed(config.seed))
    start = time.perf_counter()
    model, report = compress(copy.deepcopy(original), config, example,
                             calibration=calibration if calibrated else None, curves=curves)
    return model, report, time.perf_counter() - start


def _finetune(
    student: nn.Module,
    teacher: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    output: Path,
    settings: DemoSettings,
) -> tuple[Any, dict[str, Any]]:
    """Distill ``teacher`` into a copy of ``student`` on a temporary image folder; (result, config)."""
    from ..io.records import DataConfig, LoadedModel
    from ..recipes import TrainConfig
    from ..train import finetune

    # No flips (a mirrored 2 is not a 2) and only mild crops: the digits fill their 8×8 frame.
    config = TrainConfig(
        epochs=settings.finetune_epochs, batch_size=64, lr=FINETUNE_LR, optimizer="adamw", weight_decay=0.0,
        kd_temperature=2.0, kd_weight=0.9, workers=0, seed=settings.seed, log_every=10_000,
        max_steps=settings.finetune_max_steps, min_crop_scale=0.85, hflip=0.0, precision="fp32",
    )
    mean, std = digits.normalization()
    loaded = LoadedModel(
        model=copy.deepcopy(student), arch=digits.ARCH_SPEC, arch_kwargs={}, input_shape=digits.INPUT_SHAPE,
        data_config=DataConfig(digits.INPUT_SHAPE[1:], mean, std, "bilinear", 1.0),
    )
    with tempfile.TemporaryDirectory(prefix="lrc-demo-") as tmp:
        digits.write_image_folder(tmp, x_train, y_train, "train")
        result = finetune(loaded, tmp, output, config, teacher=copy.deepcopy(teacher), device="cpu",
                          show_progress=False)
    return result, asdict(config)


def summary_markdown(result: DemoResult) -> str:
    """``summary.md``: the tables ``lrc demo`` printed, and how to redo one run with the CLI."""
    o, ft, onnx = result.original, result.finetune, result.onnx
    s = result.settings
    lines = [
        "# lrc demo: the bundled digits CNN",
        "",
        (f"Model `{o['arch']}`: {o['params']:,} parameters, {o['flops']:,} FLOPs at input "
         f"{'×'.join(map(str, o['input_shape']))}; test accuracy **{percent(o['accuracy'])}** on "
         f"{o['test_samples']} held-out digits. Calibration: {s.calib_samples} training images, "
         f"{s.refine_steps} refinement steps per layer{' (fast mode)' if result.fast else ''}."),
        "",
        "## Accuracy before fine-tuning",
        "",
        ("Every run keeps at most the given fraction of the model's parameters (`--target-params`). "
         "Data-free and calibrated runs allocate ranks by each layer's own error per parameter; "
         "network-aware runs by each layer's predicted effect on the model's output. No fine-tuning."),
        "",
        "| method | --target-params | params kept | FLOPs kept | test accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.runs:
        lines.append(f"| {r.label} | {r.target_params} | {r.param_ratio:.3f} | {r.flop_ratio:.3f} | "
                     f"{percent(r.accuracy)} | {r.seconds:.1f} |")
    label, budget = s.finetuned
    lines += [
        "",
        "## Fine-tuning",
        "",
        (f"{label} at {budget}: distilled from the original on CPU for {ft['steps']} steps "
         f"(batch {ft['config']['batch_size']}, AdamW lr {ft['config']['lr']}, KD weight "
         f"{ft['config']['kd_weight']}, T = {ft['config']['kd_temperature']}): test accuracy "
         f"{percent(ft['accuracy_before'])} → **{percent(ft['accuracy_after'])}** ({ft['seconds']:.1f} s)."),
        "",
        "## ONNX",
        "",
        (f"`{onnx['file']}`: max abs error {onnx['max_abs_error']:.2e}, max rel error {onnx['max_rel_error']:.2e} "
         f"(tolerance {onnx['rtol']:.0e}) — parity **{'passed' if onnx['passed'] else 'FAILED'}**."),
        "",
        "## Files",
        "",
        f"- `{REPORT_JSON}`: every figure above, per-layer ranks and errors",
        (f"- `{ERROR_PLOT}`: per-layer error vs rank, spectral vs nkp, chosen ranks marked "
         f"({s.plotted[0]} at {s.plotted[1]})"),
        f"- `{ACCURACY_PLOT}`: test accuracy vs parameters for each method",
        f"- `{FINETUNED_MODEL}`, `{FINETUNED_ONNX}`: the fine-tuned model and its ONNX export",
        f"- `{CALIB_FILE}`: the calibration images (float32, normalized)",
        "",
        "## The same compression from the command line",
        "",
        "```bash",
        f"lrc compress {digits.bundled_checkpoint_path()} --target-params {budget} --allocation output \\",
        (f"    --calib {result.out_dir / CALIB_FILE} --calib-samples {s.calib_samples} "
         f"--refine-steps {s.refine_steps} \\"),
        f"    -o digits_network_aware_{budget}.lrc.safetensors --plot digits_network_aware_{budget}.png",
        "```",
        "",
        f"Total time: {result.seconds:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "lrc-demo",
    fast: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> DemoResult:
    """Run the demo (see the module docstring), writing into ``out_dir``; ``log`` gets progress lines.

    Raises LrcError after writing the report when the ONNX parity check fails.
    """
    _require_extras()
    from safetensors.torch import save_file

    from ..io.opening import open_model
    from ..export import export_onnx
    from ..plots import plot_accuracy_vs_params, plot_compression

    out = _prepare_out_dir(Path(out_dir))
    settings = DemoSettings.for_mode(fast)
    start = time.perf_counter()
    with digits.deterministic(threads=1):
        loaded = open_model(digits.bundled_checkpoint_path())
        original = loaded.model.eval()
        _, x_test, y_test = digits.load_bundled()
        seed = int(digits.bundled_metadata().get("seed", "0"))
        x_train, y_train, _, _ = digits.load_digits_split(seed)
        calib = x_train[: settings.calib_samples].contiguous()
        with atomic_output(out / CALIB_FILE) as tmp:
            save_file({"x": calib}, str(tmp))
        calibration = list(calib.split(32))

        params, flops = count_params(original), count_flops(original, torch.zeros(digits.INPUT_SHAPE))
        base_accuracy = digits.accuracy(original, x_test, y_test)
        log(f"original: {params:,} params, test accuracy {percent(base_accuracy)}")
        original_info = {"arch": loaded.arch, "params": params, "flops": flops, "accuracy": base_accuracy,
                         "input_shape": list(digits.INPUT_SHAPE), "test_samples": len(y_test)}

        runs: list[DemoRun] = []
        kept: dict[tuple[str, float], tuple[nn.Module, CompressReport]] = {}
        for budget in settings.budgets:
            for label, method, calibrated, allocation in settings.variants:
                chosen = (label, budget) in (settings.finetuned, settings.plotted)
                model, report, seconds = _compress_variant(original, method, calibrated, allocation, budget,
                                                           settings, calibration, curves=chosen)
                run = DemoRun(
                    label=label, method=method, calibrated=calibrated, target_params=budget,
                    params=report.params_after, flops=report.flops_after,
                    param_ratio=report.params_after / params, flop_ratio=report.flops_after / flops,
                    accuracy=digits.accuracy(model, x_test, y_test), seconds=seconds,
                    ranks={layer.name: layer.rank for layer in report.layers},
                )
                runs.append(run)
                log(f"{label} @ {budget}: params {run.param_ratio:.3f}, test accuracy {percent(run.accuracy)} "
                    f"({seconds:.1f} s)")
                if chosen:
                    kept[(label, budget)] = (model, report)
        student, student_report = kept[settings.finetuned]
        plotted_report = kept[settings.plotted][1]

        label, budget = settings.finetuned
        log(f"fine-tuning {label} @ {budget} by distillation on CPU")
        ft_start = time.perf_counter()
        ft_result, ft_config = _finetune(student, original, x_train, y_train, out / FINETUNED_MODEL, settings)
        finetuned = open_model(out / FINETUNED_MODEL).model.eval()  # what was written, read back
        ft_info = {
            "run": f"{label} @ {budget}", "steps": ft_result.steps, "config": ft_config,
            "accuracy_before": next(r.accuracy for r in runs if (r.label, r.target_params) == settings.finetuned),
            "accuracy_after": digits.accuracy(finetuned, x_test, y_test),
            "seconds": time.perf_counter() - ft_start, "file": FINETUNED_MODEL,
        }
        log(f"fine-tuned: test accuracy {percent(ft_info['accuracy_after'])} after {ft_result.steps} steps")

        log("exporting to ONNX and checking parity")
        parity = export_onnx(finetuned, out / FINETUNED_ONNX, input_shape=digits.INPUT_SHAPE,
                             calib_inputs=x_test[:64])
        onnx_info = {"file": FINETUNED_ONNX, "max_abs_error": parity.max_abs_error,
                     "max_rel_error": parity.max_rel_error, "rtol": parity.rtol, "passed": parity.passed,
                     "exporter": parity.exporter, "opset": parity.opset}

        plot_compression(plotted_report, out / ERROR_PLOT)
        rows = [{"method": r.label, "params": r.params, "accuracy": r.accuracy} for r in runs]
        rows.append({"method": f"{label} + fine-tune", "params": student_report.params_after,
                     "accuracy": ft_info["accuracy_after"]})
        plot_accuracy_vs_params(rows, out / ACCURACY_PLOT,
                                reference={"method": "original", "params": params, "accuracy": base_accuracy},
                                title="digits CNN: test accuracy vs parameters, "
                                      f"--target-params {', '.join(map(str, settings.budgets))}")

    result = DemoResult(
        out_dir=out, fast=fast, settings=settings, original=original_info, runs=runs, finetune=ft_info,
        onnx=onnx_info,
        files=[REPORT_JSON, SUMMARY_MD, ERROR_PLOT, ACCURACY_PLOT, CALIB_FILE, FINETUNED_MODEL, FINETUNED_ONNX],
        layers=[asdict(layer) for layer in plotted_report.layers],
    )
    result.seconds = time.perf_counter() - start
    write_json(result.to_dict(), out / REPORT_JSON, sort_keys=True)
    with atomic_output(out / SUMMARY_MD) as tmp:
        tmp.write_text(summary_markdown(result))
    if not parity.passed:
        raise LrcError(f"ONNX parity failed: max relative error {parity.max_rel_error:.2e} > {parity.rtol:.0e} "
                       f"(see {out / REPORT_JSON})")
    return result
