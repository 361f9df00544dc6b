"""Untrusted files, every CLI error, full disks and interrupts.

Each command is driven as a user drives it. A failure must exit 2 (bad arguments or input files)
or 1 (a runtime failure) with exactly one line on stderr, run no code from a file, and leave
nothing behind: no target file and no ``.*.tmp`` file in any directory the command wrote to.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowrank_compress.examples import digits
from lowrank_compress.compress import CompressConfig
from lowrank_compress.graph import find_sites
from lowrank_compress.pipeline import CompressJob, run_compress
from lowrank_compress.io.format import MANIFEST_KEY, load
from lowrank_compress.training.state import load_checkpoint

ASSET = digits.bundled_checkpoint_path()
ARCH = ["--arch", digits.ARCH_SPEC]


def tree(*roots: Path) -> list[str]:
    """Every file and folder under ``roots`` (what a failed command must leave unchanged)."""
    return sorted(str(p) for root in roots for p in root.rglob("*"))


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("error: ") and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in line, (fragment, line)


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A read-only-by-convention workspace: the digits model as a safetensors file with its arch in
    the metadata, as a bare state dict (.pt, needs --arch), compressed (.lrc.safetensors), and a few
    digits as an image folder (train/ and val/)."""
    root = tmp_path_factory.mktemp("ws")
    shutil.copy(ASSET, root / "digits.safetensors")
    torch.save(load_file(str(ASSET)), root / "digits.pt")
    config = CompressConfig(rank=8, method="spectral")
    run_compress(CompressJob(checkpoint=ASSET, config=config, output=root / "digits.lrc.safetensors"))
    test = load_file(str(digits.bundled_test_split_path()))
    digits.write_image_folder(root / "data", test["x_test"][:40], test["y_test"][:40], "train")
    digits.write_image_folder(root / "data", test["x_test"][40:60], test["y_test"][40:60], "val")
    return root


# One argv per command, for a model file and an output folder: what each failure case is run through.
COMMANDS: dict[str, Callable[[Path, Path, Path], list]] = {
    "inspect": lambda model, out, ws: ["inspect", model, "--json", out / "layers.json"],
    "compress": lambda model, out, ws: ["compress", model, "--rank", "4", "-q", "-o", out / "c.lrc.safetensors"],
    "export": lambda model, out, ws: ["export", model, "--onnx", out / "m.onnx"],
    "eval": lambda model, out, ws: ["eval", model, "--data", ws / "data", "--workers", "0", "--device", "cpu",
                                    "--json", out / "eval.json"],
    "bench": lambda model, out, ws: ["bench", model, "--device", "cpu", "--repeats", "1", "--warmup", "0",
                                     "--json", out / "bench.json"],
    "finetune": lambda model, out, ws: ["finetune", model, "--no-teacher", "--data", ws / "data", "--epochs", "1",
                                        "--workers", "0", "--device", "cpu", "--quiet",
                                        "-o", out / "ft.lrc.safetensors"],
}


# ---------------------------------------------------------------- 1. untrusted files


class Payload:
    """Unpickling this creates ``marker`` (any code could run in its place)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plain_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": Payload(marker)}, f)


def _torch_zip(path: Path, marker: Path) -> None:
    # A genuine torch.save archive: real tensors, and one object with a malicious __reduce__.
    torch.save({"state_dict": load_file(str(ASSET)), "extra": Payload(marker)}, path)


CRAFTED = {"plain-pickle": _plain_pickle, "torch-zip": _torch_zip}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(ws, tmp_path, run_cli, kind, command):
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    CRAFTED[kind](evil, marker)
    before = tree(tmp_path)
    result = run_cli(*COMMANDS[command](evil, tmp_path, ws), *ARCH)
    assert_one_line_error(result, 2, str(evil))
    assert "refused" in result.err or "cannot read" in result.err
    assert not marker.exists()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_crafted_calibration_or_teacher_file_is_refused_and_its_code_never_runs(ws, tmp_path, run_cli, kind):
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    CRAFTED[kind](evil, marker)
    before = tree(tmp_path)
    calib = run_cli("compress", ws / "digits.safetensors", "--rank", "4", "--calib", evil,
                    "-o", tmp_path / "c.lrc.safetensors")
    student = ws / "digits.lrc.safetensors"
    finetune = [a for a in COMMANDS["finetune"](student, tmp_path, ws) if a != "--no-teacher"]
    teacher = run_cli(*finetune, "--teacher", evil, *ARCH)
    for result in (calib, teacher):
        assert_one_line_error(result, 2, str(evil))
    assert not marker.exists()
    assert tree(tmp_path) == before


def test_the_payload_is_live_so_the_refusals_mean_something(tmp_path, run_cli):
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    _torch_zip(evil, marker)
    run_cli("inspect", evil, "--trust-pickle", *ARCH)  # trusting the file runs its code
    assert marker.exists()


def test_a_calibration_npy_holding_pickled_objects_is_refused(ws, tmp_path, run_cli):
    marker = tmp_path / "PWNED"
    array = np.empty(2, dtype=object)
    array[:] = [Payload(marker), Payload(marker)]
    np.save(tmp_path / "calib.npy", array, allow_pickle=True)
    before = tree(tmp_path)
    result = run_cli("compress", ws / "digits.safetensors", "--rank", "4", "--calib", tmp_path / "calib.npy",
                     "-o", tmp_path / "c.lrc.safetensors")
    assert_one_line_error(result, 2, "cannot read calibration file")
    assert not marker.exists()
    assert tree(tmp_path) == before


def test_a_refused_pickle_prints_one_line_and_no_torch_warning_from_the_console_script(tmp_path):
    # In-process runs do not show warnings the way a terminal does: torch warns about the pickle
    # protocol of a file it then refuses, which used to put a second and third line on stderr.
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    _plain_pickle(evil, marker)
    done = subprocess.run([sys.executable, "-m", "lowrank_compress", "inspect", str(evil), *ARCH], check=False,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not marker.exists()


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _biggest(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: (len(header[k]["shape"]), k))


def _edit(data: bytes, change: Callable[[dict, str], None]) -> bytes:
    header, body = _header(data)
    change(header, _biggest(header))
    return _with_header(header, body)


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated-data": lambda d: d[: len(d) - 1000],
    "truncated-header": lambda d: d[: 8 + struct.unpack("<Q", d[:8])[0] // 2],
    "header-length-beyond-the-file": lambda d: struct.pack("<Q", len(d)) + d[8:],
    "header-length-2^63": lambda d: struct.pack("<Q", 2**63) + d[8:],
    "header-not-json": lambda d: struct.pack("<Q", 16) + b"{this is not js}" + _header(d)[1],
    "offsets-beyond-the-data": lambda d: _edit(d, lambda h, k: h[k].update(data_offsets=[0, 4 * len(d)])),
    "offsets-misaligned": lambda d: _edit(
        d, lambda h, k: h[k].update(data_offsets=[o + 4 for o in h[k]["data_offsets"]])
    ),
    "shape-lies": lambda d: _edit(d, lambda h, k: h[k].update(shape=[2 * s for s in h[k]["shape"]])),
    "dtype-lies": lambda d: _edit(d, lambda h, k: h[k].update(dtype="F64")),
    "random-bytes": lambda d: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
}


@pytest.mark.parametrize("command", ["compress", "inspect", "export", "eval", "bench"])
@pytest.mark.parametrize("source", ["digits.safetensors", "digits.lrc.safetensors"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_or_lying_safetensors_file_is_a_one_line_usage_error(
    ws, tmp_path, run_cli, corruption, source, command
):
    bad = tmp_path / source
    bad.write_bytes(CORRUPTIONS[corruption]((ws / source).read_bytes()))
    before = tree(tmp_path)
    result = run_cli(*COMMANDS[command](bad, tmp_path, ws))
    assert_one_line_error(result, 2, str(bad), "is not a valid safetensors file")
    assert tree(tmp_path) == before


def test_a_checkpoint_with_nan_weights_is_refused_by_compress(ws, tmp_path, run_cli):
    tensors = load_file(str(ws / "digits.safetensors"))
    tensors["fc.weight"][3, 5] = float("nan")
    with safe_open(str(ws / "digits.safetensors"), "pt") as f:
        save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=f.metadata())
    before = tree(tmp_path)
    result = run_cli("compress", tmp_path / "nan.safetensors", "--rank", "4", "-o", tmp_path / "c.lrc.safetensors")
    assert_one_line_error(result, 2, "NaN or Inf")
    assert tree(tmp_path) == before


def test_a_manifest_rank_beyond_the_layer_is_refused_before_anything_is_allocated(ws, tmp_path, run_cli):
    # A crafted rank of 10¹² would ask for terabytes (or an OOM kill) while building empty factors.
    tensors = load_file(str(ws / "digits.lrc.safetensors"))
    with safe_open(str(ws / "digits.lrc.safetensors"), "pt") as f:
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    manifest["layers"]["fc"]["rank"] = 10**12
    save_file(tensors, str(tmp_path / "big.lrc.safetensors"), metadata={MANIFEST_KEY: json.dumps(manifest)})
    result = run_cli("export", tmp_path / "big.lrc.safetensors", "--onnx", tmp_path / "m.onnx")
    assert_one_line_error(result, 2, "the manifest entry for 'fc' has a bad rank 1000000000000")
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- 2. every CLI error


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("case", "fragment"),
    [("missing", "no such file"), ("directory", "is a directory")],
)
def test_a_missing_file_or_a_directory_as_the_model_is_a_usage_error(ws, tmp_path, run_cli, command, case, fragment):
    model = tmp_path / "nope.safetensors" if case == "missing" else tmp_path / "folder.safetensors"
    if case == "directory":
        model.mkdir()
    before = tree(tmp_path)
    assert_one_line_error(run_cli(*COMMANDS[command](model, tmp_path, ws), *ARCH), 2, fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["inspect", "compress", "export", "eval", "bench"])
@pytest.mark.parametrize(
    ("arch", "fragment"),
    [
        (None, "pass --arch"),
        ("torchvision:resnet18", "does not match the architecture"),
        ("torchvision:no_such_net", "unknown torchvision model 'no_such_net'"),
        ("timm:no_such_net", "unknown timm model 'no_such_net'"),
        ("no_such_package_q:Net", "cannot import no_such_package_q"),
        ("DigitsCNN", "bad --arch 'DigitsCNN'"),
    ],
    ids=["none", "wrong", "unknown-torchvision", "unknown-timm", "no-module", "no-colon"],
)
def test_a_wrong_arch_is_a_usage_error(ws, tmp_path, run_cli, command, arch, fragment):
    before = tree(tmp_path)
    args = COMMANDS[command](ws / "digits.pt", tmp_path, ws) + ([] if arch is None else ["--arch", arch])
    assert_one_line_error(run_cli(*args), 2, fragment)
    assert tree(tmp_path) == before


RANK_ERRORS = {
    "include-regex": (["--rank", "4", "--include", "("], "bad --include regex '('"),
    "exclude-regex": (["--rank", "4", "--exclude", "[a-"], "bad --exclude regex '[a-'"),
    "rank-zero": (["--rank", "0"], "--rank must be a positive integer, got 0"),
    "rank-negative": (["--rank", "-3"], "--rank must be a positive integer, got -3"),
    "rank-not-a-number": (["--rank", "4.5"], "Invalid value for '--rank'"),
    "unknown-method": (["--rank", "4", "--method", "svd"], "unknown method 'svd'"),
    "latency-batch-zero": (["--target-flops", "0.5", "--latency-batch-size", "1,0"],
                           "--latency-batch-size must be positive integers such as 1 or 1,16, got '1,0'"),
    **{
        f"{flag}={value}": ([f"--{flag}", value], f"--{flag} must be in (0, 1]")
        for flag, value in [
            ("rank-ratio", "0"), ("rank-ratio", "1.5"), ("rank-ratio", "-0.25"), ("rank-ratio", "nan"),
            ("param-ratio", "0"), ("param-ratio", "inf"), ("target-params", "1.01"), ("target-flops", "-1"),
        ]
    },
}


@pytest.mark.parametrize("case", list(RANK_ERRORS))
def test_bad_rank_policies_regexes_and_methods_are_usage_errors(ws, tmp_path, run_cli, case):
    args, fragment = RANK_ERRORS[case]
    before = tree(tmp_path)
    result = run_cli("compress", ws / "digits.safetensors", *args, "-o", tmp_path / "c.lrc.safetensors")
    assert_one_line_error(result, 2, fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--rank-ratio", "2"], "--rank-ratio must be in (0, 1]"),
        (["--rank", "4", "--method", "svd"], "unknown method 'svd'"),
    ],
    ids=["rank-zero", "ratio-above-one", "unknown-method"],
)
def test_finetune_from_scratch_checks_its_rank_policy_and_method(ws, tmp_path, run_cli, args, fragment):
    before = tree(tmp_path)
    result = run_cli("finetune", "--from-scratch", *ARCH, "--input-shape", "1,1,32,32", *args, "--data", ws / "data",
                     "--no-teacher", "--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet",
                     "-o", tmp_path / "ft.lrc.safetensors")
    assert_one_line_error(result, 2, fragment)
    assert tree(tmp_path) == before


def test_a_rank_beyond_every_layer_is_capped_at_each_layers_max_useful_rank(ws, tmp_path, run_cli):
    result = run_cli("compress", ws / "digits.safetensors", "--rank", "100000", "--method", "spectral", "-q",
                     "-o", tmp_path / "c.lrc.safetensors", "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    sites = {s.name: s for s in find_sites(digits.DigitsCNN().eval(), torch.zeros(digits.INPUT_SHAPE))}
    assert report["layers"], report["skipped"]
    for layer in report["layers"]:
        assert layer["rank"] == sites[layer["name"]].max_useful_rank
        assert layer["note"] == f"rank 100000 capped at the max useful rank {layer['rank']}"
        assert layer["params_after"] < layer["params_before"]
    loaded = load(tmp_path / "c.lrc.safetensors")
    assert torch.isfinite(loaded(torch.randn(2, 1, 32, 32))).all()


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [("1,5,32,32", "has 5 channels; images give 1 or 3"),
     ("1,3,32,32", "the model does not run on images of shape (20, 3, 32, 32)")],
    ids=["five-channels", "rgb-into-a-grayscale-model"],
)
def test_an_input_shape_the_images_or_the_model_cannot_take_is_a_usage_error(ws, tmp_path, run_cli, shape, fragment):
    before = tree(tmp_path)
    result = run_cli(*COMMANDS["eval"](ws / "digits.lrc.safetensors", tmp_path, ws), "--input-shape", shape)
    assert_one_line_error(result, 2, fragment)
    assert tree(tmp_path) == before


def _calibration_case(ws: Path, tmp: Path, case: str) -> tuple[Path | str, str]:
    """Write one bad calibration input; returns (--calib value, message fragment)."""
    if case == "missing":
        return tmp / "nowhere", "does not exist"
    if case == "empty-folder":
        (tmp / "calib").mkdir()
        return tmp / "calib", "no images under"
    if case == "folder-without-images":
        (tmp / "calib").mkdir()
        (tmp / "calib" / "notes.txt").write_text("not an image")
        return tmp / "calib", "no images under"
    if case == "unreadable-image":
        (tmp / "calib" / "0").mkdir(parents=True)
        (tmp / "calib" / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return tmp / "calib", "broken.png"
    if case == "wrong-shape-npy":
        np.save(tmp / "calib.npy", np.zeros((8, 3, 32, 32), dtype=np.float32))
        return tmp / "calib.npy", "has samples of shape (3, 32, 32); the model takes (1, 32, 32)"
    if case == "wrong-shape-pt":
        torch.save({"x": torch.zeros(8, 32)}, tmp / "calib.pt")
        return tmp / "calib.pt", "has samples of shape (32,)"
    if case == "unnamed-tensors":
        save_file({"a": torch.zeros(8, 1, 32, 32), "b": torch.zeros(8, 1, 32, 32)}, str(tmp / "calib.safetensors"))
        return tmp / "calib.safetensors", "name the inputs 'x'"
    if case == "no-samples":
        np.save(tmp / "calib.npy", np.zeros((0, 1, 32, 32), dtype=np.float32))
        return tmp / "calib.npy", "is empty"
    if case == "nan-samples":
        x = np.zeros((4, 1, 32, 32), dtype=np.float32)
        x[2, 0, 3, 3] = np.nan
        np.save(tmp / "calib.npy", x)
        return tmp / "calib.npy", "contains NaN or Inf"
    if case == "unknown-suffix":
        (tmp / "calib.xyz").write_text("1 2 3")
        return tmp / "calib.xyz", "expected a folder"
    if case == "text-for-an-image-model":  # text calibration needs a tokenizer: a Hugging Face folder
        (tmp / "calib.txt").write_text("one sample\nanother sample\n")
        return tmp / "calib.txt", "needs a Hugging Face folder"
    raise AssertionError(case)


CALIBRATION_CASES = ["missing", "empty-folder", "folder-without-images", "unreadable-image", "wrong-shape-npy",
                     "wrong-shape-pt", "unnamed-tensors", "no-samples", "nan-samples", "unknown-suffix",
                     "text-for-an-image-model"]


@pytest.mark.parametrize("command", ["compress", "export"])
@pytest.mark.parametrize("case", CALIBRATION_CASES)
def test_bad_calibration_inputs_are_usage_errors(ws, tmp_path, run_cli, case, command):
    calib, fragment = _calibration_case(ws, tmp_path, case)
    before = tree(tmp_path)
    args = COMMANDS[command](ws / "digits.safetensors", tmp_path, ws)
    assert_one_line_error(run_cli(*args, "--calib", calib), 2, fragment)
    assert tree(tmp_path) == before


def _unwritable(tmp: Path, case: str, name: str) -> tuple[Path, str]:
    """An output path that cannot be written, and the message fragment."""
    if case == "missing-folder":
        return tmp / "no" / "such" / name, "does not exist"
    if case == "folder-is-a-file":
        (tmp / "file").write_text("x")
        return tmp / "file" / name, "is not a directory"
    if case == "target-is-a-folder":
        (tmp / name).mkdir()
        return tmp / name, "is a directory"
    if case == "target-is-a-fifo":
        # Like /dev/null or /dev/full: renaming a temporary file over it would replace it.
        os.mkfifo(tmp / name)
        return tmp / name, "is not a regular file"
    raise AssertionError(case)


# (command argv without the output, the output option, the output file name)
OUTPUTS = {
    "compress -o": (lambda ws: ["compress", ws / "digits.safetensors", "--rank", "4", "-q"], "-o", "c.lrc.safetensors"),
    "compress --json": (lambda ws: ["compress", ws / "digits.safetensors", "--rank", "4", "-q"], "--json", "r.json"),
    "compress --onnx": (lambda ws: ["compress", ws / "digits.safetensors", "--rank", "4", "-q"], "--onnx", "c.onnx"),
    "compress --plot": (lambda ws: ["compress", ws / "digits.safetensors", "--rank", "4", "-q"], "--plot", "c.png"),
    "inspect --json": (lambda ws: ["inspect", ws / "digits.safetensors"], "--json", "layers.json"),
    "export --onnx": (lambda ws: ["export", ws / "digits.lrc.safetensors"], "--onnx", "m.onnx"),
    "export --json": (lambda ws: ["export", ws / "digits.lrc.safetensors", "--onnx", "IGNORED"], "--json", "p.json"),
    "eval --json": (lambda ws: COMMANDS["eval"](ws / "digits.lrc.safetensors", Path("."), ws)[:-2], "--json", "e.json"),
    "bench --json": (lambda ws: COMMANDS["bench"](ws / "digits.lrc.safetensors", Path("."), ws)[:-2],
                     "--json", "b.json"),
    "finetune -o": (lambda ws: COMMANDS["finetune"](ws / "digits.lrc.safetensors", Path("."), ws)[:-2],
                    "-o", "f.safetensors"),
}


@pytest.mark.parametrize("case", ["missing-folder", "folder-is-a-file", "target-is-a-folder", "target-is-a-fifo"])
@pytest.mark.parametrize("output", list(OUTPUTS))
def test_an_unwritable_output_fails_before_any_work_and_writes_nothing(ws, tmp_path, run_cli, output, case):
    make_args, option, name = OUTPUTS[output]
    path, fragment = _unwritable(tmp_path, case, name)
    args = [tmp_path / "m.onnx" if a == "IGNORED" else a for a in make_args(ws)]
    if "-o" not in args and args[0] in ("compress", "finetune") and option != "-o":
        args += ["-o", tmp_path / "out.lrc.safetensors"]
    before = tree(tmp_path)
    assert_one_line_error(run_cli(*args, option, path), 2, fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["under-a-file", "a-file"])
def test_demo_refuses_an_out_folder_it_cannot_create(tmp_path, run_cli, case):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" if case == "under-a-file" else tmp_path / "file"
    before = tree(tmp_path)
    result = run_cli("demo", "--fast", "--out", out)
    assert_one_line_error(result, 2, str(out))
    assert tree(tmp_path) == before


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 64 KiB tmpfs filled to the last byte (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=64", "tmpfs", str(mount)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 512):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("compress -o", "cannot write"),
        ("compress --json", "cannot write"),
        ("inspect --json", "cannot write"),
        ("export --onnx", "No space left on device"),
        ("eval --json", "cannot write"),
    ],
)
def test_a_full_disk_is_a_one_line_runtime_error_and_leaves_no_partial_file(
    ws, tmp_path, full_disk, run_cli, output, fragment
):
    make_args, option, name = OUTPUTS[output]
    args = make_args(ws)
    if args[0] == "compress" and option != "-o":
        args += ["-o", tmp_path / "c.lrc.safetensors"]  # the model itself goes to a disk with room
    before = tree(full_disk)
    result = run_cli(*args, option, full_disk / name)
    assert_one_line_error(result, 1, fragment)
    assert "No space left on device" in result.err
    assert tree(full_disk) == before  # neither the target nor a .tmp file


# ---------------------------------------------------------------- 5. interrupts


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# `python -m lowrank_compress ARGS`, with Python's own Ctrl-C handler even when this test runs under a
# parent that ignores SIGINT (a background job), which children would otherwise inherit.
_WITH_DEFAULT_SIGINT = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('lowrank_compress', run_name='__main__', alter_sys=True)"
)


def _interrupt(args: list, ready: Callable[[subprocess.Popen], bool], sig: int = signal.SIGINT) -> tuple[int, str]:
    """Run ``lrc ARGS`` in a child process, send ``sig`` once ``ready(process)``; (exit code, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _WITH_DEFAULT_SIGINT, *map(str, args)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while process.poll() is None and not ready(process) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"finished before the signal: {process.stderr.read()[-2000:]}"
    process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, stderr


def _busy_for(seconds: float) -> Callable[[subprocess.Popen], bool]:
    # CPU time, not wall time: past the imports and the load however loaded the machine is.
    return lambda process: _cpu_seconds(process.pid) >= seconds


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a child's CPU time from /proc")
@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_during_compress_exits_cleanly_without_a_partial_file(tmp_path, sig, code, word):
    output = tmp_path / "c.lrc.safetensors"
    returncode, stderr = _interrupt(
        ["compress", ASSET, "--rank", "4", "--calib", "gaussian", "--calib-samples", "512", "--refine-steps", "5000",
         "-q", "-o", output, "--json", tmp_path / "r.json"],
        _busy_for(4.0), sig,
    )
    assert returncode == code, stderr
    assert _lines(stderr) == [f"error: {word}; no partial output was written"]
    assert list(tmp_path.iterdir()) == []


def test_sigint_during_export_exits_cleanly_without_a_partial_file(ws, tmp_path):
    # The dynamo exporter takes seconds and wraps a KeyboardInterrupt in an error of its own. The
    # signal goes as soon as the temporary output exists: the export into it has begun.
    returncode, stderr = _interrupt(["export", ws / "digits.lrc.safetensors", "--onnx", tmp_path / "m.onnx",
                                     "--exporter", "dynamo"], lambda process: any(tmp_path.glob(".m.onnx.*.tmp")))
    assert returncode == 130, stderr
    assert _lines(stderr) == ["error: interrupted; no partial output was written"]
    assert list(tmp_path.iterdir()) == []


def test_sigint_during_finetune_exits_cleanly_and_keeps_the_last_checkpoint(ws, tmp_path):
    checkpoint = tmp_path / "ckpt" / "last.pt"
    output = tmp_path / "ft.lrc.safetensors"
    returncode, stderr = _interrupt(
        ["finetune", ws / "digits.lrc.safetensors", "--no-teacher", "--data", ws / "data", "--epochs", "200",
         "--batch-size", "8", "--workers", "0", "--device", "cpu", "--checkpoint-dir", tmp_path / "ckpt",
         "--checkpoint-every", "2", "--quiet", "-o", output],
        lambda process: checkpoint.exists(),
    )
    assert returncode == 130, stderr
    assert _lines(stderr) == ["error: interrupted; no partial output was written"]
    assert not output.exists()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]  # no half-written checkpoint
    assert load_checkpoint(checkpoint)["global_step"] >= 2  # what --resume continues from


def test_an_interrupt_while_the_model_file_is_being_written_leaves_nothing(ws, tmp_path, run_cli, monkeypatch):
    import safetensors.torch

    def half_then_interrupt(model, filename, metadata=None, force_contiguous=False):
        Path(filename).write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_interrupt)
    result = run_cli("compress", ws / "digits.safetensors", "--rank", "4", "-q", "-o", tmp_path / "c.lrc.safetensors")
    assert_one_line_error(result, 130, "interrupted; no partial output was written")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_while_the_onnx_file_is_being_checked_leaves_nothing(ws, tmp_path, run_cli, monkeypatch):
    import onnx.checker

    def interrupt(path, *args, **kwargs):
        assert Path(path).stat().st_size > 0  # the graph was written to the temporary file
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.checker, "check_model", interrupt)
    result = run_cli("export", ws / "digits.lrc.safetensors", "--onnx", tmp_path / "m.onnx")
    assert_one_line_error(result, 130, "interrupted; no partial output was written")
    assert list(tmp_path.iterdir()) == []
