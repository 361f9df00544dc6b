"""The same command twice gives byte-identical files.

Each command runs twice, each time in a fresh process as a user runs it, with a different
PYTHONHASHSEED (so set or dict order that depends on string hashing would show), on one thread
(README, Determinism: multi-threaded CPU kernels may change the last bits), into a different folder
(so a path that leaked into a file would show).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_compress.examples import digits

ASSET = digits.bundled_checkpoint_path()


def lrc(*args, hash_seed: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-m", "lowrank_compress", *map(str, args)], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two folders, each written by: compress (data-free), compress (calibrated), export, in new processes."""
    folders = []
    for hash_seed in ("0", "4242"):
        out = tmp_path_factory.mktemp(f"run-{hash_seed}")
        lrc("compress", ASSET, "--rank", "8", "-q", "-o", out / "free.lrc.safetensors", "--json", out / "free.json",
            hash_seed=hash_seed)
        lrc("compress", ASSET, "--rank", "8", "--calib", "gaussian", "--calib-samples", "64", "--refine-steps", "30",
            "-q", "-o", out / "calibrated.lrc.safetensors", "--json", out / "calibrated.json", hash_seed=hash_seed)
        lrc("export", out / "calibrated.lrc.safetensors", "--onnx", out / "model.onnx", "--json", out / "parity.json",
            hash_seed=hash_seed)
        folders.append(out)
    return folders


@pytest.mark.parametrize("name", ["free.lrc.safetensors", "calibrated.lrc.safetensors", "model.onnx"])
def test_the_same_command_twice_writes_byte_identical_files(runs, name):
    first, second = (run / name for run in runs)
    assert first.stat().st_size > 0
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("name", ["free.json", "calibrated.json"])
def test_the_same_compress_twice_writes_identical_reports(runs, name):
    first, second = (run / name for run in runs)
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text())["layers"]  # something was compressed


def test_the_same_export_twice_reports_the_same_parity(runs):
    first, second = (json.loads((run / "parity.json").read_text()) for run in runs)
    assert first.pop("path") != second.pop("path")  # the one field that names the output
    assert first == second and first["passed"]
