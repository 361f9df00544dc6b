"""Hugging Face folders end to end, as real CLI processes, offline: a tiny BERT-style encoder and a tiny
GPT-2 causal LM (random weights, tokenizers built from files the tests write) go through
``lrc compress DIR --target-params 0.5 --calib texts``, ``lrc eval --texts``, ``lrc export --onnx``
and ``lowrank_compress.load``; bad folders give one line and exit 2 with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_folders import bert_folder, gpt2_folder, write_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("hf")


def lrc(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lowrank_compress", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    bert_folder(root)
    gpt2_folder(root)
    write_texts(root / "texts.txt")
    write_texts(root / "texts.jsonl", jsonl=True)
    return root


def _compress(root: Path, name: str, texts: str) -> Path:
    done = lrc("compress", name, "--target-params", "0.5", "--calib", texts, "--refine-steps", "20",
               "--json", f"{name}.json", "-q", cwd=root)
    assert done.returncode == 0, done.stderr
    report = json.loads((root / f"{name}.json").read_text())
    assert report["params_after"] <= 0.5 * report["params_before"] + 1
    return root / f"{name}.lrc.safetensors"


def _export(root: Path, model: Path, name: str) -> dict:
    done = lrc("export", model, "--onnx", f"{name}.onnx", "--json", f"{name}-onnx.json", cwd=root)
    assert done.returncode == 0, done.stderr
    parity = json.loads((root / f"{name}-onnx.json").read_text())
    assert parity["passed"] and parity["max_rel_error"] < 1e-4
    import onnx

    graph = onnx.load(str(root / f"{name}.onnx")).graph
    for value in [*graph.input, *graph.output]:
        assert [d.dim_param for d in value.type.tensor_type.shape.dim][:2] == ["batch", "sequence"]
    return parity


@pytest.mark.slow
def test_bert_folder_end_to_end(folders):
    done = lrc("inspect", "tiny-bert", "--json", "bert-layers.json", cwd=folders)
    assert done.returncode == 0, done.stderr
    assert json.loads((folders / "bert-layers.json").read_text())["arch"] == "hf:BertModel"
    out = _compress(folders, "tiny-bert", "texts.txt")
    done = lrc("eval", out, "--texts", "texts.txt", "--reference", "tiny-bert", "--json", "bert-eval.json",
               "--min-cosine", "0.5", cwd=folders)
    assert done.returncode == 0, done.stderr
    result = json.loads((folders / "bert-eval.json").read_text())
    assert result["task"] == "embedding" and result["samples"] == 12
    assert 0.5 <= result["cosine_mean"] <= 1.0 + 1e-6 and 0.0 <= result["nn_agreement"] <= 1.0
    parity = _export(folders, out, "bert")
    assert parity["input_names"] == ["input_ids", "token_type_ids", "attention_mask"]

    import lowrank_compress
    from lowrank_compress.layers import LowRankLinear

    model = lowrank_compress.load(out)
    assert type(model).__name__ == "BertModel" and any(isinstance(m, LowRankLinear) for m in model.modules())
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()


@pytest.mark.slow
def test_gpt2_folder_end_to_end(folders):
    out = _compress(folders, "tiny-gpt2", "texts.jsonl")
    done = lrc("eval", out, "--texts", "texts.txt", "--reference", "tiny-gpt2", "--json", "gpt-eval.json",
               "--max-kl", "0", cwd=folders)
    assert done.returncode == 3, done.stderr  # a gate missed: exit 3, the report still written
    assert "kl" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    result = json.loads((folders / "gpt-eval.json").read_text())
    assert result["task"] == "causal-lm" and result["tokens"] > 100
    assert result["perplexity"] > 1 and result["kl"] >= 0 and 0 <= result["top1_agreement"] <= 1
    parity = _export(folders, out, "gpt")
    assert parity["output_names"] == ["logits"]

    import lowrank_compress

    model = lowrank_compress.load(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)


def test_eval_folder_against_itself_and_inapplicable_gate(folders):
    done = lrc("eval", "tiny-gpt2", "--texts", "texts.jsonl", "--json", "self.json", "--min-cosine", "0.9", cwd=folders)
    assert done.returncode == 2 and "does not apply" in done.stderr
    assert not (folders / "self.json").exists()
    done = lrc("eval", "tiny-gpt2", "--texts", "texts.jsonl", "--json", "self.json", "--max-perplexity-ratio", "1.0",
               cwd=folders)
    assert done.returncode == 0, done.stderr
    result = json.loads((folders / "self.json").read_text())
    assert result["kl"] == 0 and result["top1_agreement"] == 1 and result["perplexity_ratio"] == 1


def _bad_folder(root: Path, name: str, config: dict, weights_from: Path | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights_from is not None:
        (folder / "model.safetensors").write_bytes((weights_from / "model.safetensors").read_bytes())
    return folder


def test_bad_folders_one_line_exit_2(folders, tmp_path):
    bert_config = json.loads((folders / "tiny-bert" / "config.json").read_text())
    cases = {
        "remote": ({**bert_config, "architectures": ["EvilModel"], "auto_map": {"AutoModel": "evil.EvilModel"}}, True),
        "unknown-type": ({"model_type": "no-such-model", "architectures": ["BertModel"]}, True),
        "no-weights": (bert_config, False),
        "wrong-shapes": ({**bert_config, "hidden_size": 64, "intermediate_size": 128}, True),
        "huge": ({**bert_config, "hidden_size": 65536, "intermediate_size": 262144}, True),  # refused before allocating
    }
    for name, (config, weights) in cases.items():
        _bad_folder(tmp_path, name, config, folders / "tiny-bert" if weights else None)
        done = lrc("compress", name, "--rank", "2", cwd=tmp_path)
        assert done.returncode == 2, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (name, done.stderr)
        assert not (tmp_path / f"{name}.lrc.safetensors").exists()
    assert "trust_remote_code" in lrc("compress", "remote", "--rank", "2", cwd=tmp_path).stderr


def test_text_calibration_needs_a_tokenizer_folder(tmp_path):
    from lowrank_compress.calibdata import calibration_batches, read_texts
    from lowrank_compress.errors import UsageError

    texts = write_texts(tmp_path / "t.txt")
    with pytest.raises(UsageError, match="Hugging Face folder"):
        calibration_batches(str(texts), (1, 8), {}, 4, 2)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        read_texts(tmp_path / "bad.jsonl")
    assert read_texts(texts, 3) == [line for line in texts.read_text().splitlines()][:3]


def test_tokenized_calibration_masks_padding(folders):
    from lowrank_compress.calibdata import text_batches
    from lowrank_compress.io.opening import open_model

    loaded = open_model(folders / "tiny-bert")
    assert loaded.arch == "hf:BertModel" and loaded.hf.task == "encoder"
    batches = text_batches(str(folders / "texts.txt"), loaded.hf, 5, 4)
    assert [len(b["input_ids"]) for b in batches] == [4, 1]
    mask = batches[0]["attention_mask"]
    assert mask.shape == batches[0]["input_ids"].shape
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask"}


def test_text_calibration_batches_texts_of_similar_length(folders, tmp_path):
    from lowrank_compress.calibdata import text_batches
    from lowrank_compress.io.opening import open_model

    hf = open_model(folders / "tiny-bert").hf
    # Long and short texts alternate in the file: in file order every batch would be half padding.
    texts = [("word " * (40 if i % 2 else 3)).strip() + f" {i}" for i in range(16)]
    (tmp_path / "mixed.txt").write_text("\n".join(texts) + "\n")
    batches = text_batches(str(tmp_path / "mixed.txt"), hf, 16, 4)
    in_file_order = [hf.tokenize(texts[i:i + 4]) for i in range(0, 16, 4)]
    positions = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real == sum(int(b["attention_mask"].sum()) for b in in_file_order)  # every token of every text
    assert positions < 0.65 * sum(b["input_ids"].numel() for b in in_file_order)
    counts = [b["attention_mask"].sum(1) for b in batches]
    assert all(c.max() <= d.min() for c, d in zip(counts, counts[1:]))  # batches in order of length


def test_timm_hub_folder_maps_to_the_registry(tmp_path):
    import timm
    from safetensors.torch import save_file

    from lowrank_compress.io.opening import open_model

    model = timm.create_model("resnet10t", num_classes=7)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 7}))
    loaded = open_model(tmp_path)
    assert loaded.arch == "timm:resnet10t" and loaded.arch_kwargs["num_classes"] == 7
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_missing_transformers_is_a_one_line_hint(monkeypatch, tmp_path):
    from lowrank_compress.errors import UsageError
    from lowrank_compress.io import hf

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"pip install 'lowrank-compress\[hf\]'"):
        hf.require_transformers()


def test_arch_hf_dir_takes_the_weights_from_the_checkpoint(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    from lowrank_compress.errors import UsageError
    from lowrank_compress.io.opening import open_model

    tensors = load_file(str(folders / "tiny-bert" / "model.safetensors"))
    tensors["embeddings.word_embeddings.weight"] = torch.zeros_like(tensors["embeddings.word_embeddings.weight"])
    save_file(tensors, str(tmp_path / "finetuned.safetensors"))
    loaded = open_model(tmp_path / "finetuned.safetensors", f"hf:{folders / 'tiny-bert'}")
    assert loaded.arch == "hf:BertModel" and not loaded.model.embeddings.word_embeddings.weight.any()
    with pytest.raises(UsageError, match="must be a .safetensors"):
        open_model(folders / "texts.txt", f"hf:{folders / 'tiny-bert'}")


def test_a_text_stream_yields_each_text_once_in_batches_of_similar_length():
    from lowrank_compress.views import TextStream

    texts = [("word " * (1 + (7 * i) % 23)).strip() + f" {i}" for i in range(50)]
    stream = TextStream(texts, tokenize=list, by_length=lambda t: sorted(t, key=len), batch_size=4, seed=3)
    batches = list(stream)
    assert len(stream) == 13 and sorted(len(b) for b in batches) == [2] + [4] * 12
    assert sorted(t for b in batches for t in b) == sorted(texts)  # each text once
    for start in range(0, 13, 8):  # each run of 8 batches is cut from one list sorted by length ...
        spans = sorted((min(map(len, b)), max(map(len, b))) for b in batches[start:start + 8])
        assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:]))
    lengths = [max(map(len, b)) for b in batches[:8]]
    assert lengths != sorted(lengths)  # ... and comes in random order: the first are not the shortest
    assert list(stream) == []  # one-shot: distillation's steps end when it runs out
    again = list(TextStream(texts, list, lambda t: sorted(t, key=len), 4, seed=3))
    other = list(TextStream(texts, list, lambda t: sorted(t, key=len), 4, seed=4))
    assert again == batches and other != batches


@pytest.mark.slow
@pytest.mark.parametrize("samples", [40, 120])
def test_lrc_compress_distills_on_the_texts_calibration_did_not_read(folders, tmp_path, samples):
    # 200 texts: with --calib-samples 40 calibration reads the first 40 and distillation trains on
    # the other 160, each once (2 batches of 5 are its held-out check, so 30 steps); with 120 there
    # are too few left over, and distillation trains on the calibration texts.
    from hf_folders import WORDS

    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=gen))
             for n in torch.randint(3, 14, (200,), generator=gen)]
    (tmp_path / "many.txt").write_text("\n".join(lines) + "\n")
    done = lrc("compress", folders / "tiny-bert", "--target-params", "0.5", "--calib", "many.txt",
               "--calib-samples", str(samples), "--refine-steps", "5", "--block-steps", "0",
               "--distill-steps", "100", "--distill-lr", "0.01", "-o", "c.lrc.safetensors", "--json", "r.json", "-q",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    distilled = json.loads((tmp_path / "r.json").read_text())["distillation"]
    if samples == 40:
        assert distilled["inputs"] == "the 160 texts of many.txt after the first 40, each once"
        assert distilled["steps"] == 30 and distilled["batch_size"] == 5
    else:
        assert distilled["inputs"] == "calibration inputs"
    assert distilled["metric"] == "mse" and distilled["after"] <= distilled["before"]
