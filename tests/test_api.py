"""The public API: ``__all__`` is what the README's "Python API" section documents, and its example runs."""

from __future__ import annotations

import re
from pathlib import Path

import lowrank_compress

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Python API\n")
    return text[start:text.index("\n## ", start + 1)]


def test_the_public_api_is_ten_names_each_importable():
    assert len(lowrank_compress.__all__) == 10
    assert all(hasattr(lowrank_compress, name) for name in lowrank_compress.__all__)


def test_the_readme_documents_exactly_the_names_in_all():
    # each bullet starts with the names it documents: "- `compress(…)`" or "- `LowRankLinear`, `LowRankConv1d`, …"
    heads = re.findall(r"^- ((?:`\w+[^`]*`(?:, )?)+)", _section(), re.MULTILINE)
    documented = {name for head in heads for name in re.findall(r"`(\w+)", head)}
    assert documented == set(lowrank_compress.__all__)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", _section(), re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    assert (tmp_path / "small.lrc.safetensors").is_file()
    assert namespace["errors"]["nkp"] < namespace["errors"]["spectral"]
