"""The `embed` stage: every image of a face set (an LFW protocol split, a folder tree, a `.bin` file), once,
through a network, into an HDF5 store."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline import outputs
from pipeline.distributed import init_world, split_range
from pipeline.embedding.cohort import Cohort, finish_store, model_cohort
from pipeline.embedding.parts import assemble, complete_part, part_path
from pipeline.embedding.validation_set import VALIDATION, validation_faces
from pipeline.errors import PipelineError
from pipeline.faces import facesets, images, lfw
from pipeline.nets import layers, models
from pipeline.nets.onnx_model import check_input_size, is_onnx, load_onnx
from pipeline.runtime import autocast, keep_freed_memory, reproducible_kernels, resolve_device, seed_everything
from pipeline.store.layout import OFFSETS, partial_path, recognise_partial, recognise_store
from pipeline.store.writer import StoreWriter

log = logging.getLogger(__name__)


def default_data_root() -> Path:
    return Path(os.environ.get("LFW_ROOT", "data"))


@dataclass(frozen=True)
class EmbedConfig:
    """Options of `embed` (see `cli.py embed --help`)."""

    out: Path
    """Output store (.h5); written as OUT.partial and renamed when complete."""
    data_root: Path = field(default_factory=default_data_root)
    """lfw: folder with LFW (`lfw-py/` or the image folder and protocol files); folder: DIR/<identity>/<image>;
    bin: the .bin file."""
    image_set: str = "deepfunneled"
    """original | funneled | deepfunneled (lfw only)."""
    protocol: str = "people"
    """people (View 1 people) | pairs (View 1 pairs) | 10fold (View 2 pairs.txt); lfw only."""
    split: str = "test"
    """train | test (lfw only; ignored by 10fold, which is one list) | validation (people: the held-out images a
    finetune checkpoint `weights` records as its `validation_paths`)."""
    dataset: str = "lfw"
    """lfw (protocol files) | folder (a folder per identity) | bin (insightface verification .bin)."""
    pairs_file: Path | None = None
    """folder only: CSV `path_a,path_b,same[,fold]` (paths relative to data_root) of pairs to store."""
    model: str = "squeezenet1_0"
    """A torchvision classification model (`torchvision.models.list_models`), `module:function` or `FILE.onnx` (an
    ONNX network run by onnxruntime: its first output is the embedding)."""
    weights: str = "imagenet"
    """imagenet | none | PATH (state_dict or finetune checkpoint); module:function takes none or PATH, FILE.onnx
    only none (the file holds its weights)."""
    input_size: int = 224
    """Side of the centre crop the network sees."""
    resize: int | None = None
    """Shorter side before the crop (None: input_size * 256 / 224)."""
    mean: tuple[float, float, float] = images.IMAGENET_MEAN
    """Per-channel mean subtracted from images in [0, 1]."""
    std: tuple[float, float, float] = images.IMAGENET_STD
    """Per-channel std dividing them."""
    layer: str = "output"
    """output (1000-d network output, the study's) | penultimate (not for FILE.onnx)."""
    tta_flip: bool = False
    """Test-time flip: each row is the mean of the image's and its mirror image's outputs."""
    tta_resizes: tuple[int, ...] = ()
    """Test-time scales: more shorter sides, each centre-cropped too; each row is the mean over the crops."""
    batch_size: int = 32
    """Images per forward pass; a resumed run must use the same value."""
    workers: int = 2
    """DataLoader worker processes that decode images (0 = in the main process)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    limit: int | None = None
    """Embed only the first N images (people) or the images of the first N pairs."""
    resume: bool = False
    """Continue OUT.partial left by an interrupted run with the same settings."""
    overwrite: bool = False
    """Replace an existing OUT."""
    skip_bad: bool = False
    """Leave out unreadable images (recorded in /skipped_paths) instead of stopping."""
    skip_missing: bool = False
    """Leave out listed images that are missing instead of stopping."""
    dtype: str = "float32"
    """float32 | float16 for /embeddings."""
    seed: int = 0
    """Seed (matters for --weights none)."""
    download: bool = False
    """Try torchvision's LFW download into the data root first."""
    deterministic: bool = False
    """Rows independent of threads and ranks (bit-identical under torchrun); slower on CPU (oneDNN off)."""

    def __post_init__(self):
        if self.image_set not in lfw.IMAGE_DIRS:
            raise ValueError(f"image_set must be one of {sorted(lfw.IMAGE_DIRS)}, got {self.image_set!r}")
        if self.protocol not in lfw.PROTOCOLS:
            raise ValueError(f"protocol must be one of {lfw.PROTOCOLS}, got {self.protocol!r}")
        if self.split not in (*lfw.SPLITS, VALIDATION):
            raise ValueError(f"split must be one of {(*lfw.SPLITS, VALIDATION)}, got {self.split!r}")
        if self.split == VALIDATION and (self.dataset, self.protocol) != ("lfw", "people"):
            raise ValueError("--split validation embeds LFW images (--dataset lfw --protocol people)")
        if self.split == VALIDATION and self.weights in ("imagenet", "none"):
            raise ValueError(
                "--split validation embeds the validation images of a finetune checkpoint: pass it as --weights"
            )
        if self.layer not in layers.LAYERS:
            raise ValueError(f"layer must be one of {layers.LAYERS}, got {self.layer!r}")
        models.check_model_name(self.model)
        if models.is_factory(self.model) and self.weights == "imagenet":
            raise ValueError(f"--model {self.model} has no ImageNet weights: pass --weights none or --weights PATH")
        if is_onnx(self.model) and (self.weights, self.layer) != ("none", "output"):
            raise ValueError(
                f"--model {self.model} is an ONNX network: it holds its weights (weights must be none) and its "
                f"first output is the embedding (layer must be output)"
            )
        if self.dataset not in facesets.DATASETS:
            raise ValueError(f"dataset must be one of {facesets.DATASETS}, got {self.dataset!r}")
        if self.dataset != "lfw" and (self.protocol != "people" or self.download):
            raise ValueError(
                f"--protocol and --download apply to --dataset lfw; a {self.dataset} set brings its own pairs"
                + (" (--pairs-file)" if self.dataset == "folder" else "")
            )
        if self.pairs_file is not None and self.dataset != "folder":
            raise ValueError("--pairs-file applies to --dataset folder")
        _ = self.preprocess  # checks sizes, mean and std
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("batch_size must be >= 1 and workers >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be a positive number of images or pairs")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")

    @property
    def preprocess(self) -> images.Preprocess:
        return images.Preprocess(
            self.input_size, self.resize, tuple(self.mean), tuple(self.std), tuple(self.tta_resizes)
        )


def store_arrays(proto: lfw.FaceSet) -> dict:
    return {
        "labels": proto.labels,
        "identities": proto.identities,
        "paths": proto.paths,
        "pairs": proto.pairs,
        "pair_labels": proto.pair_labels,
        "pair_folds": proto.pair_folds,
    }


def store_identity(cfg: EmbedConfig, proto: lfw.FaceSet) -> dict:
    """The attributes that define a store's content (a resumed or reused store must match them)."""
    identity = {
        "model": cfg.model,
        **models.network_provenance(cfg.model, cfg.weights),
        "layer": cfg.layer,
        "dataset": cfg.dataset,
        "image_set": proto.image_set,
        "protocol": proto.protocol,
        "split": "all" if proto.protocol == "10fold" else proto.split,
        "pairs_sha256": facesets.pairs_sha256(proto),
        "limit": cfg.limit or 0,
        "n_images": len(proto),
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "deterministic": cfg.deterministic,
        "transform": cfg.preprocess.describe(cfg.model),
    }
    return {**identity, "tta_flip": True} if cfg.tta_flip else identity  # stores of earlier versions stay valid


def store_extra(cfg: EmbedConfig, proto: lfw.FaceSet, device: torch.device, world_size: int) -> dict:
    """Attributes that describe how a store was made without changing its content."""
    return {
        "data_root": str(Path(cfg.data_root).resolve()),
        "n_skipped_missing": len(proto.skipped),
        "device": str(device),
        "world_size": world_size,
    }


def for_inference(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Inference set-up: eval mode, on the device, channels-last (faster CPU convolutions: docs/embedding.md)."""
    return module.eval().to(device, memory_format=torch.channels_last)


def forward(
    embedder: torch.nn.Module,
    x: torch.Tensor,
    device: torch.device,
    deterministic: bool = False,
    preprocess: images.Preprocess = images.IMAGENET,
) -> np.ndarray:
    """One inference batch of uint8 crops (`Preprocess.crop`) -> float32 numpy rows (the mean over each image's
    crops with test-time resizes)."""
    x = preprocess.normalize(x.to(device, non_blocking=True))
    with torch.inference_mode(), autocast(device), reproducible_kernels(device, deterministic):
        return images.mean_over_views(embedder, x).float().cpu().numpy()


def embed(cfg: EmbedConfig) -> Path:
    """Embed one face set (LFW protocol split, folder tree, .bin) into `cfg.out`; returns the complete store.

    Under torchrun each rank embeds a contiguous shard of whole batches into `OUT.partK` (resumable on its
    own); rank 0 then assembles the parts in order into OUT, identical to a single-process store."""
    out = Path(cfg.out)
    check_out(cfg)
    keep_freed_memory()
    # rank 0 (or the one process) holds OUT's lock; under torchrun every rank also locks its own part
    main = int(os.environ.get("RANK", "0")) == 0
    with outputs.claim(out, lambda: check_out(cfg)) if main else contextlib.nullcontext():
        return _embed(cfg, out)


def check_out(cfg: EmbedConfig) -> None:
    """OUT may be written: not one of the inputs, and absent or a store this tool wrote (with --overwrite)."""
    out = Path(cfg.out)
    inputs = [Path(cfg.weights)] if cfg.weights not in ("imagenet", "none") else []
    inputs += [Path(cfg.model)] if is_onnx(cfg.model) else []
    inputs += [Path(p) for p in (cfg.pairs_file, cfg.data_root if cfg.dataset == "bin" else None) if p is not None]
    outputs.check_file_out(out, inputs=inputs)
    if not (cfg.resume and os.path.lexists(out) and recognise_store(out) is None):  # resume checks it later
        outputs.check_replaceable(out, cfg.overwrite, recognise_store, "embedding store")


def load_faces(cfg: EmbedConfig) -> lfw.FaceSet:
    """The face set `cfg` names (its first `limit` images or pairs)."""
    if cfg.split == VALIDATION:
        return validation_faces(cfg.weights, cfg.data_root, cfg.image_set).limit(cfg.limit)
    return facesets.load_faceset(
        cfg.dataset, cfg.data_root, cfg.image_set, cfg.protocol, cfg.split, cfg.pairs_file, cfg.skip_missing
    ).limit(cfg.limit)


def check_partial(target: Path, resume: bool) -> None:
    """A leftover TARGET.partial is replaced only when this tool wrote it (and continued with `resume`)."""
    partial = partial_path(target)
    if not (resume and partial.exists()) and os.path.lexists(partial):
        reason = recognise_partial(partial)
        if reason is not None:
            raise PipelineError(f"refusing to replace {partial}: {reason}. Move it away or choose another --out.")
        log.info("starting over: replacing %s (pass --resume to continue it)", partial)


def _embed(cfg: EmbedConfig, out: Path) -> Path:
    if cfg.download:
        lfw.download_lfw(cfg.data_root, cfg.image_set)
    proto = load_faces(cfg)
    if len(proto) == 0:
        raise PipelineError("no images to embed (empty protocol or --limit 0)")
    identity = store_identity(cfg, proto)
    if cfg.resume and out.exists():  # a requeued run whose store was finished already
        if not complete_part(out, identity):
            problem = "exists and was made with other settings"
        elif not offsets_as_expected(out, cfg):
            problem = (
                f"is complete but has no score offsets, although {cfg.weights} holds a cohort (made by a version "
                f"without cohort normalisation)"
            )
        else:
            log.info("%s is already complete with these settings; nothing to do", out)
            return out
        if not cfg.overwrite:
            raise PipelineError(f"{out} {problem}; pass --overwrite to replace it")
    world, device = init_world(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    network = load_network(cfg, device)
    embedder = for_inference(layers.Embedder(network, cfg.layer, cfg.tta_flip), device)
    dim = layers.embedding_size(embedder, cfg.preprocess.shape, device)
    extra = store_extra(cfg, proto, device, world.size)
    cohort = model_cohort(cfg.weights, cfg.layer, cfg.tta_flip)
    job = _Job(cfg, proto, embedder, dim, device, identity, cohort)
    if world.size == 1:
        return job.run(out, range(len(proto)), store_arrays(proto), extra, final=True)
    # Shards of whole batches: every batch holds the same images as in a single-process run.
    n_batches = -(-len(proto) // cfg.batch_size)
    batches = split_range(n_batches, world.size, world.rank)
    rows = range(batches.start * cfg.batch_size, min(batches.stop * cfg.batch_size, len(proto)))
    parts = [part_path(out, k, world.size) for k in range(world.size)]
    with outputs.output_lock(parts[world.rank]):
        if not (cfg.resume and complete_part(parts[world.rank], job.part_identity(rows))):
            job.run(parts[world.rank], rows, {}, {}, final=False)
    world.barrier()
    if world.is_main:
        assemble(out, parts, len(proto), dim, identity, store_arrays(proto), extra, cfg.dtype, cohort)
    world.barrier()
    return out


def load_network(cfg: EmbedConfig, device: torch.device) -> torch.nn.Module:
    """The network of `cfg`: an ONNX file's through onnxruntime on `device`, else `models.build_model`."""
    if not is_onnx(cfg.model):
        return models.build_model(cfg.model, cfg.weights)
    network = load_onnx(cfg.model, device, cfg.deterministic)
    check_input_size(network, cfg.input_size)
    return network


def offsets_as_expected(store: Path, cfg: EmbedConfig) -> bool:
    """The store has score offsets exactly when `cfg`'s weights hold a cohort for this embedding (stores of
    earlier versions have none)."""
    with h5py.File(store, "r") as f:
        has = OFFSETS in f
    return has == (model_cohort(cfg.weights, cfg.layer, cfg.tta_flip) is not None)


@dataclass(frozen=True)
class _Job:
    """What every shard of one embed run shares."""

    cfg: EmbedConfig
    proto: lfw.FaceSet
    embedder: torch.nn.Module
    dim: int
    device: torch.device
    identity: dict
    cohort: Cohort | None = None
    """The model's cohort: the final store gets its score offsets (parts get them when assembled)."""

    def part_identity(self, rows: range) -> dict:
        return {**self.identity, "rows": f"{rows.start}:{rows.stop}"}

    def run(self, target: Path, rows: range, arrays: dict, extra: dict, final: bool) -> Path:
        """Embed `rows` into `target` (via target.partial); `final` drops unreadable rows, a part keeps
        them listed in its `bad_rows` attribute for the assembly."""
        cfg = self.cfg
        identity = self.part_identity(rows)
        partial = partial_path(target)
        check_partial(target, cfg.resume)
        writer = StoreWriter(target, len(rows), self.dim, identity, arrays, cfg.dtype, cfg.resume)
        try:
            bad = sorted(set(_fill(writer, self.embedder, self.proto, cfg, self.device, rows)))
            cohort, drop = (self.cohort, bad) if final else (None, None)  # parts: the assembly does both
            path = finish_store(writer, {**extra, "bad_rows": bad}, cohort, drop_rows=drop)
        except BaseException as e:
            done = writer.rows_done
            with contextlib.suppress(Exception):  # after a failed write the file may not close: it is reported
                writer.close()
            if not isinstance(e, PipelineError):  # a PipelineError's message says what to do
                log.error("stopped; %s keeps %d finished rows: rerun with --resume to continue", partial, done)
            raise
        if final:
            log.info("wrote %s (%d images, %d unreadable skipped)", path, len(rows) - len(bad), len(bad))
        return path


def _fill(writer: StoreWriter, embedder, proto, cfg: EmbedConfig, device, rows: range) -> list[int]:
    """Embed `rows` from `writer.rows_done` on (writer row 0 = rows.start); returns the (global) rows of
    unreadable images (with skip_bad)."""
    start = rows.start + writer.rows_done
    bad = [int(r) for r in writer.file.attrs.get("bad_rows", [])]
    pre = cfg.preprocess
    files = images.ImageFiles(
        [proto.source(i) for i in range(len(proto))], pre.crop(), pre.crops_shape, names=proto.paths
    )
    loader = DataLoader(
        Subset(files, range(start, rows.stop)),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )
    with tqdm(total=len(rows), initial=start - rows.start, unit="img", desc="embed", dynamic_ncols=True) as bar:
        for x, idx, errors in images.batches(loader):
            failed = [i for i, e in zip(idx.tolist(), errors, strict=True) if e]
            if failed and not cfg.skip_bad:
                raise PipelineError(
                    f"{errors[idx.tolist().index(failed[0])]} (pass --skip-bad to leave unreadable images out)"
                )
            y = forward(embedder, x, device, cfg.deterministic, pre)
            ok = np.isfinite(y).all(axis=1)
            ok[[idx.tolist().index(i) for i in failed]] = True
            if not ok.all():
                names = [proto.paths[i] for i in idx[~ok].tolist()]
                raise PipelineError(
                    f"the model produced NaN or infinite outputs for {len(names)} images, e.g. {names[:3]}; check the weights"
                )
            bad += failed
            writer.set_attrs({"bad_rows": bad})
            writer.write(int(idx[0]) - rows.start, y.astype(cfg.dtype))
            bar.update(len(idx))
    return bad
