"""Property-based fuzzing of the whole CLI.

Random commands, random options with random (mostly wrong) values, and random or damaged input files:
``lrc`` must never print a traceback, never hang, exit with 0, 1, 2 or 3, say what went wrong in exactly
one line, and never leave a temporary file behind; a usage error (2) writes nothing at all.

The runs are in-process (an interpreter start per example would cost seconds) with a wall-clock
deadline per example enforced by SIGALRM, and a fixed number of derandomized examples so that the
test is reproducible and stays well under a minute.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from models import MLP
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from lowrank_compress.compress import CompressConfig
from lowrank_compress.export import export_onnx
from lowrank_compress.pipeline import CompressJob, run_compress

DEADLINE_S = 20  # per example; the slowest legitimate example (a calibrated compress) takes ~2 s
EXAMPLES = 300
SUFFIXES = [".safetensors", ".lrc.safetensors", ".pt", ".pth", ".bin", ".npy", ".onnx", ""]


# capfd, not capsys: the CLI's output as a terminal sees it, what C++ code and logging handlers write
# included, with the CLI's own descriptor-level silencing of exporter output working as for a user.
pytestmark = pytest.mark.fd_capture


class Hang(BaseException):
    """Raised by SIGALRM when one example runs past its deadline (BaseException: nothing catches it)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Valid small inputs the fuzzer damages or passes as they are: an MLP (48 → 96 → 10) as a
    safetensors file naming its arch, as a .pt state dict, compressed, exported to ONNX; a calibration
    tensor; an empty folder; a tiny image folder."""
    root = tmp_path_factory.mktemp("fuzz-base")
    torch.manual_seed(0)
    model = MLP().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "mlp.safetensors"), metadata={"arch": "models:MLP", "input_shape": "[1, 48]"})
    torch.save(state, root / "mlp.pt")
    result = run_compress(CompressJob(checkpoint=root / "mlp.safetensors", config=CompressConfig(rank=4),
                                      output=root / "mlp.lrc.safetensors"))
    export_onnx(result.model, root / "mlp.onnx", input_shape=(1, 48))
    np.save(root / "calib.npy", np.random.default_rng(0).standard_normal((16, 48)).astype(np.float32))
    (root / "empty").mkdir()
    for split in ("train", "val"):  # 2 classes × 2 RGB images of 8×8 (which an MLP on 48 features cannot take)
        for label in ("0", "1"):
            (root / "images" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 60 * i + 100 * int(label), np.uint8)).save(
                    root / "images" / split / label / f"{i}.png")
    return {p.name: p for p in root.iterdir()}


def _damage(data: bytes, how: str, position: int, value: int, noise: bytes) -> bytes:
    if not data:
        return noise
    at = position % len(data)
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ (value % 255 + 1)]) + data[at + 1:]
    if how == "splice":
        return data[:at] + noise + data[at + len(noise):]
    if how == "header-length":
        return struct.pack("<Q", value) + data[8:]
    return noise


damaged_base_files = st.tuples(
    st.sampled_from(["mlp.safetensors", "mlp.lrc.safetensors", "mlp.pt", "mlp.onnx", "calib.npy"]),
    st.sampled_from(["intact", "intact", "truncate", "flip", "splice", "header-length"]),
    st.integers(0, 2**20), st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=64),
)
# Two parts damaged (or intact) real files to one part random bytes.
file_contents = st.one_of(damaged_base_files, damaged_base_files, st.tuples(st.just("raw"), st.binary(max_size=512)))

floats = st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda f: repr(float(f)))
small_ints = st.integers(-3, 64).map(str)
weird = st.sampled_from(["", "abc", "-", "1e3", "0x10", " ", "[", "{}", "nan"])

# Values stay small where a legitimate value costs time or memory (shapes, ranks, sample counts) and
# never name a callable that is not a model (an --arch like os:system would run with --arch-kwargs).
OPTIONS = {
    "--arch": st.sampled_from(["models:MLP", "models:ConvBNNet", "models:make_mlp", "torchvision:nonet",
                               "timm:nonet", "MLP", "no_such_pkg_q.m:Net", ""]),
    "--arch-kwargs": st.sampled_from(["{}", '{"hidden": 8}', '{"d_in": 12}', "{bad", "[1]", '{"nope": 1}', ""]),
    "--input-shape": st.one_of(
        st.sampled_from(["1,48", "2,48", "0,48", "1,3,8,8", "1,-1", "4x48", "99999999999999999999,48", "1"]),
        st.lists(st.integers(-1, 64), min_size=0, max_size=4).map(lambda s: ",".join(map(str, s))), weird),
    "--rank": st.one_of(st.integers(-3, 10**6).map(str), weird),
    "--rank-ratio": st.one_of(floats, weird),
    "--param-ratio": floats,
    "--target-params": floats,
    "--target-flops": floats,
    "--method": st.one_of(st.sampled_from(["nkp", "spectral", "svd"]), st.text(max_size=4)),
    "--include": st.text(max_size=6),
    "--exclude": st.text(max_size=6),
    "--round-to": small_ints,
    "--calib": st.sampled_from(["gaussian", "@calib.npy", "@empty", "@missing", "@input"]),
    "--calib-samples": small_ints,
    "--calib-batch-size": small_ints,
    "--refine-steps": st.integers(-2, 20).map(str),
    "--seed": st.integers(-(2**70), 2**70).map(str),
    "--max-output-error": floats,
    "-o": st.sampled_from(["@out/model.lrc.safetensors", "@out/missing/m.lrc.safetensors", "@out", "@input"]),
    "--json": st.sampled_from(["@out/report.json", "@out/missing/r.json", "@out"]),
    "--onnx": st.sampled_from(["@out/m.onnx", "@out/missing/m.onnx", "@out"]),
    "--opset": st.integers(-1, 30).map(str),
    "--exporter": st.sampled_from(["auto", "torchscript", "nope"]),  # dynamo is slow, and tested elsewhere
    "--rtol": floats,
    "--batch-sizes": st.sampled_from(["1", "0", "a", "1,2", "", "-1", "1,,2"]),
    "--repeats": st.integers(-1, 2).map(str),
    "--warmup": st.integers(-1, 1).map(str),
    "--runtime": st.sampled_from(["torch", "onnxruntime", "tensorrt"]),
    "--threads": st.integers(-1, 2).map(str),
    "--device": st.sampled_from(["cpu", "cuda", "auto", "tpu"]),
    "--vs": st.sampled_from(["@input", "@base/mlp.lrc.safetensors", "@base/mlp.onnx", "@missing"]),
    "--max-latency-ratio": floats,
    "--data": st.sampled_from(["@images", "@empty", "@missing", "@out", "@input"]),
    "--split": st.sampled_from(["val", "train", "", "../.."]),
    "--batch-size": small_ints,
    "--workers": st.sampled_from(["0", "-1"]),
    "--min-top1": floats,
    "--epochs": st.integers(-1, 1).map(str),
    "--lr": floats,
    "--optimizer": st.sampled_from(["sgd", "adamw", "lion"]),
    "--max-steps": st.integers(-1, 2).map(str),
    "--recipe": st.sampled_from(["@input", "@missing"]),
    "--teacher": st.sampled_from(["@input", "@base/mlp.safetensors", "@missing"]),
}
FLAGS = {
    "inspect": ["--trust-pickle", "--help"],
    "compress": ["--trust-pickle", "--quiet", "--latency-aware", "--help"],
    "export": ["--trust-pickle", "--help"],
    "bench": ["--trust-pickle", "--help"],
    "eval": ["--trust-pickle", "--help"],
    "finetune": ["--trust-pickle", "--no-teacher", "--from-scratch", "--quiet", "--help"],
}
COMMAND_OPTIONS = {
    "inspect": ["--arch", "--arch-kwargs", "--input-shape", "--json"],
    "compress": ["--arch", "--arch-kwargs", "--input-shape", "--rank", "--rank-ratio", "--param-ratio",
                 "--target-params", "--target-flops", "--method", "--include", "--exclude", "--round-to", "--calib",
                 "--calib-samples", "--calib-batch-size", "--refine-steps", "--seed", "--max-output-error", "-o",
                 "--json"],
    "export": ["--onnx", "--input-shape", "--opset", "--exporter", "--rtol", "--arch", "--arch-kwargs", "--calib",
               "--calib-samples", "--json"],
    "bench": ["--vs", "--arch", "--input-shape", "--runtime", "--device", "--threads", "--batch-sizes", "--warmup",
              "--repeats", "--json", "--max-latency-ratio"],
    "eval": ["--data", "--split", "--arch", "--input-shape", "--batch-size", "--workers", "--json", "--min-top1",
             "--device"],
    "finetune": ["--data", "-o", "--teacher", "--recipe", "--arch", "--epochs", "--batch-size", "--lr", "--optimizer",
                 "--workers", "--max-steps", "--device", "--method", "--rank"],
}


# What each command needs to get past argument parsing, in the "plausible" half of the examples.
REQUIRED = {
    "inspect": [],
    "compress": [("--rank", "4")],
    "export": [("--onnx", "@out/m.onnx")],
    "bench": [("--device", "cpu"), ("--repeats", "1"), ("--warmup", "0")],
    "eval": [("--data", "@images"), ("--workers", "0"), ("--device", "cpu")],
    "finetune": [("--data", "@images"), ("-o", "@out/ft.lrc.safetensors"), ("--no-teacher", None), ("--epochs", "1"),
                 ("--max-steps", "1"), ("--workers", "0"), ("--device", "cpu")],
}
NATURAL = {"mlp.safetensors": ".safetensors", "mlp.lrc.safetensors": ".lrc.safetensors", "mlp.pt": ".pt",
           "mlp.onnx": ".onnx", "calib.npy": ".npy"}


@st.composite
def invocations(draw):
    command = draw(st.sampled_from(list(COMMAND_OPTIONS)))
    plausible = draw(st.sampled_from([True, True, False]))
    options = list(REQUIRED[command]) if plausible else []
    names = draw(st.lists(st.sampled_from(COMMAND_OPTIONS[command]), max_size=2 if plausible else 6, unique=True))
    options += [(name, draw(OPTIONS[name])) for name in names]
    flags = draw(st.lists(st.sampled_from(FLAGS[command]), max_size=1 if plausible else 2, unique=True))
    content = draw(file_contents)
    natural = NATURAL.get(content[0])
    suffix = natural if plausible and natural else draw(st.sampled_from(SUFFIXES))
    with_input = plausible or command != "finetune" or draw(st.booleans())
    return command, options, flags, content, suffix, with_input


def _write_input(base: dict[str, Path], content: tuple, path: Path) -> None:
    if content[0] == "raw":
        path.write_bytes(content[1])
    else:
        name, how, position, value, noise = content
        data = base[name].read_bytes()
        path.write_bytes(data if how == "intact" else _damage(data, how, position, value, noise))


def _resolve(value: str, base: dict[str, Path], work: Path, model: Path) -> str:
    if not value.startswith("@"):
        return value
    name = value[1:]
    if name == "input":
        return str(model)
    if name == "missing":
        return str(work / "missing-file")
    if name.startswith("base/"):
        return str(base[name[5:]])
    if name.startswith("out"):
        return str(work / "out" / name[4:]) if name != "out" else str(work / "out")
    return str(base[name])


def _on_alarm(signum, frame):
    raise Hang()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(invocation=invocations())
def test_the_cli_never_crashes_hangs_or_leaves_partial_files(base, tmp_path, run_cli, invocation):
    command, options, flags, content, suffix, with_input = invocation
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "out").mkdir()
    model = work / f"input{suffix}"
    _write_input(base, content, model)
    argv = [command] + ([str(model)] if with_input else [])
    for name, value in options:
        argv += [name] if value is None else [name, _resolve(value, base, work, model)]
    argv += flags
    if command == "compress" and "-o" not in argv:
        argv += ["-o", str(work / "out" / "default.lrc.safetensors")]
    before = sorted(str(p) for p in work.rglob("*"))

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        result = run_cli(*argv)
    except Hang:
        pytest.fail(f"no result within {DEADLINE_S} s: lrc {' '.join(argv)}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    shown = f"lrc {' '.join(argv)}\n-> {result.code}\n{result.err[-3000:]}"
    event(f"{command} exits {result.code}")
    assert result.code in (0, 1, 2, 3), shown
    assert "Traceback" not in result.err + result.out, shown
    if result.code in (1, 2):
        assert len(result.err_lines) == 1 and result.err_lines[0].startswith("error: "), shown
    if result.code == 3:  # a missed budget: the outputs were written, and the last line says why it failed
        assert result.err_lines[-1].startswith("error: ") and all(
            line.startswith("wrote ") for line in result.err_lines[:-1]), shown
    leftovers = [p.name for p in work.rglob("*.tmp")]
    assert not leftovers, (leftovers, shown)
    if result.code == 2:
        assert sorted(str(p) for p in work.rglob("*")) == before, shown
    shutil.rmtree(work)


def test_the_fuzzer_reaches_past_argument_parsing(base, tmp_path, run_cli):
    # A guard on the strategies: an intact input with sane options compresses, exports and benches.
    model = tmp_path / "input.safetensors"
    shutil.copy(base["mlp.safetensors"], model)
    for argv in (["compress", model, "--rank", "4", "-q", "-o", tmp_path / "c.lrc.safetensors"],
                 ["export", tmp_path / "c.lrc.safetensors", "--onnx", tmp_path / "c.onnx"],
                 ["bench", tmp_path / "c.lrc.safetensors", "--vs", model, "--device", "cpu", "--repeats", "1",
                  "--warmup", "0", "--json", tmp_path / "b.json"]):
        result = run_cli(*argv)
        assert result.code == 0, (argv, result.err)
    assert json.loads((tmp_path / "b.json").read_text())["models"]["model"]["params"] > 0
