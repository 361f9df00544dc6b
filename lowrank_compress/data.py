"""Image data for evaluation, fine-tuning and calibration.

Layout: the ImageNet one, ``DIR/<split>/<class>/<image>``. Classes are the sorted folder names, except
when every folder name is a non-negative integer: then the name *is* the class index, so a folder
holding a subset of numbered classes (or ``2`` and ``10``, which sort as text the wrong way) still
lines up with the model's outputs.

Preprocessing follows the model's data config ``{input_size (C, H, W), mean, std, interpolation,
crop_pct}``: evaluation resizes to ``floor(size / crop_pct)`` then center-crops ``size``; training
uses RandomResizedCrop + horizontal flip (timm's ``create_transform`` for timm archs). One-channel
models read images as grayscale, others as RGB.

Training augmentation is a pure function of (seed, epoch, sample index), so a run sees the same
batches whatever the number of loader workers, and a resumed run those the uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import DatasetFolder

from .io.dataconfig import IMAGENET_MEAN, IMAGENET_STD
from .io.records import DataConfig, LoadedModel
from .io.dataconfig import data_config as arch_data_config
from .errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Without a crop_pct in the model's config the whole image is kept (resize to the input size): cutting
# borders off images whose framing we know nothing about would change what the model sees.
DEFAULT_CROP_PCT = 1.0
DEFAULT_INTERPOLATION = "bilinear"


# ---------------------------------------------------------------- data config


def resolve_data_config(loaded: LoadedModel, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The complete eval preprocessing of a model: input_size (C, H, W), mean, std, interpolation, crop_pct.

    Each value comes from the model's own data config (a file's metadata or manifest), else from
    its timm/torchvision arch's config. The input size is overridden by ``input_shape`` (N, C, H, W)
    given by the caller, else by the model's recorded input shape (a model compressed at 1,3,32,32
    is fed 32×32 images). Mean/std default to ImageNet's for 3 channels and to the channel average
    of ImageNet's for any other channel count.
    """
    config = arch_data_config(loaded.arch, loaded.model).updated(loaded.data_config)
    return complete_data_config(config, input_shape or loaded.input_shape)


def complete_data_config(config: DataConfig | dict[str, Any], shape: Sequence[int] | None = None) -> dict[str, Any]:
    """``config`` with every key filled in and checked, its input size taken from ``shape`` (N, C, H, W)
    when given (see :func:`resolve_data_config`): the transforms' settings."""
    config = config.to_dict() if isinstance(config, DataConfig) else dict(config)
    if shape is not None:
        if len(shape) != 4:
            raise UsageError(f"input shape {tuple(shape)} is not an image batch shape N,C,H,W")
        config["input_size"] = tuple(int(s) for s in shape[1:])
    if "input_size" not in config:
        raise UsageError("the model records no input size; pass --input-shape N,C,H,W")
    channels = int(config["input_size"][0])
    if channels not in (1, 3):  # images are read as grayscale or RGB
        raise UsageError(f"input size {tuple(config['input_size'])} has {channels} channels; images give 1 or 3")
    for key, imagenet in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = tuple(float(v) for v in config.get(key) or ())
        if not value:
            value = imagenet if channels == 3 else (sum(imagenet) / 3,) * channels
        elif len(value) == 1 and channels > 1:
            value = value * channels
        if len(value) != channels:
            raise UsageError(f"data config {key} has {len(value)} values for {channels} input channels")
        config[key] = value
    config["input_size"] = tuple(int(s) for s in config["input_size"])
    config["interpolation"] = str(config.get("interpolation") or DEFAULT_INTERPOLATION)
    config["crop_pct"] = float(config.get("crop_pct") or DEFAULT_CROP_PCT)
    return {k: config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name.lower())
    except ValueError:
        raise UsageError(f"unknown interpolation {name!r} in the data config") from None


def eval_transform(config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalized float tensor (C, H, W): resize by crop_pct, center crop, normalize.

    Not timm's ``create_transform``: it resizes non-square inputs to another size and does not know
    the ``nearest-exact`` interpolation that a torchvision data config may record.
    """
    from torchvision import transforms as T

    _, height, width = config["input_size"]
    crop_pct = config["crop_pct"]
    if height == width:
        resize: int | tuple[int, int] = math.floor(height / crop_pct)
    else:
        resize = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    return T.Compose(
        [
            T.Resize(resize, interpolation=_interpolation(config["interpolation"])),
            T.CenterCrop((height, width)),
            T.ToTensor(),
            T.Normalize(config["mean"], config["std"]),
        ]
    )


def train_transform(
    config: dict[str, Any], timm_arch: bool = False, min_crop_scale: float = 0.08, hflip: float = 0.5
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → augmented normalized tensor (C, H, W): RandomResizedCrop(scale ≥ min_crop_scale) + flip.

    For timm archs with RGB input this is timm's own training transform (which adds its default
    color jitter), so fine-tuning sees what the arch was trained with.
    """
    channels, height, width = config["input_size"]
    scale = (min_crop_scale, 1.0)
    if timm_arch and channels == 3:
        from timm.data import create_transform

        return create_transform(
            (channels, height, width), is_training=True, scale=scale, hflip=hflip,
            interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
        )
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop((height, width), scale=scale, interpolation=_interpolation(config["interpolation"])),
            T.RandomHorizontalFlip(hflip),
            T.ToTensor(),
            T.Normalize(config["mean"], config["std"]),
        ]
    )


# ---------------------------------------------------------------- reading images


MAX_PIXELS_ENV = "LRC_MAX_IMAGE_PIXELS"
_PIL_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def max_image_pixels() -> int:
    """The most pixels an image may have: PIL's decompression-bomb limit, or ``LRC_MAX_IMAGE_PIXELS``."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None:
        return int(_PIL_MAX_PIXELS or 0) or 2**62
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"{MAX_PIXELS_ENV} must be a positive integer, got {text!r}")
    return int(text)


def read_image(path: str | Path, channels: int) -> Image.Image:
    """Open an image as grayscale (1 channel) or RGB; an unreadable file is a UsageError naming it.

    An image with more pixels than :func:`max_image_pixels` is refused from its header, before it is
    decoded: a small compressed file can expand to gigabytes.
    """
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own guard, which fires while opening, follows the same limit
    too_large = f"more than the limit of {limit:,}; set {MAX_PIXELS_ENV} to read larger images"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > limit:
                    raise UsageError(f"image {path} has {width}×{height} = {width * height:,} pixels, {too_large}")
                return image.convert("L" if channels == 1 else "RGB")
    except Image.DecompressionBombError:
        raise UsageError(f"image {path} has {too_large}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"cannot read image {path} ({' '.join(str(exc).split())[:120]})") from None


def _is_image(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


class ImageFolder(DatasetFolder):
    """torchvision's ``DatasetFolder`` over ``root/<class>/<image>`` → (image, class index), read as
    grayscale or RGB; see the module docstring for class indices. Folders without images are allowed."""

    def __init__(self, root: str | Path, channels: int, transform: Callable | None = None) -> None:
        if not Path(root).is_dir():
            raise UsageError(f"no image folder {root}")
        self.channels = channels
        super().__init__(root, loader=partial(read_image, channels=channels), transform=transform,
                         is_valid_file=_is_image, allow_empty=True)
        if not self.samples:
            raise UsageError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS[:3])}, …)")
        self.num_classes = max(self.class_to_idx.values()) + 1

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise UsageError(f"{directory} has no class folders (expected {directory}/<class>/<image>)")
        if all(name.isdigit() for name in folders):
            return folders, {name: int(name) for name in folders}
        return folders, {name: i for i, name in enumerate(folders)}


class SeededAugmentFolder(Dataset):
    """An :class:`ImageFolder` with a random transform seeded per sample.

    Items are addressed by ``(index, epoch)`` (what :class:`TrainSampler` yields): the transform runs
    under :func:`seeded_transform` seeded from (seed, epoch, index), so the augmentation does not
    depend on which process or worker draws it and the process's global random state is untouched.
    """

    def __init__(self, folder: ImageFolder, transform: Callable[[Image.Image], torch.Tensor], seed: int) -> None:
        self.folder, self.transform, self.seed = folder, transform, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        image, target = self.folder[index]
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0])
        return seeded_transform(self.transform, [image], sample_seed)[0], target


def seeded_transform(transform: Callable[[Image.Image], torch.Tensor], images: Sequence[Image.Image], seed: int):
    """``transform`` of each image, under torch's and Python's global RNGs seeded with ``seed`` and restored after."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return [transform(image) for image in images]
        finally:
            random.setstate(python_state)


# ---------------------------------------------------------------- samplers and loaders


class TrainSampler(DistributedSampler):
    """DistributedSampler that yields ``(index, epoch)`` and can start part-way through an epoch.

    The permutation is DistributedSampler's (seeded by seed + epoch, this rank's shard), so the data
    order depends only on (seed, epoch, world size). ``set_position(epoch, skip)`` drops the first
    ``skip`` samples of this rank's shard: the ones a resumed run already trained on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding: evaluation shards
    whose counts sum to exactly the dataset size."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    device: torch.device,
    drop_last: bool,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader with ``workers`` processes, pinned memory on CUDA and persistent workers.

    The loader's own generator is seeded so that creating an iterator never draws from the global
    torch generator (which would shift the model's random stream between a run and its resumption).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


def split_dir(data_dir: str | Path, split: str) -> Path:
    """``data_dir/split``, or a UsageError saying the ImageNet layout is expected."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"--data {root} is not a directory")
    path = root / split
    if not path.is_dir():
        raise UsageError(f"no {split!r} split: {path} does not exist (expected {root}/{split}/<class>/<image>)")
    return path


def eval_loader(
    folder: str | Path,
    config: dict[str, Any],
    batch_size: int,
    workers: int,
    device: torch.device,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A loader over an image folder with the eval transform; with several ranks, each gets its shard."""
    dataset = ImageFolder(folder, channels=config["input_size"][0], transform=eval_transform(config))
    sampler = ShardSampler(len(dataset), num_replicas, rank)
    return make_loader(dataset, batch_size, sampler, workers, device, drop_last=False)


# ---------------------------------------------------------------- calibration images


def calibration_files(path: str | Path, samples: int) -> list[Path]:
    """Up to ``samples`` image files under ``path``, in sorted order, evenly spaced over the whole list."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"calibration data {root} is not a directory")
    if samples < 1:
        raise UsageError(f"the number of calibration samples must be positive, got {samples}")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise UsageError(f"no images under {root} ({', '.join(IMAGE_EXTENSIONS[:3])}, …)")
    if len(files) > samples:
        files = [files[i] for i in np.linspace(0, len(files) - 1, samples).round().astype(int)]
    return files


def image_tensors(
    path: str | Path, input_shape: Sequence[int], config: dict[str, Any], samples: int, seed: int = 0,
    views: bool = False,
) -> torch.Tensor:
    """Up to ``samples`` images under ``path`` (a flat folder or class subfolders), eval-transformed.

    Files are taken in sorted order, evenly spaced over the whole list so that every class folder
    contributes. ``input_shape`` (N, C, H, W) sets the size; ``config`` supplies mean, std,
    interpolation and crop_pct (missing ones are filled as in :func:`resolve_data_config`).
    Returns float32 (n, C, H, W) with n = min(samples, number of images); with ``views`` and fewer
    images than ``samples``, n = ``samples``: every image once, then random views of them in turn
    (:data:`VIEW_MIN_SCALE`, seeded by ``seed``; the global RNG is left as it was).
    """
    files = calibration_files(path, samples)
    resolved = complete_data_config(config, input_shape)
    transform = eval_transform(resolved)
    channels = resolved["input_size"][0]
    # One decoded image at a time: a folder of large photos never sits in memory whole (a view
    # decodes its file again).
    tensors = [transform(read_image(f, channels)) for f in files]
    if views and len(files) < samples:
        augment = train_transform(resolved, min_crop_scale=VIEW_MIN_SCALE)
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms read the global RNG
            torch.manual_seed(seed)
            tensors += [augment(read_image(files[i % len(files)], channels)) for i in range(samples - len(files))]
    return torch.stack(tensors)


# Random views that fill a calibration folder up to --calib-samples: a crop of at least this share of
# the image's area (aspect 3/4–4/3), resized to the input, flipped half the time; larger than the
# 0.08 of ImageNet training, so that views stay close to the whole images a model is evaluated on.
# Why views: on EfficientNet-Lite0 at --target-params 0.5, calibrating on 64 → 256 → 512 random crops
# of 5 photos lowered the KL to the original on 128 other crops of them 0.092 → 0.052 → 0.044.
VIEW_MIN_SCALE = 0.25
