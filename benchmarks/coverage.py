"""Coverage: how many torchvision and timm architectures go through compress → save → load → forward.

    .venv/bin/python benchmarks/coverage.py                        # the whole list (about an hour on 2 cores)
    .venv/bin/python benchmarks/coverage.py --only timm:pit_ti_224 torchvision:swin_t
    .venv/bin/python benchmarks/coverage.py --method spectral --json coverage.json

For each architecture, with random weights and nothing downloaded, as a user would:

1. its state dict is written as ``.safetensors``;
2. ``lrc compress CKPT --arch SPEC --rank-ratio 0.5 --input-shape SHAPE -o OUT.lrc.safetensors``
   runs in-process (data-free; ``--method`` nkp by default);
3. ``lowrank_compress.load(OUT)`` rebuilds it from the manifest alone and runs one forward pass,
   whose outputs must be finite and shaped as the original model's.

SHAPE is the smallest input the model takes: 1×3×64×64, else (timm) the model rebuilt with
``img_size=64``, else its own default input size. Prints one line per architecture, the failures
with their errors, and the coverage figure "N of M architectures".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY = 64

# One or two per family, across both registries, the seven the coverage issue found failing
# (edgenext, xcit, eva02, swin_t, cait, pit, mnasnet) included.
ARCHITECTURES = [
    # torchvision
    "torchvision:alexnet", "torchvision:resnet18", "torchvision:resnet50", "torchvision:resnext50_32x4d",
    "torchvision:wide_resnet50_2", "torchvision:densenet121", "torchvision:googlenet", "torchvision:inception_v3",
    "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small", "torchvision:mnasnet0_5",
    "torchvision:shufflenet_v2_x0_5", "torchvision:squeezenet1_1", "torchvision:efficientnet_b0",
    "torchvision:efficientnet_v2_s", "torchvision:regnet_x_400mf", "torchvision:regnet_y_400mf",
    "torchvision:convnext_tiny", "torchvision:vgg11_bn", "torchvision:vit_b_32", "torchvision:swin_t",
    "torchvision:swin_v2_t", "torchvision:maxvit_t",
    # timm: convolutional
    "timm:resnet18", "timm:resnet50d", "timm:seresnext26d_32x4d", "timm:resnest14d", "timm:res2net50_14w_8s",
    "timm:skresnet18", "timm:densenet121", "timm:dla34", "timm:dpn48b", "timm:cspresnet50", "timm:cspdarknet53",
    "timm:ese_vovnet19b_dw", "timm:hrnet_w18_small", "timm:inception_v3", "timm:xception41",
    "timm:efficientnet_b0", "timm:tf_efficientnet_b0", "timm:efficientnetv2_rw_t", "timm:mobilenetv3_small_100",
    "timm:mobilenetv4_conv_small", "timm:mixnet_s", "timm:ghostnet_100", "timm:lcnet_050", "timm:rexnet_100",
    "timm:regnety_002", "timm:repvgg_a0", "timm:selecsls42b", "timm:nf_resnet26", "timm:tresnet_m",
    "timm:convnext_atto", "timm:convnextv2_atto", "timm:hgnetv2_b0", "timm:inception_next_tiny",
    "timm:rdnet_tiny", "timm:starnet_s1", "timm:mambaout_femto",
    # timm: attention, hybrids and MLPs
    "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224",
    "timm:beit_base_patch16_224", "timm:eva02_tiny_patch14_224", "timm:cait_xxs24_224", "timm:pit_ti_224",
    "timm:xcit_nano_12_p16_224", "timm:edgenext_xx_small", "timm:convit_tiny", "timm:crossvit_tiny_240",
    "timm:swin_tiny_patch4_window7_224", "timm:swinv2_cr_tiny_ns_224", "timm:levit_128s", "timm:mobilevit_xxs",
    "timm:mobilevitv2_050", "timm:maxvit_nano_rw_256", "timm:coatnet_nano_rw_224", "timm:coat_lite_tiny",
    "timm:twins_pcpvt_small", "timm:pvt_v2_b0", "timm:poolformer_s12", "timm:efficientformer_l1",
    "timm:efficientformerv2_s0", "timm:fastvit_t8", "timm:tiny_vit_5m_224", "timm:repvit_m1",
    "timm:efficientvit_b0", "timm:efficientvit_m0", "timm:gcvit_xxtiny", "timm:davit_tiny",
    "timm:focalnet_tiny_srf", "timm:mvitv2_tiny", "timm:hiera_tiny_224", "timm:nextvit_small", "timm:visformer_tiny",
    "timm:volo_d1_224", "timm:tnt_s_patch16_224", "timm:sequencer2d_s", "timm:mixer_s32_224",
    "timm:resmlp_12_224", "timm:gmlp_ti16_224", "timm:botnet26t_256", "timm:lambda_resnet26t",
]


@dataclass
class Result:
    arch: str
    ok: bool
    seconds: float
    input_shape: list[int] = field(default_factory=list)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    factorized: list[str] = field(default_factory=list)
    error: str | None = None


def _runs(model: nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not at this size"
        return False


def tiny_model(
    arch: str, arch_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any], tuple[int, ...]]:
    """The model with random weights, the kwargs that build it, and the smallest input it takes."""
    from lowrank_compress.io.archspec import build_model
    from lowrank_compress.io.dataconfig import default_input_shape

    kwargs = dict(arch_kwargs or {})
    torch.manual_seed(0)
    model = build_model(arch, kwargs).eval()
    for size in dict.fromkeys((TINY, kwargs.get("img_size", TINY))):
        if _runs(model, (1, 3, size, size)):
            return model, kwargs, (1, 3, size, size)
    tiny = (1, 3, TINY, TINY)
    if arch.startswith("timm:") and "img_size" not in kwargs:
        torch.manual_seed(0)
        try:
            smaller = build_model(arch, {**kwargs, "img_size": TINY}).eval()
        except Exception:  # noqa: BLE001 - the model has no img_size
            smaller = None
        if smaller is not None and _runs(smaller, tiny):
            return smaller, {**kwargs, "img_size": TINY}, tiny
    shape = default_input_shape(arch, model) or (1, 3, 224, 224)
    return model, kwargs, tuple(shape)


def check(arch: str, workdir: Path, arch_kwargs: dict[str, Any] | None = None, method: str = "nkp",
          rank_ratio: float = 0.5, load_with_arch: bool = False) -> Result:
    """Compress ``arch`` data-free through the CLI, load the output, run it; never raises.

    ``load_with_arch`` passes the spec and kwargs to ``load`` (for kwargs or a class a file may not name).
    """
    from safetensors.torch import save_model

    import lowrank_compress
    from lowrank_compress.io.format import read_manifest
    from lowrank_compress.modelrun import output_tensors
    from lowrank_compress.cli import main

    start = time.perf_counter()
    result = Result(arch, ok=False, seconds=0.0, arch_kwargs=dict(arch_kwargs or {}))
    stderr = io.StringIO()
    try:
        model, kwargs, shape = tiny_model(arch, arch_kwargs)
        result.input_shape, result.arch_kwargs = list(shape), kwargs
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = [t.shape for t in output_tensors(model(x), floating_only=False)]
        stem = arch.replace(":", "_").replace(".", "_")
        checkpoint, output = workdir / f"{stem}.safetensors", workdir / f"{stem}.lrc.safetensors"
        save_model(model, str(checkpoint))
        argv = ["compress", str(checkpoint), "--arch", arch, "--rank-ratio", str(rank_ratio), "--method", method,
                "--input-shape", ",".join(map(str, shape)), "-o", str(output), "--quiet"]
        if kwargs:
            argv += ["--arch-kwargs", json.dumps(kwargs)]
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except SystemExit as exc:
                if exc.code:
                    raise RuntimeError(f"lrc compress exit {exc.code}: {stderr.getvalue().strip()[-300:]}") from None
        result.factorized = sorted(read_manifest(output)["layers"])
        loaded = lowrank_compress.load(output, arch, kwargs) if load_with_arch else lowrank_compress.load(output)
        with torch.no_grad():
            got = output_tensors(loaded(x), floating_only=False)
        if [t.shape for t in got] != expected:
            shapes = [tuple(t.shape) for t in got]
            raise RuntimeError(f"output shapes {shapes}, expected {[tuple(s) for s in expected]}")
        if not all(torch.isfinite(t).all() for t in got):
            raise RuntimeError("non-finite outputs")
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - every failure is a data point
        result.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="Architectures to check instead of the whole list.")
    parser.add_argument("--method", default="nkp", help="nkp (default) or spectral.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    archs = args.only or ARCHITECTURES
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            result = check(arch, Path(tmp), method=args.method)
            results.append(result)
            status = "ok  " if result.ok else "FAIL"
            print(f"{status} {arch:45s} {str(tuple(result.input_shape)):18s} {result.seconds:7.1f} s", flush=True)
            for path in Path(tmp).iterdir():
                path.unlink()
    failed = [r for r in results if not r.ok]
    if failed:
        print("\nfailures:")
        for r in failed:
            print(f"  {r.arch}: {r.error}")
    print(f"\n{len(results) - len(failed)} of {len(results)} architectures: compress (data-free, --rank-ratio 0.5, "
          f"--method {args.method}) → save → load → forward")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
