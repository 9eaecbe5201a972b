"""Several stores of one image set in one pass (`run`'s embedding step): each image decoded once, and the
first layers that the networks share run once per image.

`run` embeds LFWPairs test and LFWPeople test, with the pretrained and the fine-tuned network. The pairs' images
are among the people's, and the best recipe trains only the last blocks, so the fine-tuned network's frozen
part is the pretrained network's. Here every image that any of the stores lists is decoded once; the networks
are split into a frozen part and a tail (`pipeline.nets.split.split_model`, the cut fine-tuning used), networks whose frozen parts
hold equal weights share one run of it, and each tail runs on its output (and on the mirror image's, for a
network embedded with test-time flip). Each store is then written as `embed` writes it, with the same
attributes, from rows held in memory (images x dimension x networks: a few MB for LFW)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import outputs
from pipeline.embedding.cohort import finish_store, model_cohort
from pipeline.embedding.embed import (
    EmbedConfig,
    check_out,
    check_partial,
    for_inference,
    load_faces,
    store_arrays,
    store_extra,
    store_identity,
)
from pipeline.errors import PipelineError
from pipeline.faces import images, lfw
from pipeline.nets import models
from pipeline.nets.split import same_state, split_model
from pipeline.runtime import autocast, keep_freed_memory, resolve_device, seed_everything
from pipeline.store.writer import StoreWriter

log = logging.getLogger(__name__)


@dataclass
class _Network:
    """One (weights, layer, flip, test-time resizes) network: the frozen part it runs (maybe another network's),
    its tail, and which of the pass's crops it averages (`views`: 0 is the centre crop at the usual resize)."""

    key: tuple
    frozen: torch.nn.Module
    tail: torch.nn.Module
    flip: bool
    views: tuple[int, ...] = (0,)
    rows: np.ndarray | None = None


def _key(cfg: EmbedConfig) -> tuple:
    return (cfg.weights, cfg.layer, cfg.tta_flip, tuple(cfg.tta_resizes))


def _resizes(cfgs: list[EmbedConfig]) -> tuple[int, ...]:
    """The test-time resizes of all the stores: the pass crops each image at these too."""
    return tuple(sorted({r for c in cfgs for r in c.tta_resizes}))


def build_networks(cfgs: list[EmbedConfig], blocks: int | None, device: torch.device) -> list[_Network]:
    """The distinct networks of `cfgs`; a network whose frozen part equals an earlier one's runs that one."""
    nets: list[_Network] = []
    union = _resizes(cfgs)
    for cfg in cfgs:
        key = _key(cfg)
        if any(n.key == key for n in nets):
            continue
        model = for_inference(models.build_model(cfg.model, cfg.weights), device)
        frozen, tail = split_model(model, cfg.layer, blocks)
        shared = next((n.frozen for n in nets if same_state(n.frozen, frozen)), None)
        if shared is not None:
            log.info("%s shares its first layers with an earlier network: they run once per image", cfg.weights)
        views = (0, *(1 + union.index(r) for r in cfg.tta_resizes))
        nets.append(_Network(key, shared or frozen, tail, cfg.tta_flip, views))
    return nets


def embed_together(
    cfgs: list[EmbedConfig], blocks: int | None = None, faces: list[lfw.FaceSet] | None = None
) -> list[Path]:
    """Write the store of every config (LFW protocol splits of one data root, one model and preprocessing; any
    weights, layers, test-time flips and resizes), each image decoded once and shared first layers run once.
    `faces`: each store's face set, instead of the one its config names (finetune's validation images)."""
    base = cfgs[0]
    if any(
        (c.model, replace(c.preprocess, tta_resizes=()), c.data_root, c.image_set, c.dataset)
        != (base.model, replace(base.preprocess, tta_resizes=()), base.data_root, base.image_set, base.dataset)
        for c in cfgs
    ):
        raise ValueError("embed_together: the stores must share the model, preprocessing and image set")
    keep_freed_memory()
    for cfg in cfgs:
        check_out(cfg)
    with contextlib.ExitStack() as stack:
        for cfg in cfgs:
            stack.enter_context(outputs.claim(Path(cfg.out), lambda cfg=cfg: check_out(cfg)))
        return _embed_together(cfgs, blocks, faces)


def _embed_together(cfgs: list[EmbedConfig], blocks: int | None, faces: list[lfw.FaceSet] | None) -> list[Path]:
    base = cfgs[0]
    protos = faces or [load_faces(c) for c in cfgs]
    index: dict[str, int] = {}  # image file -> row of the union
    names: list[str] = []
    for proto in protos:
        for i in range(len(proto)):
            file = str(proto.absolute(i))
            if file not in index:
                index[file] = len(names)
                names.append(proto.paths[i])
    device = resolve_device(base.device)
    seed_everything(base.seed)
    nets = build_networks(cfgs, blocks, device)
    pre = replace(base.preprocess, tta_resizes=_resizes(cfgs))
    files = images.ImageFiles(list(index), pre.crop(), pre.crops_shape, names=names)
    loader = DataLoader(files, batch_size=base.batch_size, num_workers=base.workers, pin_memory=device.type == "cuda")
    log.info("embedding %d images once for %d stores (%d networks)", len(files), len(cfgs), len(nets))
    with tqdm(total=len(files), unit="img", desc="embed (shared)", dynamic_ncols=True) as bar:
        for x, idx, errors in images.batches(loader):
            bad = [e for e in errors if e]
            if bad:
                raise PipelineError(bad[0])
            _forward(nets, pre.normalize(x.to(device)), idx, len(files))
            bar.update(len(idx))
    for net in nets:
        finite = np.isfinite(net.rows).all(axis=1)
        if not finite.all():
            bad_names = [names[i] for i in np.flatnonzero(~finite)[:3]]
            raise PipelineError(f"the model produced NaN or infinite outputs for {bad_names}; check the weights")
    by_key = {n.key: n for n in nets}
    paths = []
    for cfg, proto in zip(cfgs, protos, strict=True):
        rows = by_key[_key(cfg)].rows
        own = rows[[index[str(proto.absolute(i))] for i in range(len(proto))]]
        paths.append(_write(cfg, proto, own, device))
    return paths


@torch.inference_mode()
def _forward(nets: list[_Network], x: torch.Tensor, idx: torch.Tensor, n: int) -> None:
    """Each network's rows of one batch `x` ([B, 3, S, S], or crops [B, V, 3, S, S]): every distinct frozen part
    once per crop (and on the mirror images once); a network's row is the mean over its crops."""
    z: dict[tuple[int, int, bool], torch.Tensor] = {}  # (frozen part, crop, mirrored) -> its output

    def frozen(net: _Network, view: int, mirrored: bool) -> torch.Tensor:
        key = (id(net.frozen), view, mirrored)
        if key not in z:
            crop = x if x.dim() == 4 else x[:, view]
            z[key] = net.frozen((crop.flip(-1) if mirrored else crop).contiguous(memory_format=torch.channels_last))
        return z[key]

    with autocast(x.device):
        for net in nets:
            ys = []
            for view in net.views:
                y = net.tail(frozen(net, view, False)).float()
                if net.flip:
                    y = (y + net.tail(frozen(net, view, True)).float()) / 2
                ys.append(y)
            y = ys[0] if len(ys) == 1 else torch.stack(ys, 1).mean(1)
            if net.rows is None:
                net.rows = np.empty((n, y.shape[1]), dtype=np.float32)
            net.rows[idx.numpy()] = y.cpu().numpy()


def embed_from_frozen(
    cfg: EmbedConfig, faces: lfw.FaceSet, frozen_out: Callable[[np.ndarray, bool], torch.Tensor],
    matches: Callable[[torch.nn.Module], bool], blocks: int | None = None, source: str = "",
) -> Path | None:  # fmt: skip
    """The store of `cfg` over `faces` with its network's tail run on outputs of the frozen part made before
    (`frozen_out(rows, mirrored)`: those of faces' rows, of their mirror images where `mirrored`; finetune's feature
    cache) instead of on the images: as `embed_together` computes it, from those outputs. None, and nothing
    written, where `matches(frozen part)` says they are not this network's, or the store needs test-time resizes.
    `source` says in the store's attributes where the outputs came from."""
    device = resolve_device(cfg.device)
    (net,) = build_networks([cfg], blocks, device)
    if net.views != (0,) or not matches(net.frozen):
        return None
    rows = None
    with torch.inference_mode(), autocast(device):
        for s in range(0, len(faces), cfg.batch_size):
            idx = np.arange(s, min(s + cfg.batch_size, len(faces)))
            y = net.tail(frozen_out(idx, False)).float()
            if net.flip:
                y = (y + net.tail(frozen_out(idx, True)).float()) / 2
            if rows is None:
                rows = np.empty((len(faces), y.shape[1]), dtype=np.float32)
            rows[idx] = y.cpu().numpy()
    if rows is None or not np.isfinite(rows).all():
        raise PipelineError(f"the model produced NaN or infinite outputs for {cfg.out}; check the weights")
    with outputs.claim(Path(cfg.out), lambda: check_out(cfg)):
        return _write(cfg, faces, rows, device, {"frozen_outputs": source})


def _write(cfg: EmbedConfig, proto, rows: np.ndarray, device: torch.device, more: dict | None = None) -> Path:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_partial(out, resume=False)
    writer = StoreWriter(out, len(rows), rows.shape[1], store_identity(cfg, proto), store_arrays(proto), cfg.dtype)
    try:
        writer.write(0, rows.astype(cfg.dtype))
        extra = {**store_extra(cfg, proto, device, 1), "bad_rows": [], "shared_pass": True, **(more or {})}
        path = finish_store(writer, extra, model_cohort(cfg.weights, cfg.layer, cfg.tta_flip))
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        raise
    log.info("wrote %s (%d images)", path, len(rows))
    return path
