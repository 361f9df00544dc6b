"""Shared fixtures: one intra-op thread per test, and the in-process CLI runner.

The tiny test models and the architecture table live in ``models.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models import CliResult, invoke_cli


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared with other jobs (and pytest-xdist workers): one intra-op thread per test,
    # restored afterwards so a test that changes it cannot leak into the next.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(request) -> Callable[..., CliResult]:
    """Run ``lrc`` in-process: ``run_cli("compress", path, ...)`` → exit code, stdout, stderr.

    Output is captured with capsys, or with capfd (what C++ code and logging handlers write to the
    file descriptors, as a terminal sees it) in tests marked ``fd_capture``.
    """
    capture = request.getfixturevalue("capfd" if request.node.get_closest_marker("fd_capture") else "capsys")

    def run(*args: str | Path) -> CliResult:
        return invoke_cli(capture, *args)

    return run


@pytest.fixture(scope="session")
def test_resnet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of timm's tiny test_resnet (10 classes): ``--arch timm:test_resnet --arch-kwargs '{"num_classes": 10}'``."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "test_resnet.pt"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), path)
    return path
