"""Trials of other output weightings for all-MiniLM-L6-v2 at 50% of its Linear parameters.

    .venv/bin/python benchmarks/encoder_trials.py probes                    # Σ-weighted probes vs N(0, I)
    .venv/bin/python benchmarks/encoder_trials.py losses --steps 300 --lr 0.003
    .venv/bin/python benchmarks/encoder_trials.py losses --losses similarity --steps 300 --lr 0.003

(The wheels ``benchmarks/pretrained.py`` names must be installed.) The encoder's lost
nearest-neighbour agreement sits in the error along the directions where the embeddings of different
texts differ most (``benchmarks/pretrained.py --error-analysis``). These trials weight those directions
more and measure whether that helps. Every trial starts from the same setup as ``pretrained.py
--only encoder --variants network --encoder-policies target --encoder-calibration reference
--calib-samples 545``: network-aware compression on 545 language-reference paragraphs. Each trial
reports the nearest-neighbour agreement and mean cosine on the 449 query–document pairs.

- ``probes``: the Gauss–Newton probes that price each layer's rank, weight its rows and guide the
  fits draw v ~ N(0, Σ) instead of N(0, I). Σ is the covariance of the original's embeddings of the
  calibration texts, scaled to a mean variance of 1. Both runs compress without distillation, one
  after the other.
- ``losses``: from one compressed start, ``--steps`` distillation steps on new texts (the installed
  packages' docstrings, 64 a batch, ``--lr``, no early stop and no return to the best iterate, so
  that every loss trains for the same steps), with each loss in turn:
  - ``standardized``: ``lrc``'s own, squared error per feature over the feature's spread;
  - ``covariance``: E[(e' − e)ᵀ Σ (e' − e)] / E[(e − ē)ᵀ Σ (e − ē)], Σ the batch covariance of the
    original's embeddings;
  - ``similarity``: the squared error of the batch's centred similarity matrix (e'e'ᵀ against eeᵀ),
    relative to the original's.
  Each row also gives the held-out relative error (``lrc``'s standardized check) before and after.

These trials replace private functions of ``lowrank_compress.sensitivity`` and ``lowrank_compress.distill``
while they run. That is an experiment's tool, not an API.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pretrained_data as data
import pretrained

from lowrank_compress import CompressConfig, compress
from lowrank_compress import distill as distill_module
from lowrank_compress import sensitivity
from lowrank_compress.views import TextStream

LOSSES = ("standardized", "covariance", "similarity")


class Setup:
    """The encoder, its evaluation pairs and its calibration texts, as ``pretrained.py`` builds them."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.original, self.tokenizer, self.max_length = data.load_minilm()
        pairs = data.query_document_pairs()
        self.n_queries = len(pairs)
        texts = [q for q, _ in pairs] + [d for _, d in pairs]
        self.eval_batches = pretrained._text_batches(self.tokenizer, texts, self.max_length, 32)
        self.calib_texts = data.reference_calibration_texts(545, seed)
        self.calib = pretrained._text_batches(self.tokenizer, self.calib_texts, self.max_length, 16, by_length=True)
        self.example = data.tokenize(self.tokenizer, data.calibration_texts(2, seed + 1), self.max_length)
        total = sum(p.numel() for p in self.original.parameters())
        linear = sum(p.numel() for m in self.original.modules() if isinstance(m, torch.nn.Linear)
                     for p in m.parameters())
        self.policy = {"target_params": (total - 0.5 * linear) / total}
        self.reference = pretrained._batched(self.original, self.eval_batches)
        q, d = self.reference.split(self.n_queries)
        self.reference_top = (q @ d.T).argmax(-1)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        embeddings = pretrained._batched(model.eval(), self.eval_batches)
        q, d = F.normalize(embeddings, dim=-1).split(self.n_queries)
        top = (q @ d.T).argmax(-1)
        return {"nn_agreement": round(float((top == self.reference_top).float().mean()), 4),
                "cosine": round(float((F.normalize(embeddings, dim=-1) * self.reference).sum(-1).mean()), 4)}

    def compress(self) -> torch.nn.Module:
        model = copy.deepcopy(self.original)
        config = CompressConfig(seed=self.seed, distill_steps=0, **self.policy)
        model, _ = compress(model, config, self.example, calibration=self.calib)
        return model

    def embedding_covariance(self) -> torch.Tensor:
        with torch.no_grad():
            outputs = torch.cat([self.original(**b) for b in self.calib]).double()
        return torch.cov(outputs.T)


@contextlib.contextmanager
def covariance_probes(covariance: torch.Tensor) -> Iterator[None]:
    """Gauss–Newton probes v ~ N(0, Σ) (Σ scaled to a mean variance of 1) while inside."""
    values, vectors = torch.linalg.eigh(covariance)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    root = (root / covariance.diagonal().mean().sqrt()).float()  # v = z·root has covariance Σ / mean(diag Σ)
    own = sensitivity._probe_loss

    def probe_loss(outputs, metric, gen, mask):
        if metric == "kl":
            return own(outputs, metric, gen, mask)
        out = outputs[0]
        probe = torch.randn(out.shape, generator=gen, dtype=out.dtype) @ root
        return (out * probe).sum(), float(out.detach().double().pow(2).sum())

    sensitivity._probe_loss = probe_loss
    try:
        yield
    finally:
        sensitivity._probe_loss = own


def covariance_loss(student, teacher, metric, scales, mask) -> torch.Tensor:
    s, t = student[0].float(), teacher[0].float()
    centred = t - t.mean(0)
    cov = centred.T @ centred / len(t)
    error = s - t
    return ((error @ cov) * error).sum(-1).mean() / ((centred @ cov) * centred).sum(-1).mean()


def similarity_loss(student, teacher, metric, scales, mask) -> torch.Tensor:
    s, t = student[0].float(), teacher[0].float()
    diff = s @ s.T - t @ t.T
    diff = diff - diff.mean(1, keepdim=True)  # a shift of all of a query's scores changes no ranking
    centred = t - t.mean(0)
    return diff.pow(2).mean() / (centred @ centred.T).pow(2).mean()


class _NoReturn(distill_module.BestIterate):
    """Keeps the last iterate: every loss trains for the same steps."""

    def update(self, value: float) -> bool:
        super().update(value)
        return False

    def restore(self) -> None:
        for p in self.params:
            p.grad = None


@contextlib.contextmanager
def distillation_loss(name: str) -> Iterator[None]:
    own_loss, own_guard = distill_module._loss, distill_module.BestIterate
    if name != "standardized":
        distill_module._loss = {"covariance": covariance_loss, "similarity": similarity_loss}[name]
    distill_module.BestIterate = _NoReturn
    try:
        yield
    finally:
        distill_module._loss, distill_module.BestIterate = own_loss, own_guard


def run_probes(setup: Setup, log) -> list[dict[str, Any]]:
    rows = []
    covariance = setup.embedding_covariance()
    for name, context in (("N(0, I) (lrc's own)", contextlib.nullcontext()),
                          ("N(0, Σ)", covariance_probes(covariance))):
        start = time.perf_counter()
        with context:
            model = setup.compress()
        rows.append({"probes": name, **setup.measure(model), "seconds": round(time.perf_counter() - start)})
        log(f"probes {name}: {rows[-1]}")
    return rows


def run_losses(setup: Setup, losses: list[str], steps: int, lr: float, log) -> list[dict[str, Any]]:
    start_model = setup.compress()
    rows = [{"loss": "(start)", "steps": 0, **setup.measure(start_model)}]
    log(f"start: {rows[0]}")
    new_texts = data.package_texts(setup.seed + 1, exclude=set(setup.calib_texts))
    tokenize = lambda t: data.tokenize(setup.tokenizer, t, setup.max_length)  # noqa: E731
    by_length = lambda t: pretrained._by_length(setup.tokenizer, t, setup.max_length)  # noqa: E731
    for name in losses:
        stream = TextStream(new_texts, tokenize, by_length, 64, seed=setup.seed + 1)
        model = copy.deepcopy(start_model)
        held = [next(stream) for _ in range(2)]
        start = time.perf_counter()
        with distillation_loss(name):
            report = distill_module.distill(model, setup.original, setup.calib, "mse", steps, lr=lr, seed=setup.seed,
                                            held_out=held, stream=stream, patience=10**6)
        after = distill_module._Trainer(model, setup.original, "mse", [], held, {}, 0.0).held_metric()
        rows.append({"loss": name, "steps": report.steps, "lr": lr, **setup.measure(model),
                     "held_out_before": round(report.before, 4), "held_out_after": round(after, 4),
                     "seconds": round(time.perf_counter() - start)})
        log(f"loss {name}: {rows[-1]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trial", choices=("probes", "losses"))
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {', '.join(LOSSES)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if set(losses) - set(LOSSES):
        parser.error(f"--losses: choose from {', '.join(LOSSES)}")
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    setup = Setup(args.seed)
    rows = run_probes(setup, log) if args.trial == "probes" else run_losses(setup, losses, args.steps, args.lr, log)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if args.out is not None:
        args.out.write_text(json.dumps({"command": " ".join(["benchmarks/encoder_trials.py", *(argv or sys.argv[1:])]),
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
