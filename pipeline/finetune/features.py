"""What the network sees: the decoded training images kept in memory, and the features of the frozen part
(`pipeline.nets.split.split_model`) computed once for phase 1 and handed from one member of an ensemble to the
next."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.faces import images, lfw
from pipeline.runtime import autocast, log_memory

log = logging.getLogger(__name__)

CHUNK = 64
"""Images per decoding batch and per forward pass of the frozen part when caching."""


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names and bytes)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def set_phase(model: nn.Module, frozen: nn.Module, phase: int) -> None:
    """Phase 1: the frozen part in eval mode without gradients; phase 2: everything trains."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if phase == 1:
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)


class Handover:
    """What a trainer hands to the next member of an ensemble (the same images, the same frozen part): decoded
    images and cached features, each kept under the key that made it."""

    def __init__(self):
        self.held: dict[str, tuple] = {}

    def get(self, name: str, key: tuple, make):
        """The `name` made under `key` before, or `make()` (then kept)."""
        if name in self.held and self.held[name][0] == key:
            log.info("reusing the %s of the previous member", name)
            return self.held[name][1]
        self.held[name] = (key, make())
        return self.held[name][1]

    def frozen_outputs(self, files: list[Path], mirrored_too: bool, device: torch.device) -> tuple | None:
        """(frozen_out, matches) for `pipeline.embedding.shared.embed_from_frozen` over the image `files` from the
        cached features: `frozen_out(rows, mirrored)` the float32 features of those files' rows, `matches(frozen)`
        whether a frozen part is the one that made them. None where nothing is cached for these images (or, with
        `mirrored_too`, their mirror images are not). Holds the cache, not the decoded images."""
        feats, images = self.held.get("features"), self.held.get("images")
        if feats is None or images is None or feats[0][0] != id(images[1]):
            return None
        (_, made_by, _, flip), cache = feats
        where = {str(f): i for i, f in enumerate(images[1].files.paths)}
        rows = np.array([where.get(str(f), -1) for f in files], dtype=np.int64)
        if (rows < 0).any() or (mirrored_too and not flip):
            return None

        def frozen_out(idx: np.ndarray, mirrored: bool) -> torch.Tensor:
            r = torch.from_numpy(rows[idx])
            return cached_rows(cache, r, torch.full((len(r),), mirrored) if flip else None, flip, device)

        return frozen_out, lambda frozen: fingerprint(frozen) == made_by

    def bank(self, proto: lfw.FaceSet, workers: int, keep: bool = True) -> ImageBank:
        """The images of `proto` (`ImageBank`: decoded and kept, or decoded when read)."""
        key = (str(proto.data_root), proto.image_set, tuple(proto.paths), keep)
        return self.get("images", key, lambda: ImageBank(proto, workers, keep))

    def features(self, frozen: nn.Module, bank: ImageBank, device: torch.device, dtype: str, flip: bool,
                 folder: Path | None = None):  # fmt: skip
        """`compute_features` of `frozen` (the same weights) over `bank` (in a `FeatureFile` in `folder`)."""

        def make() -> torch.Tensor | FeatureFile:
            t0 = time.perf_counter()
            cache = compute_features(frozen, bank, device, dtype, flip, "cache features", folder)
            log.info("cached frozen features of %d images in %.1f s", len(bank), time.perf_counter() - t0)
            where = "features_file" if isinstance(cache, FeatureFile) else "features"
            log_memory("caching frozen features", **{where: cache.nbytes}, images=bank.nbytes)
            return cache

        return self.get("features", (id(bank), fingerprint(frozen), dtype, flip), make)


class ImageBank:
    """Decoded images (resize 256, centre crop 224) of a face set: kept as uint8 in memory (`keep`), or, for a recipe
    that reads only the feature cache, decoded as `chunks` walks them and let go (the cache is then their only copy).
    Normalised per batch."""

    def __init__(self, proto: lfw.FaceSet, workers: int, keep: bool = True):
        self.files = images.ImageFiles([proto.absolute(i) for i in range(len(proto))], images.imagenet_crop())
        # Decoded for the cache alone, the images are decoded in this process: batches from worker processes left
        # the heap growing by about 0.2 MB an image while caching (1,500 real images: peak 2,468 MiB against 1,617
        # in-process; the caching's time: docs/finetuning.md#memory).
        self.workers = workers if keep else 0
        self.images: torch.Tensor | None = None
        self.pool: ThreadPoolExecutor | None = None  # decodes the rows of a chunk at once (PIL lets go of the GIL)
        if keep:
            self.images = torch.empty((len(proto), 3, 224, 224), dtype=torch.uint8)
            for idx, x in self._decoded("decode"):
                self.images[idx] = x
            log_memory(f"decoding {len(self)} images", images=self.nbytes)
        else:
            # The one draw from torch's global generator that a DataLoader's iteration makes (its workers' base
            # seed) is made here, where the kept images are decoded, and later decodings draw nothing: the networks
            # train as with kept images, and a resumed run as the whole one.
            torch.empty((), dtype=torch.int64).random_()
            self.pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="decode")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes if self.images is not None else 0

    def _decoded(self, desc: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.files, batch_size=CHUNK, num_workers=self.workers)
        for x, idx, errors in tqdm(images.batches(loader), total=len(loader), desc=desc, unit="batch",
                                   disable=desc is None):  # fmt: skip
            bad = [e for e in errors if e]
            if bad:
                raise PipelineError(bad[0])
            yield idx, x

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, uint8 images) of CHUNK consecutive rows at a time, from memory or decoded now."""
        for i in range(0, len(self), CHUNK):
            idx = torch.arange(i, min(i + CHUNK, len(self)))
            yield idx, self.images[idx] if self.images is not None else self._decode_rows(idx)

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float images `idx` (decoded now where they are not kept); rows where `flip` is true are
        mirrored left-right."""
        return prepared(self.images[idx] if self.images is not None else self._decode_rows(idx), flip)

    def _decode_rows(self, idx: torch.Tensor) -> torch.Tensor:
        assert self.pool is not None  # a bank that decodes rows when read has its pool
        decoded = list(self.pool.map(self.files.__getitem__, idx.tolist()))
        bad = [e for _, _, e in decoded if e]
        if bad:
            raise PipelineError(bad[0])
        return torch.stack([x for x, _, _ in decoded])


def prepared(raw: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images as the network takes them: normalised, mirrored where `flip`, channels last."""
    x = images.normalize(raw)
    if flip is not None and flip.any():
        x[flip] = x[flip].flip(-1)
    return x.contiguous(memory_format=torch.channels_last)


class FeatureFile:
    """Cached features [N, V, *shape] (V variants: the image, its mirror) in a file instead of the heap: written row
    by row, read row by row into one batch's tensor, so that the page cache, which the system may reclaim, holds
    them rather than the process. The file is created beside `--out` and unlinked at once: nothing is left
    whatever ends the run, and no name is taken. Feature maps [C, H, W] are kept channels last (H, W, C order), the
    layout the network makes and takes: written and read without a transposing copy (docs/finetuning.md); `rows`
    gives the values the in-memory cache holds, channels-last strided."""

    def __init__(self, folder: Path, n: int, variants: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.n, self.variants, self.shape, self.dtype = n, variants, tuple(shape), dtype
        self.maps = len(self.shape) == 3  # feature maps [C, H, W]: kept as [H, W, C]
        self.row_bytes = math.prod(self.shape) * torch.empty(0, dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix=".features.", suffix=".tmp", dir=folder)
        os.unlink(path)  # open, nameless: removed by the system when closed, or when the process ends
        self.fd = fd
        try:
            if hasattr(os, "posix_fallocate"):  # a full disk fails here, not in the middle of caching
                os.posix_fallocate(fd, 0, self.nbytes)
            else:
                os.ftruncate(fd, self.nbytes)
        except OSError:
            os.close(fd)
            raise

    @property
    def nbytes(self) -> int:
        return self.n * self.variants * self.row_bytes

    def write(self, idx: torch.Tensor, variant: int, rows: torch.Tensor) -> None:
        stored = rows.permute(0, 2, 3, 1) if self.maps else rows  # a view of a channels-last network output
        data = stored.contiguous().numpy().view(np.uint8).reshape(len(idx), -1)
        for k, i in enumerate(idx.tolist()):
            os.pwrite(self.fd, data[k], (i * self.variants + variant) * self.row_bytes)

    def rows(self, idx: torch.Tensor, variant: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` ([len(idx), *shape]) of variant `variant` (per row; None: 0), or of every variant
        ([len(idx), V, *shape]) when the file has one variant per row and `variant` is None."""
        per = 1 if variant is not None or self.variants == 1 else self.variants
        out = torch.empty((len(idx), per * math.prod(self.shape)), dtype=self.dtype)
        buf = out.numpy().view(np.uint8).reshape(len(idx), -1)
        vs = [0] * len(idx) if variant is None else variant.tolist()
        for k, (i, v) in enumerate(zip(idx.tolist(), vs, strict=True)):
            if _read_into(self.fd, buf[k], (i * self.variants + v) * self.row_bytes) != len(buf[k]):
                raise PipelineError("the feature cache file ended early (removed or truncated while training?)")
        if not self.maps:
            return out.reshape(len(idx), *((per,) if per > 1 else ()), *self.shape)
        c, h, w = self.shape
        maps = out.reshape(len(idx), per, h, w, c).permute(0, 1, 4, 2, 3)  # [N, V, C, H, W], channels last
        return maps if per > 1 else maps[:, 0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def _read_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Read len(buf) bytes at `offset` into `buf` (preadv where there is one: Linux, the BSDs; else seek and readv:
    macOS)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [buf])


@torch.no_grad()
def compute_features(
    module: nn.Module, bank: ImageBank, device: torch.device, dtype: str, flip: bool, desc: str,
    folder: Path | None = None,
) -> torch.Tensor | FeatureFile:  # fmt: skip
    """`module` (in eval mode) over every image of the bank, once: [N, ...] (or [N, 2, ...] with flips), in a
    `FeatureFile` in `folder` when one is given (in memory where that file cannot be made)."""
    module.eval()
    out = None
    variants = (False, True) if flip else (False,)
    total = math.ceil(len(bank) / CHUNK)
    for idx, raw in tqdm(bank.chunks(), total=total, desc=desc, unit="batch", dynamic_ncols=True):
        for v, mirrored in enumerate(variants):  # each row's value depends on its chunk alone, not on this order
            x = prepared(raw, torch.full((len(idx),), mirrored) if mirrored else None).to(device)
            with autocast(device):
                y = module(x).to("cpu", getattr(torch, dtype))
            if out is None:
                out = _feature_cache(folder, len(bank), len(variants), tuple(y.shape[1:]), y.dtype)
            if isinstance(out, FeatureFile):
                out.write(idx, v, y)
            else:
                out[idx, v] = y
    return out if flip or isinstance(out, FeatureFile) else out[:, 0]


def _feature_cache(folder: Path | None, n: int, variants: int, shape: tuple[int, ...], dtype: torch.dtype):
    if folder is not None:
        try:
            return FeatureFile(folder, n, variants, shape, dtype)
        except OSError as e:
            log.warning("cannot keep the feature cache in a file in %s (%s): keeping it in memory", folder, e)
    return torch.empty((n, variants, *shape), dtype=dtype)


def cached_rows(
    cache: torch.Tensor | FeatureFile, idx: torch.Tensor, flip: torch.Tensor | None, flipped: bool,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Cached features of bank rows `idx` on `device` in float32 (the mirrored variant where `flip`, when
    the cache holds both: `flipped`)."""
    if isinstance(cache, FeatureFile):
        x = cache.rows(
            idx, (flip.long() if flip is not None else torch.zeros(len(idx), dtype=torch.long)) if flipped else None
        )
    elif flipped:
        x = cache[idx, flip.long() if flip is not None else 0]
    else:
        x = cache[idx]
    x = x.to(device).float()
    # the layout of the uncached path: dropout masks follow the memory layout
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def random_shift(x: torch.Tensor, cells: int) -> torch.Tensor:
    """Each feature map [N, C, H, W] moved by a random whole number of cells in [-cells, cells] on both axes, zeros
    moved in: a translation of the image by multiples of the map's stride, for features cached unshifted."""
    if cells <= 0 or x.dim() != 4:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (cells, cells, cells, cells))
    dy, dx = torch.randint(0, 2 * cells + 1, (2, n)).tolist()
    moved = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return moved.contiguous(memory_format=torch.channels_last)
