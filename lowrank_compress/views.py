"""New inputs for distillation, batch after batch: random views of images, texts not calibrated on.

Distillation on a few stored inputs overfits them; new inputs each step do not (see
:mod:`lowrank_compress.distill`). ``lrc compress --calib FOLDER`` uses :class:`ViewStream` when the
folder has fewer images than ``--calib-samples``, the case where calibration was filled up with
views of them; ``lrc compress HF_FOLDER --calib TEXTS`` uses :class:`TextStream` on the texts of
the file beyond the first ``--calib-samples``, which calibration did not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import calibration_files, complete_data_config, read_image, seeded_transform, train_transform
from .errors import UsageError

# The smallest view distillation trains on, as a share of an image's area: ImageNet training's
# 0.08, smaller than the views that fill calibration up (data.VIEW_MIN_SCALE, 0.25). On
# EfficientNet-Lite0 at --target-params 0.5 (600 steps, lr 0.003), views of at least 0.08 of the
# area gave a KL of 0.030 on other crops and top-1 agreement 0.914; views of at least 0.25, 0.035
# and 0.906.
DISTILL_VIEW_MIN_SCALE = 0.08

# Decoded, downscaled images a ViewStream keeps: 128 M pixels, 384 MB as RGB.
VIEW_CACHE_PIXELS = 128 * 2**20


class ViewStream:
    """Endless batches of new random views of a calibration folder's images, for distillation.

    The images are those :func:`image_tensors` reads (up to ``samples``, evenly spaced); each view
    is a crop of at least ``min_scale`` of an image's area, resized to the input and
    flipped half the time (:func:`train_transform`), of an image drawn at random. Batch ``k`` is a
    function of (``seed``, ``k``) alone, and the global random state is left as it was. Iterating
    continues where the last iteration stopped. Images stay decoded, up to :data:`VIEW_CACHE_PIXELS`
    in all, downscaled so that the smallest view keeps the input's resolution.
    """

    def __init__(self, path: str | Path, input_shape: Sequence[int], config: dict[str, Any], samples: int,
                 batch_size: int, seed: int = 0, min_scale: float = DISTILL_VIEW_MIN_SCALE,
                 dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1:
            raise UsageError(f"the view batch size must be positive, got {batch_size}")
        if not 0 < min_scale <= 1:
            raise UsageError(f"the smallest view's share of an image must be in (0, 1], got {min_scale}")
        self.files = calibration_files(path, samples)
        resolved = complete_data_config(config, input_shape)
        self.channels = resolved["input_size"][0]
        self.transform = train_transform(resolved, min_crop_scale=min_scale)
        self.side = math.ceil(max(resolved["input_size"][1:]) / math.sqrt(min_scale))
        self.batch_size, self.seed, self.drawn, self.dtype = batch_size, seed, 0, dtype
        self.description = f"new random views of the {len(self.files)} images in {path}"
        self._cache: dict[int, Image.Image] = {}
        self._pixels = 0

    def _image(self, index: int) -> Image.Image:
        image = self._cache.get(index)
        if image is None:
            image = read_image(self.files[index], self.channels)
            short = min(image.size)
            if short > self.side:  # a view of min_scale of the area still has the input's size
                scale = self.side / short
                image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                                     Image.BICUBIC, reducing_gap=2.0)
            if self._pixels + image.size[0] * image.size[1] <= VIEW_CACHE_PIXELS:
                self._cache[index] = image
                self._pixels += image.size[0] * image.size[1]
        return image

    def batch(self, number: int) -> torch.Tensor:
        """Batch ``number`` of the stream: (batch_size, C, H, W) in ``dtype`` (the model's)."""
        rng = np.random.default_rng([self.seed, number])
        picks = rng.integers(len(self.files), size=self.batch_size)
        images = [self._image(int(i)) for i in picks]
        return torch.stack(seeded_transform(self.transform, images, int(rng.integers(2**62)))).to(self.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            self.drawn += 1
            yield self.batch(self.drawn - 1)


class TextStream:
    """Each of ``texts`` once, tokenized in batches of ``batch_size``, for distillation.

    The texts come in an order shuffled with ``seed``. Each run of 8 batches' worth is sorted by
    length (``by_length``) and cut into batches, so that a batch is padded little, and those 8
    batches come in random order, so that the first ones are not the shortest texts. A one-shot
    iterator: distillation's held-out check takes its first batches, and the steps end when it runs
    out, so no text is both checked and trained on, nor trained on twice. ``tokenize``: a list of
    texts → a batch (a dict of tensors, as the model takes them).
    """

    def __init__(self, texts: Sequence[str], tokenize: Callable[[list[str]], Any],
                 by_length: Callable[[list[str]], list[str]], batch_size: int, seed: int = 0,
                 description: str | None = None) -> None:
        if batch_size < 1:
            raise UsageError(f"the batch size must be positive, got {batch_size}")
        self.rng = np.random.default_rng(seed)
        self.texts = [texts[int(i)] for i in self.rng.permutation(len(texts))]
        self.tokenize, self.by_length, self.batch_size = tokenize, by_length, batch_size
        self.description = description or f"{len(texts)} new texts, each once"
        self._batches = self._generate()

    def _generate(self) -> Iterator[Any]:
        chunk = 8 * self.batch_size
        for start in range(0, len(self.texts), chunk):
            texts = self.by_length(self.texts[start:start + chunk])
            for i in self.rng.permutation(range(0, len(texts), self.batch_size)):
                yield self.tokenize(texts[i:i + self.batch_size])

    def __len__(self) -> int:
        return math.ceil(len(self.texts) / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._batches)
