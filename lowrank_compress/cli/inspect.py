"""``lrc inspect``: the candidate layers of a model, or the manifest of a compressed file."""

from __future__ import annotations

from pathlib import Path

import rich.markup
import typer

from .app import app, console, out
from ..io.checks import require_input_shape


@app.command("inspect")
def inspect_command(
    checkpoint: Path = typer.Argument(..., help="A state dict (.safetensors/.pt/.pth/.bin) with --arch, or a .lrc.safetensors."),
    arch: str | None = typer.Option(None, "--arch", help="torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Example input shape to trace at, e.g. 1,3,224,224 \\[default: from the arch config]."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that holds a pickled model (runs code from the file)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the table as JSON here."),
) -> None:
    """List every candidate layer: kind, shape, activation found, params, max useful rank, eligibility."""
    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..io.opening import open_model
    from ..io.reading import read_safetensors_metadata
    from ..io.files import check_distinct_paths, check_writable, write_json
    from ..io.format import MANIFEST_KEY, read_manifest
    from .render import manifest_table, sites_table

    check_distinct_paths({"CHECKPOINT": checkpoint}, {"--json": json_path})
    if json_path is not None:
        check_writable(json_path)
    shape = parse_input_shape(input_shape)
    if checkpoint.suffix == ".safetensors" and MANIFEST_KEY in read_safetensors_metadata(checkpoint):
        manifest = read_manifest(checkpoint)
        title = f"{checkpoint.name}: {manifest.get('arch')}, method {manifest.get('method')}, input {manifest.get('input_shape')}"
        out.print(manifest_table(manifest, rich.markup.escape(title)))
        data: dict = {"manifest": manifest}
    else:
        import torch

        from ..graph import find_sites
        from ..modelrun import model_dtype

        loaded = open_model(checkpoint, arch, parse_arch_kwargs(arch_kwargs), trust_pickle, shape)
        require_input_shape(loaded.input_shape, None, checkpoint)
        dtype = model_dtype(loaded.model)
        example = loaded.hf.example() if loaded.hf is not None else torch.randn(loaded.input_shape).to(dtype)
        sites = find_sites(loaded.model, example)
        out.print(sites_table(sites, rich.markup.escape(f"{checkpoint.name} ({loaded.arch}) at input {tuple(loaded.input_shape)}")))
        if loaded.arch_note:
            console.print(loaded.arch_note, highlight=False, soft_wrap=True, markup=False)
        data = {"arch": loaded.arch, "input_shape": list(loaded.input_shape), "layers": [s.describe() for s in sites]}
    if json_path is not None:
        write_json(data, json_path, sort_keys=True, final_newline=False)
