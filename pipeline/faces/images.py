"""Images and their preprocessing: decoding (files or encoded bytes), resize + centre crop + normalisation, and
the Dataset that decoding workers run.

The default preprocessing is torchvision's ImageNet one (and the study's): resize 256, centre crop 224, ImageNet
mean and std. `Preprocess` holds other sizes and normalisations (face networks trained on 112 x 112 crops, or on
inputs in [-1, 1]). Workers produce uint8 crops (`Preprocess.crop`) and the main process normalises each batch
(`Preprocess.normalize`), bit-identical to ToTensor + Normalize.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from pipeline.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre crop `input_size` x `input_size`, scale to [0, 1], subtract
    `mean` and divide by `std` (per RGB channel)."""

    input_size: int = 224
    """Side of the square crop the network sees."""
    resize: int | None = None
    """Shorter side after resizing, before the crop; None: input_size * 256 / 224 (256 for 224, 128 for 112)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tta_resizes: tuple[int, ...] = ()
    """Test-time augmentation over scales: more shorter sides, each centre-cropped to `input_size` too; `crop`
    then gives a stack of crops (`resize_to`'s first) and the embedding is the mean over them."""

    def __post_init__(self):
        if self.input_size < 1:
            raise ValueError(f"input size must be a positive number of pixels, got {self.input_size}")
        for r in (self.resize, *self.tta_resizes):
            if r is not None and r < self.input_size:
                raise ValueError(f"resize ({r}) must be at least the input size ({self.input_size})")
        if len(set((self.resize_to, *self.tta_resizes))) != 1 + len(self.tta_resizes):
            raise ValueError(f"test-time resizes {self.tta_resizes} repeat a size (or the resize {self.resize_to})")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")

    @property
    def resize_to(self) -> int:
        return self.resize if self.resize is not None else round(self.input_size * 256 / 224)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    @property
    def crops_shape(self) -> tuple[int, ...]:
        """The shape of one image's `crop`: `shape`, or [views, *shape] with `tta_resizes`."""
        return (1 + len(self.tta_resizes), *self.shape) if self.tta_resizes else self.shape

    def crop(self):
        """The PIL -> uint8 [3, S, S] part run by the decoding workers (4x less to pass than float); with
        `tta_resizes`, [views, 3, S, S]: the crop at `resize_to`, then one per test-time resize."""
        crops = [
            transforms.Compose([transforms.Resize(r), transforms.CenterCrop(self.input_size), transforms.PILToTensor()])
            for r in (self.resize_to, *self.tta_resizes)
        ]
        return Stacked(crops) if self.tta_resizes else crops[0]

    def transform(self) -> transforms.Compose:
        """The whole preprocessing as one torchvision transform (PIL -> normalised float)."""
        return transforms.Compose(
            [
                transforms.Resize(self.resize_to),
                transforms.CenterCrop(self.input_size),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops [B, 3, S, S] (any device) -> float32 as ToTensor + Normalize compute them."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float().div(255) - mean) / std

    def describe(self, model: str) -> str:
        """The store's `transform` attribute: model, sizes, mean and std (and test-time resizes) as JSON."""
        described = {
            "model": model,
            "resize": self.resize_to,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.tta_resizes:  # stores of earlier versions keep their attribute
            described["tta_resizes"] = list(self.tta_resizes)
        return json.dumps(described)


@dataclass(frozen=True)
class Stacked:
    """Several crops of one image as one tensor [views, 3, S, S] (picklable for decoding workers)."""

    crops: list

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([c(image) for c in self.crops])


def mean_over_views(embed, x: torch.Tensor) -> torch.Tensor:
    """`embed` of a batch of normalised images [B, 3, S, S], or of crops [B, V, 3, S, S] (`Preprocess.crop` with
    `tta_resizes`): the mean of each image's V embeddings."""
    if x.dim() == 4:
        return embed(x.contiguous(memory_format=torch.channels_last))
    b, v = x.shape[:2]
    y = embed(x.flatten(0, 1).contiguous(memory_format=torch.channels_last))
    return y.float().view(b, v, -1).mean(1)


IMAGENET = Preprocess()


def imagenet_transform(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """The preprocessing of torchvision's ImageNet weights (and the study): resize, centre crop, normalise."""
    return Preprocess(crop, resize).transform()


def imagenet_crop(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """`imagenet_transform` up to the crop, as uint8: 4x less to pass from decoding workers; `normalize`
    finishes it per batch with the same arithmetic (bit-identical)."""
    return Preprocess(crop, resize).crop()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (any device) -> float32 with ImageNet mean and std."""
    return IMAGENET.normalize(x)


def load_image(source: Path | str | bytes, name: str | None = None) -> Image.Image:
    """Decode an image (a file, or encoded bytes named `name`) as RGB; a missing or corrupt one is a
    PipelineError naming it."""
    try:
        opened = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
        with opened as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PipelineError(f"cannot read image {name or source}: {e}") from e


def batches(loader) -> Iterator:
    """The batches of a DataLoader; a worker process that fails (shared memory full, a file size limit, killed)
    is one PipelineError instead of torch's nested traceback."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        cause = str(e).strip().splitlines()[-1]
        raise PipelineError(
            f"an image-decoding worker process failed ({cause}); pass --workers 0 to decode in the main process, "
            f"or make room in /dev/shm (and lift any file size limit)"
        ) from None


class ImageFiles(Dataset):
    """Images (paths, or encoded bytes named by `names`) -> (tensor, index, error). A bad image yields a zero
    tensor and its error message, so that the main process (not a worker) decides whether to stop or skip."""

    def __init__(
        self,
        paths: Sequence[Path | bytes],
        transform,
        shape: tuple[int, int, int] = (3, 224, 224),
        dtype=torch.uint8,
        names: Sequence[str] | None = None,
    ):
        self.paths, self.transform, self.shape, self.dtype, self.names = paths, transform, shape, dtype, names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = load_image(self.paths[i], self.names[i] if self.names is not None else None)
            return self.transform(image), i, ""
        except PipelineError as e:
            return torch.zeros(self.shape, dtype=self.dtype), i, str(e)
