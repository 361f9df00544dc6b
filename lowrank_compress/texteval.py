"""Label-free agreement of a (compressed) Hugging Face text model with its original on a text file.

Encoders (a model returning ``last_hidden_state``): each text's embedding is the mean of its real
tokens' hidden states (the attention mask excludes padding), L2-normalized, as sentence-transformers
pools. ``cosine_mean`` / ``cosine_min``: the cosine between a text's original and compressed
embeddings; ``nn_agreement``: the fraction of texts whose nearest other text (by cosine) is the
same under both models.

Causal language models (a model returning ``logits``): over every real next-token position,
``perplexity`` and ``reference_perplexity`` (exp of the mean negative log-likelihood of the text's
own next tokens), ``kl`` (mean KL(original ‖ compressed) of the next-token distributions, nats)
and ``top1_agreement`` (the fraction of positions where both predict the same next token).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BudgetExceeded, UsageError
from .modelrun import call_model
from .textexport import first_output

GATES = {"min_cosine": "cosine_mean", "min_agreement": None, "max_kl": "kl", "max_perplexity_ratio": "perplexity_ratio"}


def _outputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_output(call_model(model, b)).double() for b in batches]


def embedding_agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor],
                        masks: list[torch.Tensor]) -> dict[str, Any]:
    def pooled(states: list[torch.Tensor]) -> torch.Tensor:
        rows = [(s * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1) for s, m in zip(states, masks)]
        return F.normalize(torch.cat(rows), dim=-1)

    ref, new = pooled(reference), pooled(candidate)
    cosine = (ref * new).sum(-1)
    result = {"task": "embedding", "samples": len(ref), "cosine_mean": float(cosine.mean()),
              "cosine_min": float(cosine.min())}
    if len(ref) > 1:
        eye = torch.eye(len(ref), dtype=torch.bool)
        same = (ref @ ref.T).masked_fill(eye, -2).argmax(-1) == (new @ new.T).masked_fill(eye, -2).argmax(-1)
        result["nn_agreement"] = float(same.double().mean())
    return result


def lm_agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor],
                 batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    nll_ref = nll_new = kl = same = 0.0
    count = 0
    for ref, new, batch in zip(reference, candidate, batches):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
        real = (mask[:, 1:] & mask[:, :-1]).reshape(-1)
        target = ids[:, 1:].reshape(-1)[real]
        lp_ref = F.log_softmax(ref[:, :-1].reshape(-1, ref.shape[-1])[real], -1)
        lp_new = F.log_softmax(new[:, :-1].reshape(-1, new.shape[-1])[real], -1)
        nll_ref -= float(lp_ref.gather(1, target[:, None]).sum())
        nll_new -= float(lp_new.gather(1, target[:, None]).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp_new)).sum())
        same += float((lp_ref.argmax(-1) == lp_new.argmax(-1)).sum())
        count += int(real.sum())
    if count == 0:
        raise UsageError("the texts give no next-token positions (each needs at least two tokens)")
    ppl, ppl_ref = torch.tensor(nll_new / count).exp().item(), torch.tensor(nll_ref / count).exp().item()
    return {"task": "causal-lm", "tokens": count, "perplexity": ppl, "reference_perplexity": ppl_ref,
            "perplexity_ratio": ppl / ppl_ref, "kl": kl / count, "top1_agreement": same / count}


def text_agreement(reference: nn.Module, candidate: nn.Module, hf: Any, texts: list[str],
                   batch_size: int = 16) -> dict[str, Any]:
    """Agreement of ``candidate`` with ``reference`` on ``texts`` (see the module docstring); ``hf``
    (``io.hf.HFModel`` of the reference folder) tokenizes them and says the task."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if hf.task not in ("causal-lm", "encoder"):
        raise UsageError(f"lrc eval on texts takes an encoder or a causal language model, not a {hf.class_name}")
    texts = hf.by_length(texts)  # every figure is over all texts: their order is free, padding is not
    batches = [hf.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    ref = _outputs(reference.eval(), batches)
    new = ref if candidate is reference else _outputs(candidate.eval(), batches)
    if any(r.shape != n.shape for r, n in zip(ref, new)):
        raise UsageError(f"the models' outputs differ in shape ({tuple(ref[0].shape)} vs {tuple(new[0].shape)}): "
                         "not a compressed form of this reference")
    if hf.task == "causal-lm":
        return lm_agreement(ref, new, batches)
    masks = [b.get("attention_mask", torch.ones(b["input_ids"].shape)).double() for b in batches]
    return embedding_agreement(ref, new, masks)


def gate_checks(task: str, gates: dict[str, float | None]) -> list[tuple[str, float, bool]]:
    """(result key, budget, whether it is a minimum) of each gate given; a gate that does not apply to
    the model's ``task`` (``encoder`` or ``causal-lm``) is a UsageError, raised before any work."""
    checks = []
    for gate, value in gates.items():
        if value is None:
            continue
        if not (value >= 0 and value == value):
            raise UsageError(f"--{gate.replace('_', '-')} must be a number ≥ 0, got {value}")
        key = GATES[gate] or ("nn_agreement" if task == "encoder" else "top1_agreement")
        if (key in ("kl", "perplexity_ratio")) != (task == "causal-lm"):
            raise UsageError(f"--{gate.replace('_', '-')} does not apply to a {task} model")
        checks.append((key, value, gate.startswith("min")))
    return checks


def check_gates(result: dict[str, Any], checks: list[tuple[str, float, bool]]) -> None:
    """Raise BudgetExceeded (exit 3) for the first gate of :func:`gate_checks` the result misses."""
    for key, value, minimum in checks:
        if key in result and ((result[key] < value) if minimum else (result[key] > value)):
            raise BudgetExceeded(f"{key} {result[key]:.4f} {'<' if minimum else '>'} budget {value:.4f}")
