"""Is the predicted output cost right? Compare it with the output metric measured directly.

    .venv/bin/python benchmarks/sensitivity.py            # the bundled digits CNN, KL of the softmax

For every layer and a few ranks, the layer alone is replaced by the linear response projection
that the rank curves price (the top-r directions of √α Σ √α, no per-row refit), the model is run on
the probe inputs, and the measured output metric (KL of the softmax against the original) is set
against the first-order prediction of :mod:`lowrank_compress.outputcost`. Prints one row per
(layer, rank), the Spearman rank correlation over all rows and the median measured/predicted ratio.
The rank allocation only needs the order of costs across layers and ranks to be right; the
correlation is the figure that matters.
"""

from __future__ import annotations

import argparse
import copy

import torch

from lowrank_compress.examples import digits
from lowrank_compress.calibration import probe_batches, prepare_calibrated
from lowrank_compress.compress import CompressConfig, _select
from lowrank_compress.graph import find_sites
from lowrank_compress.layers import from_dense
from lowrank_compress.methods import unfold_batchnorm
from lowrank_compress.modelrun import call_model, output_tensors, replace_module
from lowrank_compress.outputcost import row_weights
from lowrank_compress.responses import response_projection
from lowrank_compress.sensitivity import output_metric


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="calibration images (training split)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _, _ = digits.load_bundled()
    model.eval()
    x_train, _, _, _ = digits.load_digits_split(int(digits.bundled_metadata()["seed"]))
    batches = list(x_train[: args.samples].split(32))
    config = CompressConfig(target_params=0.5)
    sites, _ = _select(find_sites(model, batches[0][:1]), config)
    state, _ = prepare_calibrated(model, sites, config, batches[0][:1], batches)
    probe = probe_batches(batches)
    with torch.no_grad():
        reference = [output_tensors(call_model(model, b)) for b in probe]
    predicted, measured = [], []
    print(f"output metric: {state.metric}\n")
    print("| layer | rank | predicted | measured | ratio |")
    print("|---|---|---|---|---|")
    for site in sites:
        m = site.shape[0]
        alpha = row_weights(site, state.sensitivities.get(site.name))
        w, b = site.effective_weight()
        for r in sorted({max(1, m // 16), max(1, m // 4), max(1, m // 2)}):
            factors = response_projection(w.double(), None if b is None else b.double(),
                                          state.targets[site.name].stats, r, "identity", alpha)
            trial = copy.deepcopy(model)
            module = trial.get_submodule(site.name)
            replace_module(trial, module, from_dense(module, unfold_batchnorm(site, factors).to(torch.float32)))
            num, den = 0.0, 0.0
            with torch.no_grad():
                for batch, ref in zip(probe, reference):
                    n, d = output_metric(ref, output_tensors(call_model(trial, batch)), state.metric)
                    num, den = num + n, den + d
            got, want = num / den, float(state.costs[site.name][r])
            predicted.append(want)
            measured.append(got)
            print(f"| {site.name} | {r} | {want:.4g} | {got:.4g} | {got / max(want, 1e-30):.2f} |")
    ratios = torch.tensor(measured) / torch.tensor(predicted).clamp_min(1e-30)
    print(f"\nSpearman correlation (predicted vs measured, {len(measured)} rows): {_spearman(predicted, measured):.3f}")
    print(f"median measured/predicted: {float(ratios.median()):.2f}")


if __name__ == "__main__":
    main()
