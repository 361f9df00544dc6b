"""`lrc demo --fast` end to end: it runs, writes its report folder, and the files hold what it printed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lowrank_compress.examples import demo, digits
from lowrank_compress.io.format import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo") / "lrc-demo"  # does not exist yet: the demo creates it
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_compress", "demo", "--fast", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=900,
    )
    return proc, out


def _report(out: Path) -> dict:
    return json.loads((out / demo.REPORT_JSON).read_text())


def _printed_rows(stdout: str) -> set[tuple[str, str, str]]:
    """(method, --target-params, test accuracy) of each row of the printed table."""
    rows = set()
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 5 and cells[4].endswith("%") and cells[1] != "–":
            rows.add((cells[0], cells[1], cells[4]))
    return rows


def test_fast_demo_exits_zero_and_says_where_the_report_is(fast_demo) -> None:
    proc, out = fast_demo
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: {out / demo.SUMMARY_MD}" in proc.stdout


def test_fast_demo_writes_every_report_file(fast_demo) -> None:
    _, out = fast_demo
    report = _report(out)
    assert set(report["files"]) == {p.name for p in out.iterdir()}
    for name in report["files"]:
        assert (out / name).stat().st_size > 0, name


def test_printed_accuracies_are_the_ones_in_report_json_and_summary(fast_demo) -> None:
    proc, out = fast_demo
    report = _report(out)
    expected = {(r["label"], str(r["target_params"]), demo.percent(r["accuracy"])) for r in report["runs"]}
    assert _printed_rows(proc.stdout) == expected
    assert {(r["label"], r["target_params"]) for r in report["runs"]} == {
        (label, budget) for budget in demo.FAST_BUDGETS
        for label in ("spectral", "nkp (calibrated)", "nkp (network-aware)")
    }
    summary = (out / demo.SUMMARY_MD).read_text()
    for label, budget, accuracy in expected:
        assert re.search(rf"\| {re.escape(label)} \| {budget} \|.*\| {re.escape(accuracy)} \|", summary), label
    assert demo.percent(report["original"]["accuracy"]) in proc.stdout


def test_printed_fine_tuning_and_onnx_figures_are_in_the_report(fast_demo) -> None:
    proc, out = fast_demo
    report = _report(out)
    ft, onnx = report["finetune"], report["onnx"]
    line = f"{demo.percent(ft['accuracy_before'])} → {demo.percent(ft['accuracy_after'])}"
    assert line in proc.stdout
    assert line.replace(" → ", " → **") in (out / demo.SUMMARY_MD).read_text()
    assert f"max abs error {onnx['max_abs_error']:.2e}, parity passed" in proc.stdout
    assert onnx["passed"] and ft["steps"] == 4


@pytest.mark.parametrize("better, worse", [
    ("nkp (calibrated)", "spectral"),  # calibrated nkp beats spectral at a tenth of the params
    ("nkp (network-aware)", "nkp (calibrated)"),  # network-aware beats the per-layer allocation there
])
def test_at_a_tenth_of_the_params_the_better_method_wins_by_ten_points(fast_demo, better: str, worse: str) -> None:
    _, out = fast_demo
    runs = {(r["label"], r["target_params"]): r for r in _report(out)["runs"]}
    good, bad = runs[(better, 0.1)], runs[(worse, 0.1)]
    assert good["param_ratio"] <= 0.1 and bad["param_ratio"] <= 0.1
    assert good["accuracy"] >= bad["accuracy"] + 0.10


def test_written_fine_tuned_model_reproduces_its_reported_accuracy(fast_demo) -> None:
    _, out = fast_demo
    _, x_test, y_test = digits.load_bundled()
    model = load(out / demo.FINETUNED_MODEL)
    assert digits.accuracy(model, x_test, y_test) == pytest.approx(_report(out)["finetune"]["accuracy_after"])


def test_demo_plots_are_real_pngs(fast_demo) -> None:
    _, out = fast_demo
    for name in (demo.ERROR_PLOT, demo.ACCURACY_PLOT):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            image.verify()


def test_demo_into_a_file_path_is_a_usage_error(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_compress", "demo", "--fast", "--out", str(target)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "not a directory" in proc.stderr
