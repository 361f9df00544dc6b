"""Hugging Face folders (``config.json`` + ``model.safetensors`` + tokenizer files) under the trust model.

A folder's ``config.json`` is data: the model is built from it by a class that ``transformers``
itself defines (``architectures[0]`` when it is one of the classes its Auto mappings name, else
the ``AutoModel`` class of its ``model_type``); ``trust_remote_code`` is never set, nothing is
downloaded (``HF_HUB_OFFLINE``), and weights come only from safetensors files, loaded strictly.
A timm Hub folder (``config.json`` with ``architecture``) is the timm registry model of that name.
The compressed file's manifest records the config (JSON), so :func:`model_from_manifest` rebuilds it
offline without the folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .checks import clip, is_int, parse_json

HINT = "Hugging Face folders need transformers: pip install 'lowrank-compress[hf]'"
# Config keys that name a path, a Hub repo or code; dropped before the config is built or recorded.
_DROPPED_KEYS = ("_name_or_path", "auto_map", "name_or_path", "transformers_version", "_commit_hash")
_MAX_CONFIG_BYTES = 2**20
_SHARD_NAME = re.compile(r"[\w.-]+\.safetensors")
_SAMPLE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "A short example sentence.")
MAX_TOKENS = 512


def require_transformers():
    """``transformers``, imported offline; a one-line UsageError with the install hint when absent."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(var, "1")
    try:
        import transformers
    except ImportError:
        raise UsageError(HINT) from None
    transformers.logging.set_verbosity_error()
    return transformers


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{path.parent} has no {path.name}; a Hugging Face folder needs one")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise UsageError(f"{path} is larger than {_MAX_CONFIG_BYTES:,} bytes; not a {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} ({exc})") from None
    value = parse_json(text, f"{path} is not a valid {what}")
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a valid {what} (not a JSON object)")
    return value


def folder_spec(folder: Path) -> tuple[str, dict[str, Any]]:
    """(``hf:DIR`` or ``timm:NAME``, timm kwargs) for a folder with a ``config.json``."""
    config = read_json_file(folder / "config.json", "model config")
    name = config.get("architecture")
    if isinstance(name, str) and "model_type" not in config:
        kwargs = {k: config[k] for k in ("num_classes", "in_chans") if isinstance(config.get(k), int)}
        return f"timm:{name}", kwargs
    return f"hf:{folder}", {}


@dataclass
class HFModel:
    """What a loaded Hugging Face model needs besides its module: the recipe and the tokenizer."""

    config: dict[str, Any]  # config.json as data, without paths or code references
    class_name: str
    input_names: list[str]
    task: str  # "causal-lm", "encoder" (returns last_hidden_state) or "other"
    tokenizer: Any = None
    max_length: int = MAX_TOKENS
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {"config": self.config, "class": self.class_name, "input_names": self.input_names,
                "task": self.task, "max_length": self.max_length}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask (and token types) of ``texts``, padded to the longest, truncated."""
        if self.tokenizer is None:
            raise UsageError("this model has no tokenizer here; text inputs need the model's Hugging Face folder")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: batch[k] for k in self.input_names if k in batch}

    def by_length(self, texts: list[str]) -> list[str]:
        """``texts`` sorted by token count (stable), so that batches of neighbours are padded little."""
        if self.tokenizer is None:
            raise UsageError("this model has no tokenizer here; text inputs need the model's Hugging Face folder")
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return [texts[i] for i in sorted(range(len(texts)), key=lambda i: len(ids[i]))]

    def example(self) -> dict[str, torch.Tensor]:
        """Inputs to trace with: the tokenizer's own on a sample sentence, else random token ids."""
        return self.tokenize(list(_SAMPLE_TEXTS[:1])) if self.tokenizer is not None else self.random_inputs(1, 8)

    def random_inputs(self, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random token ids (all positions real) of the model's input names."""
        gen = torch.Generator().manual_seed(seed)
        vocab = int(self.config.get("vocab_size") or 2)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen),
                  "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        if "token_type_ids" in self.input_names:
            inputs["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
        return {k: inputs[k] for k in self.input_names if k in inputs}


def _auto_classes(transformers) -> tuple[set[str], set[str]]:
    """(every model class named by transformers' Auto mappings, the causal-LM ones)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for value in mapping.values():
                names.update([value] if isinstance(value, str) else value)
    causal = {v for v in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if isinstance(v, str)}
    return names, causal


def _clean_config(config: dict[str, Any], source: Any) -> dict[str, Any]:
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UsageError(f"{source}: the Hugging Face config has no model_type")
    return {k: v for k, v in config.items() if k not in _DROPPED_KEYS}


def build_hf(config: dict[str, Any], class_name: str | None, source: Any,
             meta: bool = False) -> tuple[nn.Module, str, str]:
    """(model with random weights, class name, task) from a config dict; only transformers' own classes."""
    transformers = require_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    config = _clean_config(config, source)
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"{source}: transformers {transformers.__version__} does not know model_type "
                         f"{clip(model_type)} "
                         "(lrc never runs a model's own code: trust_remote_code is off)")
    allowed, causal = _auto_classes(transformers)
    name = class_name or next(iter(config.get("architectures") or []), None) or MODEL_MAPPING_NAMES.get(model_type)
    if not isinstance(name, str) or name not in allowed or not hasattr(transformers, name):
        raise UsageError(f"{source} names the model class {clip(name)}, which transformers does not define "
                         "(lrc never runs a model's own code: trust_remote_code is off)")
    cls = getattr(transformers, name)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UsageError(f"{source} names {clip(name)}, which is not a transformers model class")
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(config)
        hf_config.use_cache = False  # no key/value cache: blocks are re-run during calibration
        with torch.device("meta" if meta else "cpu"):
            model = cls._from_config(hf_config, attn_implementation="eager")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is bad input
        raise UsageError(f"{source}: cannot build {name} from its config ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None
    _linear_conv1d(model)
    task = "causal-lm" if name in causal else "encoder" if name in MODEL_MAPPING_NAMES.values() else "other"
    return model.eval(), name, task


def _linear_conv1d(model: nn.Module) -> None:
    """GPT-2-style ``Conv1D`` layers (a Linear with the weight transposed) as ``nn.Linear``, so the
    walker sees them; their weights are transposed when loaded (:func:`_transposed`)."""
    from transformers.pytorch_utils import Conv1D

    from ..modelrun import replace_module

    for module in [m for m in model.modules() if isinstance(m, Conv1D)]:
        w = module.weight
        linear = nn.Linear(module.nx, module.nf, device=w.device, dtype=w.dtype)
        linear.transposed_from_conv1d = True
        replace_module(model, module, linear)


def _transposed(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {f"{n}.weight" for n, m in model.named_modules() if getattr(m, "transposed_from_conv1d", False)}
    return {k: v.t().contiguous() if k in names and v.ndim == 2 else v for k, v in tensors.items()}


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = read_json_file(index, "safetensors index").get("weight_map")
        names = sorted(set(shards.values())) if isinstance(shards, dict) else []
        if not names or not all(isinstance(n, str) and _SHARD_NAME.fullmatch(n) for n in names):
            raise UsageError(f"{index} does not list safetensors shards of this folder")
        return [folder / n for n in names]
    raise UsageError(f"{folder} has no model.safetensors (lrc reads Hugging Face weights only from safetensors)")


def load_hf_weights(model: nn.Module, paths: list[Path], source: Any) -> None:
    """Load safetensors files strictly: every tensor used, every parameter filled (tied ones once)."""
    from safetensors.torch import load_file

    from .reading import read_safetensors_metadata

    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        read_safetensors_metadata(path)
        tensors.update(load_file(str(path)))
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not any(k in own for k in tensors) and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}  # a head model's file for its base model
    tensors = {k: v for k, v in tensors.items() if not (k.endswith("position_ids") and k not in own)}
    tensors = _transposed(model, tensors)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise UsageError(f"{source}: the weights do not fit the config ({' '.join(str(exc).split())[:200]})") from None
    loaded = {id(own[k]) for k in tensors if k in own}
    missing = [k for k in missing if id(own[k]) not in loaded]
    if missing or unexpected:
        raise UsageError(f"{source}: the weights do not fit the config (missing {clip(sorted(missing)[:4])}, "
                         f"unexpected {clip(sorted(unexpected)[:4])})")


def _tokenizer(transformers, folder: Path, task: str):
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    if not any((folder / f).is_file() for f in files):
        return None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - unreadable tokenizer files are bad input
        raise UsageError(f"{folder}: cannot read the tokenizer ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None
    if tok.pad_token is None:  # GPT-2 style tokenizers have none; padded positions are masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def _max_length(folder: Path, config: dict[str, Any], tokenizer) -> int:
    limits = [MAX_TOKENS, config.get("max_position_embeddings"), config.get("n_positions"),
              getattr(tokenizer, "model_max_length", None)]
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        limits.append(read_json_file(st, "sentence-transformers config").get("max_seq_length"))
    return min(v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0)


def _check_fits(config: dict[str, Any], files: list[Path], source: Path) -> None:
    """Refuse, before allocating it, a config that builds more weights than the files hold (built on
    the meta device): a strict load could never fill it."""
    from .reading import read_safetensors_metadata, safetensors_numel, state_numel

    for path in files:
        read_safetensors_metadata(path)
    have = sum(safetensors_numel(p) for p in files)
    if (needed := state_numel(build_hf(config, None, source, meta=True)[0])) > have:
        raise UsageError(f"{source} builds {needed:,} weights but the safetensors files hold {have:,}")


def open_hf(folder: Path, weights: list[Path] | None, source: Any) -> tuple[nn.Module, HFModel]:
    """The model of a Hugging Face folder with its weights (``weights``: the folder's own by default)."""
    transformers = require_transformers()
    config = _clean_config(read_json_file(folder / "config.json", "model config"), folder / "config.json")
    files = weights or _weight_files(folder)
    _check_fits(config, files, folder / "config.json")
    model, name, task = build_hf(config, None, folder / "config.json")
    load_hf_weights(model, files, source)
    tokenizer = _tokenizer(transformers, folder, task)
    names = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
    info = HFModel(config=config, class_name=name, input_names=names, task=task, tokenizer=tokenizer,
                   max_length=_max_length(folder, config, tokenizer))
    return model, info


def model_from_manifest(manifest: dict[str, Any], path: Any, meta: bool = False) -> tuple[nn.Module, HFModel]:
    """Rebuild the (random-weight) model a compressed file's ``hf`` manifest entry records."""
    hf = manifest.get("hf")
    if not isinstance(hf, dict) or not isinstance(hf.get("class"), str):
        raise UsageError(f"{path} names a Hugging Face architecture but its manifest has no valid 'hf' entry")
    names = hf.get("input_names")
    if not isinstance(names, list) or not all(isinstance(n, str) and n.isidentifier() for n in names) or len(names) > 8:
        raise UsageError(f"{path}: the manifest's hf input_names {clip(names)} are not a short list of names")
    model, name, task = build_hf(hf.get("config"), hf["class"], path, meta=meta)
    max_length = hf.get("max_length")
    return model, HFModel(config=_clean_config(hf["config"], path), class_name=name, input_names=names, task=task,
                          max_length=max_length if is_int(max_length) and 0 < max_length <= 2**16 else MAX_TOKENS)


def open_folder(path: Path, arch: str | None, arch_kwargs: dict[str, Any] | None,
                input_shape: tuple[int, ...] | None, open_model):
    """:func:`io.opening.open_model` for a folder (``lrc compress DIR``) or ``--arch hf:DIR``."""
    from .archspec import check_file_spec, file_kwargs
    from .records import LoadedModel

    if arch is not None and not arch.startswith("hf:"):  # the user's architecture, the folder's weights
        return open_model(path / "model.safetensors", arch, arch_kwargs, False, input_shape)
    if arch is None:
        spec, kwargs = folder_spec(path)
        if spec.startswith("timm:"):  # a timm Hub folder: the registry model, its weights from the folder
            source = path / "config.json"
            check_file_spec(spec, source)
            kwargs = {**file_kwargs(spec, kwargs, source), **(arch_kwargs or {})}
            return open_model(path / "model.safetensors", spec, kwargs, False, input_shape)
        folder, weights = path, None
    else:
        folder = Path(arch[3:])
        if not folder.is_dir():
            raise UsageError(f"--arch {arch}: {folder} is not a folder holding a Hugging Face config.json")
        weights = _weight_files(path) if path.is_dir() else [path]
        if not path.is_dir() and path.suffix != ".safetensors":
            raise UsageError(f"{path}: with --arch hf:DIR the weights must be a .safetensors file")
    model, info = open_hf(folder, weights, path)
    example = info.example()
    shape = input_shape or tuple(example["input_ids"].shape)
    return LoadedModel(model=model, arch=f"hf:{info.class_name}", input_shape=shape, hf=info)
