"""Untrusted model files must not reach the network, import code or destroy inputs.

Every case the issue reports is reproduced with real files on disk and must now be refused with
exit 2 and one line on stderr. Where the process itself is the point — the network, the torch hub
cache, what gets imported, what the console shows, peak memory — the command runs as a real
``python -m lowrank_compress`` under a probe: a ``sitecustomize`` that records (and blocks) every
network operation and every import of a module the crafted file names, and writes the process's
peak memory at exit. The other cases call the same ``main`` in-process, with sockets patched to
record and refuse any use, which takes milliseconds instead of seconds per case.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_compress.examples import digits
from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.errors import UsageError
from lowrank_compress.io.format import MANIFEST_KEY, load, read_manifest, save

ASSET = digits.bundled_checkpoint_path()
SPEC = digits.ARCH_SPEC
DISTILL = "timm.task.distillation:DistillationTeacher"
# What the file passes to DistillationTeacher: a URL named after torchvision's official resnet18 file.
DISTILL_KWARGS = {
    "model_name_or_module": "resnet18", "num_classes": 10,
    "pretrained_cfg_overlay": {"hf_hub_id": None, "url": "http://127.0.0.1:9/resnet18-f37072fd.pth"},
}
EVILMOD = "open('IMPORTED', 'w').write('evilmod ran')\nfrom lowrank_compress.examples.digits import DigitsCNN as Net\n"

PROBE = '''
import atexit, json, os, sys

_log = os.environ["LRC_PROBE_LOG"]
_watched = set(filter(None, os.environ.get("LRC_PROBE_MODULES", "").split(",")))
_network = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto",
            "socket.sendmsg", "socket.bind", "urllib.Request", "http.client.connect", "webbrowser.open"}
_events = []
_startup = []


def _rss_mb():
    # VmHWM: this process's own peak (ru_maxrss would start at the parent's peak after fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _hook(event, args):
    if event == "import" and args[0] == "lowrank_compress.cli" and not _startup:
        _startup.append(_rss_mb())  # the package and torch are imported; the command has not started
    if event in _network:
        _events.append(f"{event} {args!r:.200}")
        raise PermissionError(f"lrc safety probe: {event} blocked")
    if event == "import" and args[0] in _watched:
        _events.append(f"import {args[0]}")
        raise ImportError(f"lrc safety probe: import of {args[0]} blocked")


sys.addaudithook(_hook)


@atexit.register
def _report():
    with open(_log, "w") as f:
        json.dump({"events": _events, "maxrss_mb": _rss_mb(), "startup_mb": (_startup or [0.0])[0]}, f)
'''


# ---------------------------------------------------------------- files and runners


def craft(src: Path, dst: Path, **changes) -> Path:
    """A copy of a compressed file with manifest fields changed (a crafted file)."""
    manifest = read_manifest(src)
    manifest.update(changes)
    save_file(load_file(str(src)), str(dst), metadata={MANIFEST_KEY: json.dumps(manifest)})
    return dst


def plain(dst: Path, **metadata) -> Path:
    """The bundled digits weights as a plain safetensors file with the given metadata."""
    save_file(load_file(str(ASSET)), str(dst), metadata={k: v if isinstance(v, str) else json.dumps(v)
                                                         for k, v in metadata.items()})
    return dst


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width``×``height`` pixels in a few bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what a refused command must leave unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The digits model as a plain safetensors file naming its arch, as a .pt state dict, compressed
    (.lrc.safetensors), and a few digits as an image folder (train/ and val/)."""
    root = tmp_path_factory.mktemp("safety")
    shutil.copy(ASSET, root / "digits.safetensors")
    torch.save(load_file(str(ASSET)), root / "digits.pt")
    model = digits.DigitsCNN()
    model.load_state_dict(load_file(str(ASSET)))
    compress(model.eval(), CompressConfig(rank=4, method="spectral"), torch.randn(1, 1, 32, 32))
    save(model, root / "digits.lrc.safetensors", arch=SPEC, input_shape=[1, 1, 32, 32])
    test = load_file(str(digits.bundled_test_split_path()))
    digits.write_image_folder(root / "data", test["x_test"][:8], test["y_test"][:8], "train")
    digits.write_image_folder(root / "data", test["x_test"][8:12], test["y_test"][8:12], "val")
    return root


@pytest.fixture
def work(ws, tmp_path) -> Path:
    """A fresh working folder holding copies of the workspace files (commands run in it)."""
    folder = tmp_path / "work"
    shutil.copytree(ws, folder)
    return folder


@dataclass
class Run:
    code: int
    out: str
    err: str
    events: list[str]
    maxrss_mb: float
    startup_mb: float

    @property
    def command_mb(self) -> float:
        """Peak memory the command added to the interpreter with the package imported."""
        return self.maxrss_mb - self.startup_mb

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_probed(tmp_path: Path, cwd: Path, *args, watch: tuple[str, ...] = ()) -> Run:
    """``python -m lowrank_compress ARGS`` in ``cwd`` under the probe, with private torch/HF caches."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE)
    log = tmp_path / "probe.json"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LRC_TRUSTED_MODULES", "PYTHONPATH", "LRC_DEBUG")}
    env.update(PYTHONPATH=str(probe), LRC_PROBE_LOG=str(log), LRC_PROBE_MODULES=",".join(watch),
               TORCH_HOME=str(tmp_path / "torch-home"), HF_HOME=str(tmp_path / "hf-home"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "lowrank_compress", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    report = (json.loads(log.read_text()) if log.exists()
              else {"events": ["no probe report"], "maxrss_mb": float("inf"), "startup_mb": 0.0})
    return Run(done.returncode, done.stdout, done.stderr, report["events"], report["maxrss_mb"], report["startup_mb"])


def assert_refused(result, *fragments: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr holding every fragment, nothing on stdout."""
    assert result.code == 2, (result.code, result.err)
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err and result.out.strip() == "", (result.out, result.err)
    for fragment in fragments:
        assert fragment in result.err_lines[0], (fragment, result.err_lines[0])
    return result.err_lines[0]


def assert_no_side_effects(tmp_path: Path, cwd: Path, before: dict[str, bytes], result: Run) -> None:
    """No network use or watched import, nothing in the torch hub cache, the working folder unchanged."""
    assert result.events == [], result.events
    hub = tmp_path / "torch-home"
    assert not hub.exists() or not any(hub.rglob("*")), sorted(hub.rglob("*"))
    assert snapshot(cwd) == before  # no file created, changed or removed in the working folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """In-process runs: every socket use is recorded and refused; torch and HF caches are private."""
    attempts: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            attempts.append(f"{name} {args!r:.120}")
            raise PermissionError(f"test: {name} blocked")
        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("LRC_TRUSTED_MODULES", raising=False)
    return attempts


# ---------------------------------------------------------------- 1. no network, no hub cache


def test_a_manifest_naming_a_downloading_class_is_refused_before_import(ws, work, tmp_path):
    evil = craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch=DISTILL, arch_kwargs=DISTILL_KWARGS)
    before = snapshot(work)
    result = run_probed(tmp_path, work, "eval", evil.name, "--data", "data", "--workers", "0",
                        watch=("timm.task", "timm.task.distillation"))
    assert_refused(result, f"names the architecture '{DISTILL}'", "LRC_TRUSTED_MODULES", "--arch")
    assert_no_side_effects(tmp_path, work, before, result)


def test_inspect_of_a_plain_safetensors_naming_a_downloading_class_is_refused(work, run_cli, offline, monkeypatch):
    evil = plain(work / "evil.safetensors", arch=DISTILL, arch_kwargs=DISTILL_KWARGS)
    monkeypatch.chdir(work)
    before = snapshot(work)
    assert_refused(run_cli("inspect", evil), f"names the architecture '{DISTILL}'")
    assert offline == [] and "timm.task.distillation" not in sys.modules
    assert snapshot(work) == before and not Path(os.environ["TORCH_HOME"]).exists()


@pytest.mark.parametrize(
    ("command", "make"),
    [
        ("bench", lambda w, evil: ["bench", evil, "--device", "cpu", "--repeats", "1", "--warmup", "0"]),
        ("export", lambda w, evil: ["export", evil, "--onnx", w / "m.onnx"]),
        ("finetune-teacher", lambda w, evil: ["finetune", w / "digits.lrc.safetensors", "--teacher", evil, "--data",
                                              w / "data", "--epochs", "1", "--workers", "0", "--device", "cpu",
                                              "--quiet", "-o", w / "ft.lrc.safetensors"]),
    ],
    ids=["bench", "export", "finetune-teacher"],
)
def test_every_command_refuses_the_downloading_class(work, run_cli, offline, command, make, monkeypatch):
    evil = (plain(work / "evil.safetensors", arch=DISTILL, arch_kwargs=DISTILL_KWARGS) if command == "finetune-teacher"
            else craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch=DISTILL,
                       arch_kwargs=DISTILL_KWARGS))
    monkeypatch.chdir(work)
    before = snapshot(work)
    assert_refused(run_cli(*make(work, evil)), f"names the architecture '{DISTILL}'")
    assert offline == [] and "timm.task.distillation" not in sys.modules
    assert snapshot(work) == before and not Path(os.environ["TORCH_HOME"]).exists()


def test_a_hub_model_name_in_a_file_is_refused_without_contacting_the_hub(work, tmp_path):
    evil = craft(work / "digits.lrc.safetensors", work / "hub.lrc.safetensors", arch="timm:hf-hub:timm/resnet18.a1_in1k")
    before = snapshot(work)
    result = run_probed(tmp_path, work, "eval", evil.name, "--data", "data", "--workers", "0")
    assert_refused(result, "Hugging Face Hub model", "never downloads")
    assert_no_side_effects(tmp_path, work, before, result)
    assert not (tmp_path / "hf-home").exists()


def test_a_registry_model_whose_builder_downloads_a_backbone_is_built_without_it(work, run_cli, offline, monkeypatch):
    # torchvision's detection builders fetch ImageNet backbone weights unless weights_backbone=None.
    evil = craft(work / "digits.lrc.safetensors", work / "det.lrc.safetensors", arch="torchvision:fasterrcnn_resnet50_fpn")
    monkeypatch.chdir(work)
    before = snapshot(work)
    assert_refused(run_cli("eval", evil, "--data", work / "data", "--workers", "0"), "the architecture does not have")
    assert offline == [] and snapshot(work) == before and not Path(os.environ["TORCH_HOME"]).exists()


@pytest.mark.parametrize(
    ("arch", "kwargs", "fragment"),
    [
        ("timm:resnet18", {"checkpoint_path": "{work}/digits.pt"}, "arch kwarg 'checkpoint_path'"),
        ("timm:resnet18", {"pretrained_path": "{work}/digits.pt"}, "arch kwarg 'pretrained_path'"),
        ("timm:resnet18", {"pretrained": True}, "arch kwarg 'pretrained'"),
        ("timm:resnet18", {"pretrained_cfg_overlay": {"file": "{work}/digits.pt"}}, "arch kwarg 'pretrained_cfg_overlay'"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "arch kwarg 'weights'"),
        ("torchvision:fasterrcnn_resnet50_fpn", {"weights_backbone": "DEFAULT"}, "arch kwarg 'weights_backbone'"),
        (SPEC, {"num_classes": "/etc/passwd"}, "arch kwarg 'num_classes' the value '/etc/passwd'"),
        (SPEC, {"weights_file": "x"}, "arch kwarg 'weights_file'"),
    ],
    ids=["checkpoint_path", "pretrained_path", "pretrained", "cfg-overlay", "weights", "weights_backbone",
         "path-value", "allowed-module-weights-name"],
)
def test_kwargs_that_load_weights_or_read_paths_are_refused_and_say_how_to_pass_them(
    work, run_cli, offline, monkeypatch, arch, kwargs, fragment
):
    kwargs = json.loads(json.dumps(kwargs).replace("{work}", str(work)))
    evil = craft(work / "digits.lrc.safetensors", work / "kw.lrc.safetensors", arch=arch, arch_kwargs=kwargs)
    monkeypatch.chdir(work)
    before = snapshot(work)
    assert_refused(run_cli("eval", evil, "--data", work / "data", "--workers", "0"), fragment, "--arch-kwargs")
    assert offline == [] and snapshot(work) == before and not Path(os.environ["TORCH_HOME"]).exists()


def test_an_explicit_pretrained_request_is_refused_too(work, run_cli, offline):
    result = run_cli("inspect", work / "digits.pt", "--arch", "timm:resnet18", "--arch-kwargs", '{"pretrained": true}')
    assert_refused(result, "lrc never uses the network")
    assert offline == []


def test_the_cli_switches_the_hub_libraries_offline(work, run_cli, offline, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert run_cli("inspect", work / "digits.lrc.safetensors").code == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE


# ---------------------------------------------------------------- 2. no code from a file's module


def test_a_module_in_the_working_folder_never_runs_under_python_m(work, tmp_path):
    (work / "evilmod.py").write_text(EVILMOD)
    evil = craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch="evilmod:Net")
    before = snapshot(work)
    result = run_probed(tmp_path, work, "eval", evil.name, "--data", "data", "--workers", "0", watch=("evilmod",))
    assert_refused(result, "names the architecture 'evilmod:Net'")
    assert_no_side_effects(tmp_path, work, before, result)
    assert not (work / "IMPORTED").exists()


@pytest.mark.parametrize("spec", ["antigravity:X", "this:X", "venv.__main__:X", "evilmod:Net"])
def test_a_module_named_by_a_file_is_never_imported(work, run_cli, offline, monkeypatch, spec):
    (work / "evilmod.py").write_text(EVILMOD)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.chdir(work)
    module = spec.partition(":")[0]
    assert module not in sys.modules and module.split(".")[0] not in sys.modules
    evil = craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch=spec)
    assert_refused(run_cli("eval", evil, "--data", work / "data", "--workers", "0"), f"names the architecture '{spec}'")
    with pytest.raises(UsageError, match="not an nn.Module class of a module you allowed"):
        load(evil)
    assert module not in sys.modules and module.split(".")[0] not in sys.modules and "webbrowser" not in sys.modules
    assert not (work / "IMPORTED").exists()


def test_an_allowed_module_is_imported_and_its_class_built(work, monkeypatch, offline):
    # The payload is live: once the user allows the module, the same file loads (and its import runs).
    (work / "evilmod.py").write_text(EVILMOD)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.chdir(work)
    monkeypatch.setenv("LRC_TRUSTED_MODULES", "some.other, evilmod")
    evil = craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch="evilmod:Net")
    try:
        model = load(evil)
    finally:
        sys.modules.pop("evilmod", None)
    assert isinstance(model, digits.DigitsCNN) and (work / "IMPORTED").exists()


def test_an_explicit_arch_overrides_the_file_and_needs_no_allow_list(work, offline):
    evil = craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch=DISTILL, arch_kwargs={})
    assert isinstance(load(evil, arch=SPEC), digits.DigitsCNN)


# ---------------------------------------------------------------- 3. outputs never overwrite inputs


def test_compress_onto_its_own_checkpoint_is_refused_by_the_console(work, tmp_path):
    before = snapshot(work)
    result = run_probed(tmp_path, work, "compress", "digits.safetensors", "--rank", "4", "-o", "digits.safetensors")
    assert_refused(result, "-o digits.safetensors would overwrite the input CHECKPOINT")
    assert snapshot(work) == before


CLASHES = {
    "compress-o": ["compress", "{m}", "--rank", "4", "-o", "{m}"],
    "compress-json": ["compress", "{m}", "--rank", "4", "--json", "{m}"],
    "compress-onnx": ["compress", "{m}", "--rank", "4", "--onnx", "{m}"],
    "compress-plot": ["compress", "{m}", "--rank", "4", "--plot", "{m}"],
    "compress-default-output": ["compress", "{lrc}", "--arch", SPEC, "--rank", "4"],  # x.lrc.safetensors → itself
    "compress-calib": ["compress", "{m}", "--rank", "4", "--calib", "{pt}", "--json", "{pt}"],
    "compress-o-json": ["compress", "{m}", "--rank", "4", "-o", "{out}", "--json", "{out}"],
    "compress-onnx-plot": ["compress", "{m}", "--rank", "4", "--onnx", "{out}", "--plot", "{out}"],
    "inspect-json": ["inspect", "{m}", "--json", "{m}"],
    "export-onnx": ["export", "{lrc}", "--onnx", "{lrc}"],
    "export-json-onnx": ["export", "{lrc}", "--onnx", "{out}", "--json", "{out}"],
    "eval-json": ["eval", "{lrc}", "--data", "{data}", "--json", "{lrc}"],
    "bench-json-vs": ["bench", "{lrc}", "--vs", "{m}", "--json", "{m}"],
    "finetune-o": ["finetune", "{lrc}", "--no-teacher", "--data", "{data}", "-o", "{lrc}"],
    "finetune-o-teacher": ["finetune", "{lrc}", "--teacher", "{m}", "--data", "{data}", "-o", "{m}"],
    "finetune-log": ["finetune", "{lrc}", "--no-teacher", "--data", "{data}", "-o", "{out}", "--log-file", "{lrc}"],
    "finetune-log-o": ["finetune", "{lrc}", "--no-teacher", "--data", "{data}", "-o", "{out}", "--log-file", "{out}"],
    "symlink": ["compress", "{m}", "--rank", "4", "-o", "{link}"],
    "hardlink": ["compress", "{m}", "--rank", "4", "--json", "{hard}"],
    "other-spelling": ["compress", "{m}", "--rank", "4", "-o", "{data}/../digits.safetensors"],
}


@pytest.mark.parametrize("case", list(CLASHES))
def test_an_output_that_would_replace_an_input_or_another_output_is_refused(work, run_cli, monkeypatch, case):
    monkeypatch.chdir(work)
    (work / "link.lrc.safetensors").symlink_to(work / "digits.safetensors")
    os.link(work / "digits.safetensors", work / "hard.json")
    names = {"m": work / "digits.safetensors", "lrc": work / "digits.lrc.safetensors", "pt": work / "digits.pt",
             "data": work / "data", "out": work / "out.file", "link": work / "link.lrc.safetensors",
             "hard": work / "hard.json"}
    args = [a.format(**names) for a in CLASHES[case]]
    before = snapshot(work)
    line = assert_refused(run_cli(*args))
    assert "would overwrite the input" in line or "both name" in line
    assert snapshot(work) == before


# ---------------------------------------------------------------- 4. small files, bounded memory


def test_a_huge_recorded_input_shape_is_refused_before_allocating(work, tmp_path):
    big = craft(work / "digits.lrc.safetensors", work / "big.lrc.safetensors", input_shape=[1, 1, 20000, 20000])
    before = snapshot(work)
    result = run_probed(tmp_path, work, "eval", big.name, "--data", "data", "--workers", "0")
    assert_refused(result, "big.lrc.safetensors", "400,000,000 elements per sample", "pass --input-shape")
    assert_no_side_effects(tmp_path, work, before, result)
    assert result.startup_mb > 0 and result.command_mb < 300, result  # the issue measured 4.8 GB


def test_an_explicit_input_shape_lifts_the_cap(work, run_cli):
    big = craft(work / "digits.lrc.safetensors", work / "big.lrc.safetensors", input_shape=[1, 1, 20000, 20000])
    result = run_cli("eval", big, "--data", work / "data", "--workers", "0", "--input-shape", "1,1,40,40")
    assert result.code == 0, result.err


def test_a_huge_num_classes_is_refused_before_allocating(work, tmp_path):
    big = craft(work / "digits.lrc.safetensors", work / "wide.lrc.safetensors", arch_kwargs={"num_classes": 1000000})
    before = snapshot(work)
    result = run_probed(tmp_path, work, "eval", big.name, "--data", "data", "--workers", "0")
    assert_refused(result, "wide.lrc.safetensors", "num_classes=1000000", "--arch-kwargs")
    assert_no_side_effects(tmp_path, work, before, result)
    assert result.startup_mb > 0 and result.command_mb < 300, result  # the issue measured 3 GB


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"num_classes": 90000}, "it needs"), ({"num_classes": 90000, "__file__": 1}, "arch kwarg '__file__'")],
    ids=["within-cap-but-not-in-the-file", "bad-name"],
)
def test_sizes_a_file_cannot_fill_are_refused_from_the_meta_build(work, run_cli, kwargs, fragment):
    wide = craft(work / "digits.lrc.safetensors", work / "wide.lrc.safetensors", arch_kwargs=kwargs)
    assert_refused(run_cli("eval", wide, "--data", work / "data", "--workers", "0"), fragment)


def test_a_plain_file_naming_a_bigger_model_than_it_holds_is_refused(work, run_cli):
    wide = plain(work / "wide.safetensors", arch=SPEC, arch_kwargs={"num_classes": 100000})
    assert_refused(run_cli("inspect", wide), "it builds", "but the file holds")


def test_a_registry_giant_named_by_a_tiny_file_is_refused_before_building(work, run_cli):
    giant = craft(work / "digits.lrc.safetensors", work / "giant.lrc.safetensors", arch="timm:vit_giant_patch14_224")
    assert_refused(run_cli("eval", giant, "--data", work / "data", "--workers", "0"), "builds a dense model of",
                   "pass --arch timm:vit_giant_patch14_224")


def _inflating_torch_file(path: Path, inflated_mb: int) -> Path:
    """A genuine torch.save file whose tensor record is replaced by a deflated one of ``inflated_mb`` MiB."""
    original = path.with_suffix(".orig")
    torch.save({"w": torch.zeros(4)}, original)
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info.filename))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(record, "w", force_zip64=True) as out:
                for _ in range(inflated_mb):
                    out.write(bytes(2**20))
    original.unlink()
    return path


def test_a_torch_record_that_inflates_is_refused_from_the_zip_directory(work, tmp_path):
    bomb = _inflating_torch_file(work / "bomb.pt", inflated_mb=384)
    assert bomb.stat().st_size < 2**20
    before = snapshot(work)
    result = run_probed(tmp_path, work, "compress", bomb.name, "--arch", SPEC, "--rank", "4", "-o", "c.lrc.safetensors")
    assert_refused(result, "bomb.pt", "inflate to 403 MB", "decompression bomb")
    assert_no_side_effects(tmp_path, work, before, result)
    assert result.startup_mb > 0 and result.command_mb < 200, result  # reading it would add 384 MiB


def test_an_inflating_calibration_file_is_refused_too(work, run_cli):
    bomb = _inflating_torch_file(work / "calib.pt", inflated_mb=8)
    assert_refused(run_cli("compress", work / "digits.safetensors", "--rank", "4", "--calib", bomb, "-q",
                           "-o", work / "c.lrc.safetensors"), "calib.pt", "decompression bomb")


@pytest.mark.parametrize("where", ["calib", "data"])
@pytest.mark.parametrize("pixels", [(20000, 20000), (9500, 9500)], ids=["bomb-error", "bomb-warning"])
def test_an_image_beyond_the_pixel_limit_is_refused_with_its_name(work, capfd, where, pixels):
    from lowrank_compress.cli import main

    folder = work / "data" / "val" / "0" if where == "data" else work / "calib"
    folder.mkdir(parents=True, exist_ok=True)
    bomb = png_header(folder / "bomb.png", *pixels)
    args = (["eval", work / "digits.lrc.safetensors", "--data", work / "data", "--workers", "0"] if where == "data"
            else ["compress", work / "digits.safetensors", "--rank", "4", "--calib", folder, "-q", "-o", work / "c.lrc.safetensors"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, err  # PIL's warning used to add lines
    assert str(bomb) in lines[0] and "LRC_MAX_IMAGE_PIXELS" in lines[0]


# ---------------------------------------------------------------- 5. one line, exit 2, for every bad value


def _deep(n: int) -> str:
    return "[" * n + "]" * n


BAD_MANIFESTS = {
    "deep-json": ({"x": "DEEP"}, "nested deeper than"),
    "arch_kwargs-type": ({"arch_kwargs": [1, 2]}, "arch_kwargs is a list"),
    "data_config-type": ({"data_config": "bilinear"}, "data_config 'bilinear'"),
    "data_config-crop": ({"data_config": {"crop_pct": 1e-9}}, "crop_pct"),
    "data_config-std": ({"data_config": {"std": [0.0]}}, "bad std"),
    "data_config-interpolation-list": ({"data_config": {"interpolation": []}}, "data_config interpolation []"),
    "data_config-interpolation-evil": ({"data_config": {"interpolation": "evil"}}, "data_config interpolation 'evil'"),
    "tied_to-type": ({"layers": {"fc": {"kind": "LowRankLinear", "rank": 4, "tied_to": 7}}}, "ties 'fc' to an unknown layer"),
    "conv-on-linear": ({"layers": {"fc": {"kind": "LowRankConv2d", "rank": 4}}}, "as a LowRankConv2d, but the architecture has a Linear"),
    "rank-overflow": ({"layers": {"fc": {"kind": "LowRankLinear", "rank": 2**70}}}, "bad rank"),
    "rank-bool": ({"layers": {"fc": {"kind": "LowRankLinear", "rank": True}}}, "bad rank"),
    "bias-type": ({"layers": {"fc": {"kind": "LowRankLinear", "rank": 4, "bias": "yes"}}}, "bias flag"),
    "kind-list": ({"layers": {"fc": {"kind": ["LowRankLinear"], "rank": 4}}}, "unknown kind"),
    "unknown-entry-field": ({"layers": {"fc": {"kind": "LowRankLinear", "rank": 4, "code": "x"}}}, "unknown fields"),
    "format_version-true": ({"format_version": True}, "manifest format True"),
    "format_version-0": ({"format_version": 0}, "manifest format 0"),
    "dtype-evil": ({"dtype": "evil"}, "dtype 'evil'"),
    "tied-empty-name": ({"layers": {"": {"kind": "LowRankLinear", "rank": 4, "tied_to": "fc"}}}, "bad layer ''"),
    "tied-forward": ({"layers": {"forward": {"kind": "LowRankLinear", "rank": 4, "tied_to": "fc"}}}, "bad layer 'forward'"),
    "tied-class": ({"layers": {"__class__": {"kind": "LowRankLinear", "rank": 4, "tied_to": "fc"}}}, "bad layer '__class__'"),
    "layer-through-attribute": ({"layers": {"fc.training": {"kind": "LowRankLinear", "rank": 4}}}, "bad layer 'fc.training'"),
    "input_shape-zero": ({"input_shape": [1, 0, 32, 32]}, "bad input shape"),
    "input_shape-strings": ({"input_shape": ["1", "1", "32", "32"]}, "bad input shape"),
    "input_shape-overflow": ({"input_shape": [1, 2**70]}, "bad input shape"),
    "arch-type": ({"arch": ["torchvision:resnet18"]}, "is not a spec"),
    "huge-int": ({"x": "HUGEINT"}, "not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_every_bad_manifest_value_is_one_line_and_exit_2(work, run_cli, offline, case):
    changes, fragment = BAD_MANIFESTS[case]
    manifest = read_manifest(work / "digits.lrc.safetensors")
    if "layers" in changes:
        changes = {"layers": {**manifest["layers"], **changes["layers"]}}
    text = json.dumps({**manifest, **changes})
    text = text.replace('"DEEP"', _deep(100_000)).replace('"HUGEINT"', "9" * 5000)
    evil = work / "bad.lrc.safetensors"
    save_file(load_file(str(work / "digits.lrc.safetensors")), str(evil), metadata={MANIFEST_KEY: text})
    before = snapshot(work)
    assert_refused(run_cli("eval", evil, "--data", work / "data", "--workers", "0"), fragment)
    if case != "conv-on-linear":  # the whole manifest is checked before anything is built or shown
        assert_refused(run_cli("inspect", evil), fragment)
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"arch": SPEC, "arch_kwargs": "[1]"}, "not a JSON object"),
        ({"arch": SPEC, "arch_kwargs": _deep(100_000)}, "nested deeper than"),
        ({"arch": SPEC, "input_shape": "[1, 1, 0]"}, "bad input shape"),
        ({"arch": SPEC, "input_shape": "[1, 1, 20000, 20000]"}, "pass --input-shape"),
        ({"arch": SPEC, "mean": '["a"]'}, "bad mean"),
    ],
    ids=["kwargs-type", "kwargs-deep", "shape-zero", "shape-huge", "mean-type"],
)
def test_bad_plain_metadata_is_one_line_and_exit_2(work, run_cli, metadata, fragment):
    save_file(load_file(str(ASSET)), str(work / "bad.safetensors"), metadata=metadata)
    assert_refused(run_cli("inspect", work / "bad.safetensors"), fragment)


def test_an_image_error_in_a_loader_worker_still_names_the_file(work, run_cli):
    bomb = png_header(work / "data" / "val" / "0" / "bomb.png", 20000, 20000)
    result = run_cli("eval", work / "digits.lrc.safetensors", "--data", work / "data", "--workers", "1")
    assert_refused(result, str(bomb), "LRC_MAX_IMAGE_PIXELS")


def test_library_warnings_and_logs_stay_off_stderr(work, capfd, monkeypatch):
    from lowrank_compress.io import opening
    from lowrank_compress.cli import main

    own = logging.getLogger("some.library")  # a library logger with its own stderr handler, as torch's are
    monkeypatch.setattr(own, "handlers", [logging.StreamHandler(sys.stderr)])
    monkeypatch.setattr(own, "propagate", False)

    def noisy(*args, **kwargs):
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        logging.getLogger("timm.models").warning("a library log record")
        own.error("Traceback (most recent call last): a library's own handler")
        raise RuntimeError()  # no message at all: the line must still say something

    monkeypatch.setattr(opening, "open_model", noisy)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(work / "digits.lrc.safetensors"), "--data", str(work / "data")])
    _, err = capfd.readouterr()
    assert exit_info.value.code == 1 and err.strip() == "error: RuntimeError", err


def test_debug_shows_library_warnings(work, capfd, monkeypatch):
    from lowrank_compress.io import opening
    from lowrank_compress.cli import main

    def noisy(*args, **kwargs):
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        raise UsageError("bad")

    monkeypatch.setattr(opening, "open_model", noisy)
    with pytest.raises(SystemExit):
        main(["--debug", "eval", str(work / "digits.lrc.safetensors"), "--data", str(work / "data")])
    assert "a library warning" in capfd.readouterr().err


def test_a_build_warning_does_not_add_lines(work, capfd):
    from lowrank_compress.cli import main

    # googlenet warns (FutureWarning) while it is built; the mismatch with the digits weights is the one line.
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(work / "digits.pt"), "--arch", "torchvision:googlenet"])
    _, err = capfd.readouterr()
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not match the architecture" in err


def test_a_class_reached_through_an_allowed_module_must_be_defined_in_one(work, run_cli, offline):
    # lowrank_compress.examples.digits is allowed, and its attribute ``torch`` leads to every torch.nn class.
    evil = craft(work / "digits.lrc.safetensors", work / "evil.lrc.safetensors", arch="lowrank_compress.examples.digits:torch.nn.Linear",
                 arch_kwargs={"in_features": 4, "out_features": 4})
    assert_refused(run_cli("eval", evil, "--data", work / "data", "--workers", "0"), "a class defined in torch.nn")
