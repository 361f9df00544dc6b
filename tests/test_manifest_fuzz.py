"""A structure-aware property-based fuzz of the ``.lrc.safetensors`` manifest.

Each example starts from a valid manifest of the digits model and replaces one to three of its
fields with generated values of the right or wrong type, nesting, size or name (architecture specs
from files, kwargs that name weights, shapes, dtypes, layer tables with bad names, kinds, ranks and
ties, data configs), or replaces the whole JSON text (not JSON, nested 100,000 deep, 20 MB). The
files are real, and ``lrc inspect`` / ``lrc eval`` / ``lrc bench`` run on them in one worker process
that calls the CLI's ``main`` as the console script does, with file descriptors 1 and 2 redirected
per run. Whatever the file: exit 0 or 2, never a traceback or exit 1, at most one line on stderr, no
network use, and the worker's peak memory stays under 2 GB.

One long-lived worker (instead of an interpreter per example) keeps the test near a minute; its
peak memory is a high-water mark over every example, so one bound covers them all.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowrank_compress.examples import digits
from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.io.format import MANIFEST_KEY, read_manifest, save

EXAMPLES = 50
PEAK_LIMIT_MB = 2048
REPLY_TIMEOUT_S = 120

WORKER = r'''
import json, os, sys, tempfile, threading, time, traceback

_network = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto", "urllib.Request",
            "http.client.connect", "webbrowser.open"}
_watched = {"antigravity", "this", "venv", "timm.task.distillation"}
events = []


def hook(event, args):
    if event in _network or (event == "import" and args[0] in _watched):
        events.append(f"{event} {args[0]!r:.100}")
        raise PermissionError(f"fuzz worker: {event} blocked")


sys.addaudithook(hook)


def peak_rss_mb():
    # VmHWM is this process's own high-water mark; ru_maxrss would carry over the parent's peak
    # across fork + exec (Linux), so a worker started by a large pytest process read as large.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def watchdog():
    # Protect the machine: a runaway example ends the worker (the test then fails on the missing reply).
    while True:
        with open("/proc/self/statm") as f:
            if int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") > 3 * 2**30:
                os._exit(99)
        time.sleep(0.05)


threading.Thread(target=watchdog, daemon=True).start()
from lowrank_compress.cli import main

replies = os.fdopen(os.dup(1), "w", buffering=1)
for line in sys.stdin:
    args = json.loads(line)
    with tempfile.TemporaryFile() as sink, tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = "escaped"
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    maxrss = peak_rss_mb()
    replies.write(json.dumps({"code": code, "stderr": stderr, "events": events[:], "maxrss_mb": maxrss}) + "\n")
    events.clear()
'''


class Worker:
    """The worker process: ``run(args)`` → {code, stderr, events, maxrss_mb (its peak so far)}."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.peak_mb = 0.0  # the highest peak of this worker and of those it replaced
        self._start()

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("LRC_TRUSTED_MODULES", "LRC_DEBUG")}
        env.update(TORCH_HOME=str(self.tmp / "torch-home"), HF_HOME=str(self.tmp / "hf-home"), OMP_NUM_THREADS="1")
        self.log = open(self.tmp / "worker.log", "a")  # noqa: SIM115 - open for the worker's lifetime
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=self.tmp, env=env)
        self.maxrss_mb = 0.0

    def run(self, args: list) -> dict:
        self.proc.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.restart()
            raise AssertionError(f"lrc {args} hung or killed the worker")
        reply = json.loads(line)
        self.maxrss_mb = reply["maxrss_mb"]
        self.peak_mb = max(self.peak_mb, self.maxrss_mb)
        return reply

    def restart(self) -> None:
        """A fresh worker, after one that died or reached the memory bound: the peak is a high-water
        mark, so the old one would blame every later example (and Hypothesis would shrink to noise)."""
        self.proc.kill()
        self.proc.wait(timeout=60)
        self.log.close()
        self._start()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The digits model compressed (data-free, rank 4), its manifest and tensors, and two images."""
    root = tmp_path_factory.mktemp("manifest-fuzz")
    model = digits.DigitsCNN()
    model.load_state_dict(load_file(str(digits.bundled_checkpoint_path())))
    compress(model.eval(), CompressConfig(rank=4, method="spectral"), torch.randn(1, 1, 32, 32))
    path = root / "base.lrc.safetensors"
    save(model, path, arch=digits.ARCH_SPEC, input_shape=[1, 1, 32, 32])
    test = load_file(str(digits.bundled_test_split_path()))
    digits.write_image_folder(root / "data", test["x_test"][:2], test["y_test"][:2], "val")
    return {"root": root, "manifest": read_manifest(path), "tensors": load_file(str(path)), "data": root / "data"}


# ---------------------------------------------------------------- the manifest strategy

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
INTS = st.integers(-3, 64) | st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, 10**30, -1])
SHAPES = st.one_of(
    st.none(),
    st.lists(INTS, max_size=9),
    st.builds(lambda h, w: [1, 1, h, w], st.integers(1, 3000), st.integers(1, 3000)),
    st.sampled_from([[1, 1, 1, 2**20], [1, 1, 2**20, 1], [1, 1, 1, 2**20 + 1], [1, 1, 1024, 1024]]),  # at the cap
    st.builds(lambda n, c: [n, c, 32, 32], st.integers(1, 100_000), st.integers(1, 4)),
    JSON,
)
ARCHS = [
    digits.ARCH_SPEC, "torchvision:resnet18", "torchvision:fasterrcnn_resnet50_fpn", "torchvision:regnet_y_400mf",
    "timm:resnet18", "timm:vit_giant_patch14_224", "timm:hf-hub:timm/resnet18.a1_in1k",
    "timm.task.distillation:DistillationTeacher", "antigravity:X", "this:X", "venv.__main__:X", "os:system",
    "builtins:eval", "lowrank_compress.examples.digits:load_digits_split", "lowrank_compress.examples.digits:Nope",
    "lowrank_compress.examples.digits:DigitsCNN.__init__", "torchvision:", ":", "x", "a" * 300,
]
KWARG_NAMES = ["num_classes", "in_chans", "drop_rate", "pretrained", "pretrained_cfg_overlay", "checkpoint_path",
               "weights", "weights_backbone", "model_name_or_module", "img_size", "hidden"]
KWARGS = st.one_of(
    st.dictionaries(st.sampled_from(KWARG_NAMES) | st.text(max_size=8), INTS | JSON, max_size=3),
    st.just({"num_classes": 10}),
    JSON,
)
DTYPES = st.sampled_from(["float32", "float16", "bfloat16", "float64", "evil", "int8", ""]) | JSON
LAYER_NAMES = ["stem.conv", "down1.conv", "block.conv1", "block.conv2", "down2.conv", "conv.conv", "fc", "head",
               "", "forward", "__class__", "training", "_modules", "stem", "stem.bn", "fc.weight", "block..conv1",
               "nope.x", "0", "stem.conv.down", "a" * 600, " fc", "fc\n"]
NAMES = st.sampled_from(LAYER_NAMES) | st.text(max_size=16)
KINDS = st.sampled_from(["LowRankLinear", "LowRankConv1d", "LowRankConv2d", "Linear", "LowRankConv3d"]) | JSON
ENTRIES = st.fixed_dictionaries(
    {"kind": KINDS, "rank": INTS | JSON},
    optional={"bias": st.booleans() | JSON, "tied_to": NAMES | JSON, "extra": JSON},
)
DATA_CONFIGS = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={
        "input_size": SHAPES, "mean": st.lists(st.floats(), max_size=5) | JSON,
        "std": st.lists(st.floats(), max_size=5) | JSON,
        "interpolation": st.sampled_from(["bilinear", "bicubic", "nearest", "evil"]) | JSON,
        "crop_pct": st.floats() | JSON, "other": JSON,
    }),
    JSON,
)
DELETE = object()


def _layers(base_layers: dict):
    """A layer table: the base one with entries changed, added and removed; a huge one; or any JSON."""
    mutated = st.builds(
        lambda added, removed: {**{k: v for k, v in base_layers.items() if k not in removed}, **added},
        st.dictionaries(NAMES, ENTRIES, max_size=3),
        st.sets(st.sampled_from(sorted(base_layers))),
    )
    huge = st.builds(lambda n: {f"x{i}": {"kind": "LowRankLinear", "rank": 1} for i in range(n)},
                     st.sampled_from([5_000, 200_000]))
    return st.one_of(mutated, huge, JSON)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def manifest_texts(draw, base_manifest: dict) -> str:
    """The JSON text of a manifest: the base one with one to three fields replaced, or a damaged text."""
    fields = {
        "format_version": st.sampled_from([1, 0, 2, -1, True, 1.0, "1"]) | JSON,
        "arch": st.sampled_from(ARCHS) | st.text(max_size=20) | JSON,
        "arch_kwargs": KWARGS,
        "input_shape": SHAPES,
        "dtype": DTYPES,
        "layers": _layers(base_manifest["layers"]),
        "data_config": DATA_CONFIGS,
        "method": st.text(max_size=8) | JSON,
        "junk": st.sampled_from([_deep(31), _deep(33), _deep(5_000), "x" * 5_000_000]) | JSON,
    }
    manifest = dict(base_manifest)
    for name in draw(st.sets(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        value = draw(fields[name] | st.just(DELETE))
        if value is DELETE:
            manifest.pop(name, None)
        else:
            manifest[name] = value
    event(", ".join(sorted(k for k in fields if manifest.get(k, DELETE) is not base_manifest.get(k, DELETE))))
    text = json.dumps(manifest)
    for depth in (31, 33, 5_000):
        text = text.replace(json.dumps(_deep(depth)), _deep(depth))  # nesting, not a string of brackets
    damage = draw(st.sampled_from(["none"] * 12 + ["truncated", "array", "deep", "not-json", "huge"]))
    return {
        "none": text,
        "truncated": text[: len(text) // 2],
        "array": f"[{text}]",
        "deep": text[:-1] + ', "deep": ' + _deep(100_000) + "}",
        "not-json": "{lrc: not json",
        "huge": text[:-1] + ', "big": "' + "x" * 20_000_000 + '"}',
    }[damage]


# ---------------------------------------------------------------- the property


def test_no_manifest_makes_lrc_crash_print_more_than_a_line_or_use_2gb(base, tmp_path):
    worker = Worker(tmp_path)
    path = tmp_path / "fuzzed.lrc.safetensors"
    codes: dict[str, int] = {}  # "command exit-code" → runs

    def at_cap(shape: list[int]) -> str:
        return json.dumps({**base["manifest"], "input_shape": shape})

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(text=manifest_texts(base["manifest"]), bench=st.booleans())
    # The costliest shapes a file may record: thin strips at the cap (a convolution's im2col buffer is
    # its input times C·k², and a strip halves in one dimension only at each stride).
    @example(text=at_cap([1, 1, 1, 2**20]), bench=True)
    @example(text=at_cap([1, 1, 2**20, 1]), bench=False)
    def check(text: str, bench: bool) -> None:
        save_file(base["tensors"], str(path), metadata={MANIFEST_KEY: text})
        commands = [["inspect", path],
                    ["eval", path, "--data", base["data"], "--workers", "0", "--batch-size", "2", "--device", "cpu"]]
        if bench:
            commands.append(["bench", path, "--device", "cpu", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0"])
        for args in commands:
            reply = worker.run(args)
            lines = [line for line in reply["stderr"].splitlines() if line.strip()]
            context = (args[0], text[:300], reply["stderr"][-2000:])
            if reply["maxrss_mb"] >= PEAK_LIMIT_MB:
                worker.restart()
                raise AssertionError(f"peak memory {reply['maxrss_mb']:.0f} MB", context)
            assert reply["code"] in (0, 2), context
            assert "Traceback" not in reply["stderr"] and len(lines) <= 1, context
            assert reply["code"] == 0 or lines[0].startswith("error: "), context
            assert reply["events"] == [], (reply["events"], context)
            key = f"{args[0]} {reply['code']}"
            codes[key] = codes.get(key, 0) + 1

    try:
        check()
    finally:
        worker.close()
    assert worker.peak_mb < PEAK_LIMIT_MB
    # Both refused files and files that load and run were reached.
    assert codes.get("eval 0", 0) > 0 and codes.get("eval 2", 0) > 0, codes
    assert not (tmp_path / "torch-home").exists()
    print(f"manifest fuzz: {EXAMPLES} examples, exit codes {codes}, worker peak memory {worker.peak_mb:.0f} MB")
