"""Running a model up to one layer, for the layer-by-layer calibration.

The calibrated job fits layers in order, each on the inputs it receives from the already
compressed upstream; these helpers get those inputs without re-running the whole model each time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .graph import LayerSite
from .modelrun import call_model, forward_with_hooks


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def enclosing_names(name: str) -> list[str]:
    """Enclosing module names, outermost first, without the root and the layer itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class LayerInputs:
    """Runs the model up to one layer per batch, re-entering at the innermost cached block.

    Compressing layers inside a block never changes that block's inputs, so once a pass has
    recorded the (args, kwargs) a block received, the next layers inside it are reached by calling
    the block alone instead of the whole model. Only blocks called exactly once per forward are
    cached; a cache is dropped as soon as the walk leaves its block.
    """

    def __init__(self, model: nn.Module, batches: list[Any], once: set[str]):
        self.model, self.batches, self.once = model, batches, once
        self.cache: dict[str, list[tuple[tuple, dict]]] = {}

    def run(self, site_name: str, module: nn.Module, capture) -> None:
        """Call ``capture(batch_index, layer_input, layer_output)`` for every batch."""
        ancestors = [a for a in enclosing_names(site_name) if a in self.once]
        self.cache = {k: v for k, v in self.cache.items() if k in ancestors}
        start = next((a for a in reversed(ancestors) if a in self.cache), None)
        deeper = ancestors[ancestors.index(start) + 1:] if start is not None else ancestors
        recorded: dict[str, list[tuple[tuple, dict]]] = {a: [] for a in deeper}
        for b, batch in enumerate(self.batches):
            handles = []
            for name in deeper:
                def pre(_m, args, kwargs, name=name):
                    recorded[name].append((_clone(args), _clone(kwargs)))

                handles.append(self.model.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))

            def stop(_m, inputs, output, b=b):
                capture(b, inputs[0], output)
                raise _Stop

            handles.append(module.register_forward_hook(stop))
            try:
                with torch.no_grad():
                    if start is None:
                        call_model(self.model, batch)
                    else:
                        args, kwargs = self.cache[start][b]
                        self.model.get_submodule(start)(*_clone(args), **_clone(kwargs))
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
        self.cache.update({k: v for k, v in recorded.items() if len(v) == len(self.batches)})


def called_once(model: nn.Module, sites: list[LayerSite], batch: Any) -> set[str]:
    """Enclosing blocks of the sites that run exactly once in a forward pass."""
    return modules_called_once(model, {a for s in sites for a in enclosing_names(s.name)}, batch)


def modules_called_once(model: nn.Module, names: set[str], batch: Any) -> set[str]:
    """The modules among ``names`` that run exactly once in a forward pass."""
    counts = dict.fromkeys(names, 0)

    def count(name: str):
        def hook(_m, _args, _output):
            counts[name] += 1

        return hook

    forward_with_hooks(model, [(model.get_submodule(n), count(n)) for n in names], batch)
    return {n for n, c in counts.items() if c == 1}
