"""Fine-tuning, distillation, checkpoints/resume, DDP and recipes (lowrank_compress.train, .recipes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from lowrank_compress.examples import digits
from lowrank_compress.io import format as lrc_format
from lowrank_compress.io.opening import open_model
from lowrank_compress.errors import LrcError, UsageError
from lowrank_compress.evaluate import evaluate_folder
from lowrank_compress.layers import LOW_RANK_TYPES, from_dense
from lowrank_compress.factors import flatten_weight
from lowrank_compress.projection import spectral_factors
from lowrank_compress.recipes import TrainConfig, dump_recipe, load_recipe, resolve_options, validate_recipe
from lowrank_compress.losses import distillation_loss
from lowrank_compress.train import finetune
from lowrank_compress.training.parts import frobenius_penalty, lr_schedule, parameter_groups
from lowrank_compress.training.state import load_checkpoint, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))



def _factorize(model: nn.Module, rank: int) -> nn.Module:
    """Replace every hidden conv / linear (not the stem or the head) by its rank-``rank`` SVD factors."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in ("stem.conv", "head"):
            parent, _, child = name.rpartition(".")
            factors = spectral_factors(flatten_weight(module.weight.detach()), rank)
            setattr(model.get_submodule(parent) if parent else model, child, from_dense(module, factors))
    return model


def _save_compressed(model: nn.Module, path: Path) -> Path:
    mean, std = digits.normalization()
    lrc_format.save(model, path, arch=digits.ARCH_SPEC, input_shape=list(digits.INPUT_SHAPE),
                       data_config={"mean": list(mean), "std": list(std)})
    return path


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits split as PNGs at 32×32: train/<digit>/ (1257 images) and val/<digit>/ (540)."""
    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = digits.load_digits_split(seed=0, size=32)
    digits.write_image_folder(root, x_train, y_train, "train")
    digits.write_image_folder(root, x_test, y_test, "val")
    return root


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """192 training and 64 validation digits at 32×32: 6 steps per epoch at batch 32."""
    root = tmp_path_factory.mktemp("small")
    x_train, y_train, x_test, y_test = digits.load_digits_split(seed=0, size=32)
    digits.write_image_folder(root, x_train[:192], y_train[:192], "train")
    digits.write_image_folder(root, x_test[:64], y_test[:64], "val")
    return root


@pytest.fixture(scope="module")
def compressed_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped digits model with its hidden layers cut to rank 4 (accuracy falls from ~99% to ~20–40%)."""
    teacher = open_model(digits.bundled_checkpoint_path()).model
    return _save_compressed(_factorize(teacher, 4), tmp_path_factory.mktemp("student") / "student.lrc.safetensors")


def _config(**overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=32, lr=0.02, workers=0, log_every=2, min_crop_scale=0.5, hflip=0.0)
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------- end to end


def test_distillation_recovers_a_compressed_models_accuracy(digits_dir: Path, compressed_teacher: Path, tmp_path: Path, run_cli) -> None:
    before = evaluate_folder(lrc_format.load_compressed(compressed_teacher), digits_dir, workers=0)["top1"]
    out = tmp_path / "tuned.lrc.safetensors"
    log = tmp_path / "log.jsonl"
    argv = ["finetune", str(compressed_teacher), "--teacher", str(digits.bundled_checkpoint_path()),
            "--data", str(digits_dir), "--epochs", "1", "--batch-size", "32", "--lr", "0.02", "--warmup-steps", "5",
            "--kd-temperature", "2", "--label-smoothing", "0.1", "--workers", "0", "--min-crop-scale", "0.5",
            "--hflip", "0", "--log", str(log), "--quiet", "-o", str(out)]
    assert run_cli(*argv).code == 0
    after = evaluate_folder(lrc_format.load_compressed(out), digits_dir, workers=0)["top1"]
    assert after >= before + 0.3, (before, after)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    assert {"loss", "lr", "images_per_s"} <= set(next(r for r in records if r["event"] == "step"))
    assert abs(next(r for r in records if r["event"] == "epoch")["val_top1"] - after) < 1e-9


def test_the_output_keeps_the_factorized_structure_and_input_size(small_dir: Path, compressed_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.lrc.safetensors"
    finetune(lrc_format.load_compressed(compressed_teacher), small_dir, out, _config(epochs=1, max_steps=1), show_progress=False)
    loaded = lrc_format.load_compressed(out)
    assert sum(isinstance(m, LOW_RANK_TYPES) for m in loaded.model.modules()) == 6
    assert loaded.input_shape == digits.INPUT_SHAPE
    assert loaded.data_config.mean == (digits.DIGITS_MEAN,)


def test_an_original_checkpoint_with_arch_is_written_with_its_arch(small_dir: Path, tmp_path: Path, run_cli) -> None:
    dense = tmp_path / "dense.pt"
    torch.save(digits.DigitsCNN().state_dict(), dense)
    out = tmp_path / "out.lrc.safetensors"
    argv = ["finetune", str(dense), "--arch", digits.ARCH_SPEC, "--input-shape", "1,1,32,32", "--no-teacher",
            "--data", str(small_dir), "--batch-size", "32", "--max-steps", "1", "--workers", "0", "--quiet", "-o", str(out)]
    assert run_cli(*argv).code == 0
    manifest = lrc_format.read_manifest(out)
    assert manifest["arch"] == digits.ARCH_SPEC and manifest["input_shape"] == [1, 1, 32, 32]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--no-teacher"),
        (["--no-teacher", "--teacher", "x.pt"], "exclude each other"),
        (["--no-teacher", "--rank-ratio", "0.1"], "only apply with --from-scratch"),
    ],
)
def test_teacher_options_are_checked(small_dir: Path, compressed_teacher: Path, tmp_path: Path, extra, message, run_cli) -> None:
    argv = ["finetune", str(compressed_teacher), "--data", str(small_dir), "-o", str(tmp_path / "o.lrc.safetensors"), *extra]
    result = run_cli(*argv)
    assert result.code == 2 and message in result.err


def test_a_nan_loss_stops_the_run_naming_the_step(small_dir: Path, compressed_teacher: Path, tmp_path: Path) -> None:
    student = lrc_format.load_compressed(compressed_teacher)
    calls = {"train": 0}

    def poison(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if module.training:
            calls["train"] += 1
            if calls["train"] == 3:
                return output * float("nan")
        return output

    student.model.register_forward_hook(poison)
    out = tmp_path / "out.lrc.safetensors"
    with pytest.raises(LrcError, match="NaN or Inf at step 3"):
        finetune(student, small_dir, out, _config(), checkpoint_dir=tmp_path / "ckpt", show_progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- checkpoints and resume


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_a_run_stopped_mid_epoch_and_resumed_matches_an_uninterrupted_run(
    small_dir: Path, compressed_teacher: Path, tmp_path: Path
) -> None:
    # On CPU: bit-exact equality needs deterministic kernels, which CUDA's cuDNN autotuning does not promise.
    teacher = open_model(digits.bundled_checkpoint_path()).model
    config = _config(ema=0.9, clip_grad=1.0, frobenius_decay=1e-3, label_smoothing=0.1, warmup_steps=3, checkpoint_every=4)

    def run(name: str, resume: bool = False, **overrides) -> Path:
        out = tmp_path / f"{name}.lrc.safetensors"
        finetune(lrc_format.load_compressed(compressed_teacher), small_dir, out, _config(**{**vars(config), **overrides}),
                 teacher=teacher, checkpoint_dir=tmp_path / name, resume=resume, device="cpu", show_progress=False)
        return out

    full = run("full")
    stopped = run("split", max_steps=8)  # epoch 2, batch 2 of 6
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 8)
    with pytest.raises(AssertionError):
        _assert_same_weights(full, stopped)
    # The resumed half runs with loader workers: augmentation is seeded per sample, so it sees the same batches.
    resumed = run("split", resume=True, workers=2)
    _assert_same_weights(full, resumed)


def test_a_killed_run_resumes_to_the_same_weights(small_dir: Path, compressed_teacher: Path, tmp_path: Path, run_cli) -> None:
    def argv(name: str) -> list[str]:
        return ["finetune", str(compressed_teacher), "--no-teacher", "--data", str(small_dir), "--epochs", "4", "--device", "cpu",
                "--batch-size", "32", "--lr", "0.02", "--workers", "0", "--min-crop-scale", "0.5",
                "--checkpoint-dir", str(tmp_path / name), "--checkpoint-every", "2", "--log-file", str(tmp_path / f"{name}.jsonl"),
                "--quiet", "-o", str(tmp_path / f"{name}.lrc.safetensors")]

    assert run_cli(*argv("full")).code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lowrank_compress", *argv("killed")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()  # SIGKILL: no handler runs, whatever step it was in
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert load_checkpoint(checkpoint)["global_step"] < 24
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line)["event"] for line in (tmp_path / "killed.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "resume" in events and events[-1] == "end"
    _assert_same_weights(tmp_path / "full.lrc.safetensors", tmp_path / "killed.lrc.safetensors")


def test_checkpoints_load_without_unpickling_code(tmp_path: Path) -> None:
    torch.manual_seed(3)
    state = rng_state()
    path = tmp_path / "rng.pt"
    torch.save({"rng": state}, path)
    expected = torch.rand(4)
    torch.manual_seed(0)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_two_torchrun_processes_end_with_identical_weights_and_resume_exactly(
    small_dir: Path, compressed_teacher: Path, tmp_path: Path
) -> None:
    def torchrun(name: str, *extra: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LRC_RANK_STATE_DIR": str(tmp_path / f"{name}-ranks")}
        command = [
            str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "lowrank_compress",
            "finetune", str(compressed_teacher), "--data", str(small_dir), "--no-teacher", "--epochs", "2",
            "--batch-size", "32", "--lr", "0.02", "--workers", "0", "--device", "cpu", "--ema", "0.9",
            "--checkpoint-dir", str(tmp_path / name), "--log-file", str(tmp_path / f"{name}.jsonl"), "--quiet",
            "-o", str(tmp_path / f"{name}.lrc.safetensors"), *extra,
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun("full")
    start = json.loads((tmp_path / "full.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["steps_per_epoch"] == 6  # 192 images / (2 ranks × 16)
    _assert_same_weights(tmp_path / "full-ranks" / "rank0.safetensors", tmp_path / "full-ranks" / "rank1.safetensors")
    _assert_same_weights(tmp_path / "full-ranks" / "rank0.safetensors", tmp_path / "full.lrc.safetensors")

    torchrun("split", "--max-steps", "4")
    torchrun("split", "--resume")
    _assert_same_weights(tmp_path / "split-ranks" / "rank0.safetensors", tmp_path / "split-ranks" / "rank1.safetensors")
    _assert_same_weights(tmp_path / "full.lrc.safetensors", tmp_path / "split.lrc.safetensors")


def test_from_scratch_factorizes_a_random_model_and_trains_it(small_dir: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "scratch.lrc.safetensors"
    argv = ["finetune", "--from-scratch", "--arch", digits.ARCH_SPEC, "--input-shape", "1,1,32,32", "--rank-ratio", "0.25",
            "--data", str(small_dir), "--batch-size", "32", "--max-steps", "2", "--workers", "0", "--quiet", "-o", str(out)]
    assert run_cli(*argv).code == 0
    manifest = lrc_format.read_manifest(out)
    assert manifest["arch"] == digits.ARCH_SPEC and manifest["method"] == "nkp"
    assert manifest["policy"] == {"rank_ratio": 0.25} and manifest["layers"]
    model = lrc_format.load(out)
    assert any(isinstance(m, LOW_RANK_TYPES) for m in model.modules())


def test_from_scratch_needs_exactly_one_rank_policy(small_dir: Path, tmp_path: Path, run_cli) -> None:
    argv = ["finetune", "--from-scratch", "--arch", digits.ARCH_SPEC, "--input-shape", "1,1,32,32", "--rank", "4",
            "--rank-ratio", "0.1", "--data", str(small_dir), "-o", str(tmp_path / "o.lrc.safetensors")]
    result = run_cli(*argv)
    assert result.code == 2 and "exactly one of --rank, --rank-ratio, --param-ratio" in result.err


@pytest.mark.slow
def test_from_scratch_timm_resnet50_at_rank_ratio_0_1(tmp_path: Path, run_cli) -> None:
    for label in ("a", "b"):
        for i in range(2):
            (tmp_path / "data" / "train" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (72, 80), (40 * i, 90, 200 if label == "a" else 10)).save(tmp_path / "data" / "train" / label / f"{i}.png")
    out = tmp_path / "r50.lrc.safetensors"
    argv = ["finetune", "--from-scratch", "--arch", "timm:resnet50", "--arch-kwargs", '{"num_classes": 2}',
            "--input-shape", "1,3,64,64", "--rank-ratio", "0.1", "--data", str(tmp_path / "data"), "--batch-size", "2",
            "--max-steps", "1", "--workers", "0", "--quiet", "-o", str(out)]
    assert run_cli(*argv).code == 0
    loaded = lrc_format.load_compressed(out)
    assert loaded.input_shape == (1, 3, 64, 64) and loaded.data_config.interpolation == "bicubic"
    assert sum(p.numel() for p in loaded.model.parameters()) < 0.2 * 23_500_000


@pytest.mark.slow
def test_the_throughput_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    # A CPU smoke run of the GPU benchmark: eager, no profiler, no layer timing, one tiny round.
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--device", "cpu", "--models", "resnet50",
               "--batch-sizes", "2", "--steps", "1", "--rounds", "1", "--warmup", "0", "--image-size", "64",
               "--no-compile", "--no-profile", "--no-latency-aware", "--json", str(out)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| resnet50 |" in done.stdout
    entry = json.loads(out.read_text())["models"]["resnet50"]
    assert entry["param_ratio"] < 1 and entry["flop_ratio"] < 0.75
    assert {row["mode"] for row in entry["throughput"]} == {"inference", "training"}
    assert all(row["dense"] > 0 and row["compressed"] > 0 and row["speedup"] > 0 for row in entry["throughput"])


# ---------------------------------------------------------------- losses, schedule, regularizers


def test_lr_warms_up_linearly_then_decays_by_cosine() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_schedule(optimizer, warmup_steps=4, total_steps=12)
    factors = []
    for step in range(12):
        factors.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(step + 2)
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    cosine = [0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(1, 9)]  # 8 steps left, zero one step after
    assert all(math.isclose(a, b) for a, b in zip(factors[4:], cosine)) and 0 < factors[11] < 0.05


def test_distillation_mixes_cross_entropy_and_scaled_kl() -> None:
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, labels, None, 4.0, 0.7, 0.0), ce)
    assert distillation_loss(logits, labels, logits, 4.0, 1.0, 0.0).abs() < 1e-6  # matching the teacher costs nothing
    kl = nn.functional.kl_div(torch.log_softmax(logits / 4, 1), torch.softmax(teacher / 4, 1), reduction="batchmean")
    assert torch.allclose(distillation_loss(logits, labels, teacher, 4.0, 0.7, 0.0), 0.3 * ce + 0.7 * 16 * kl)


def test_frobenius_penalty_is_the_squared_norm_of_the_factor_product() -> None:
    model = _factorize(digits.DigitsCNN(), 3)
    modules = [m for m in model.modules() if isinstance(m, LOW_RANK_TYPES)]
    dense = sum(float(m.to_dense().weight.pow(2).sum()) for m in modules)
    assert math.isclose(float(frobenius_penalty(modules)), dense, rel_tol=1e-5)


def test_frobenius_decay_replaces_plain_decay_on_factors() -> None:
    model = _factorize(digits.DigitsCNN(), 3)
    plain = parameter_groups(model, 1e-4, 0.0)
    frob = parameter_groups(model, 1e-4, 1e-3)
    factor_ids = {id(p) for m in model.modules() if isinstance(m, LOW_RANK_TYPES) for p in (m.up.weight, m.down.weight)}
    group = next(g for g in frob if {id(p) for p in g["params"]} == factor_ids)
    assert group["weight_decay"] == 0.0
    assert next(g for g in plain if {id(p) for p in g["params"]} == factor_ids)["weight_decay"] == 1e-4
    assert all(g["weight_decay"] == 0.0 for g in frob if all(p.ndim == 1 for p in g["params"]))


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_files_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    dump_recipe(recipe, tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml") == recipe
    TrainConfig(**{k: v for k, v in resolve_options(recipe, {}).items() if k in TrainConfig.__dataclass_fields__})


def test_the_shipped_recipes_are_the_papers_settings() -> None:
    assert {p.name for p in RECIPES} >= {"resnet50_finetune.yaml", "resnet50_scratch.yaml", "efficientnet_b0_scratch.yaml"}
    for name, decay in (("resnet50_scratch.yaml", 1e-4), ("efficientnet_b0_scratch.yaml", 1e-5)):
        recipe = load_recipe(REPO / "recipes" / name)
        assert recipe["from_scratch"] and recipe["rank_ratio"] == 0.1 and recipe["optimizer"] == "sgd"
        assert (recipe["momentum"], recipe["batch_size"], recipe["base_batch"], recipe["lr"]) == (0.9, 4096, 4096, 1.6)
        assert recipe["warmup_steps"] == 1560 and recipe["weight_decay"] == decay


def test_a_recipes_lr_and_warmup_scale_linearly_with_the_batch() -> None:
    recipe = {"lr": 1.6, "base_batch": 4096, "batch_size": 4096, "warmup_steps": 1560}
    scaled = resolve_options(recipe, {"batch_size": 256, "lr": None})
    assert math.isclose(scaled["lr"], 0.1) and scaled["warmup_steps"] == 24960 and "base_batch" not in scaled
    assert resolve_options(recipe, {"batch_size": 256, "lr": 0.3, "warmup_steps": 10})["lr"] == 0.3
    assert resolve_options(recipe, {})["lr"] == 1.6


def test_an_unknown_recipe_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        load_recipe(path)


def test_recipe_values_are_type_checked() -> None:
    assert validate_recipe({"weight_decay": "1e-4"})["weight_decay"] == 1e-4  # PyYAML reads 1e-4 as text
    with pytest.raises(UsageError, match="epochs must be int"):
        validate_recipe({"epochs": 2.5})


def test_explicit_flags_override_the_recipe(small_dir: Path, compressed_teacher: Path, tmp_path: Path, run_cli) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 5\nbatch_size: 64\nbase_batch: 64\nlr: 0.04\nworkers: 0\nmin_crop_scale: 0.5\n")
    log = tmp_path / "log.jsonl"
    argv = ["finetune", str(compressed_teacher), "--no-teacher", "--data", str(small_dir), "--recipe", str(recipe),
            "--batch-size", "32", "--max-steps", "1", "--log", str(log), "--quiet", "-o", str(tmp_path / "o.lrc.safetensors")]
    assert run_cli(*argv).code == 0
    config = json.loads(log.read_text().splitlines()[0])["config"]
    assert (config["epochs"], config["batch_size"], config["lr"], config["workers"]) == (5, 32, 0.02, 0)
