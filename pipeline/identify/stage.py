"""The `identify` stage: open-set 1:N search of each trial's probes against its gallery (enrolled images, then
distractors), on the search loop of `pipeline.scoring.search`, into a results folder; a `--rows A:B` span of the
gallery into a part folder (`pipeline.identify.merge` joins parts); under torchrun each rank searches a span and
the ranks' states merge, exactly, into the one result."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.identify.config import IdentifyConfig
from pipeline.identify.folder import (
    IDENTIFY_FILES,
    MODE,
    STATE_FILE,
    check_identify_out,
    figure_writers,
    json_writer,
    write_identify_folder,
)
from pipeline.identify.operands import StoreGallery, enrolled, own_offsets, store_operands
from pipeline.identify.protocol import Trial, draw_trials, read_split, write_split
from pipeline.identify.results import distractor_cuts, identification_metrics, outcomes, write_searches
from pipeline.identify.state import SearchState, enrolled_state, merge_states, save_state
from pipeline.outputs import claim
from pipeline.report.results import PART_FILE, describe, json_attrs
from pipeline.scoring.blockmath import CHUNK
from pipeline.scoring.search import IdentityScores, TopScores, gallery_chunks, search
from pipeline.store.layout import Store, open_store

log = logging.getLogger(__name__)
ENROLLED_BYTES = 256 << 20  # the [probes, people] scores of one trial's enrolled images, at most, at a time


class Search:
    """One run's searches: the probes' operand (every row that is a probe in some trial, in store order), each
    trial's enrolled gallery and the distractors."""

    def __init__(self, cfg: IdentifyConfig, store: Store, distractors: list[Store], trials: list[Trial],
                 device=None):  # fmt: skip
        self.cfg, self.trials, self.labels = cfg, trials, store.labels
        ops, x = store_operands(store, cfg.metric, cfg.score_norm, distractors)
        offsets = own_offsets(store, cfg.metric, cfg.score_norm)
        self.probe_rows = np.unique(np.concatenate([t.probes for t in trials]))
        o = None if offsets is None else offsets[self.probe_rows]
        self.left = ops.probes(x[self.probe_rows], o, store.path, self.probe_rows)
        if device is not None and device.type != "cpu":  # the GPU's branch of the search loop
            import torch

            self.left = torch.from_numpy(self.left).to(device)
        self.enrolled = [enrolled(x, store.labels, offsets, t, cfg.template, ops, store.path) for t in trials]
        self.distractors = StoreGallery(distractors, ops, cfg.metric, cfg.score_norm)
        self.cuts = distractor_cuts(self.distractors.n)
        self.sign = -1.0 if ops.negate else 1.0
        self.offsets_used = ops.offsets

    @property
    def enrolled_rows(self) -> int | None:
        """Rows of every trial's enrolled gallery (None when they differ)."""
        sizes = {e.gallery.n for e in self.enrolled}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def gallery_rows(self) -> int:
        """Rows of the gallery a span counts: enrolled, then distractors."""
        e = self.enrolled_rows
        return (max(x.gallery.n for x in self.enrolled) if e is None else e) + self.distractors.n

    def check_span(self, span: tuple[int, int]) -> None:
        if span[1] > self.gallery_rows:
            raise PipelineError(f"--rows {span[0]}:{span[1]}: the gallery has {self.gallery_rows} rows "
                                f"(enrolled images, then distractors)")  # fmt: skip
        if self.enrolled_rows is None and span != (0, self.gallery_rows) and self.distractors.n:
            raise PipelineError("--rows with distractors needs trials with galleries of one size: this split's "
                                "trials enrol different numbers of images")  # fmt: skip

    def run(self, span: tuple[int, int]) -> SearchState:
        """The state of the gallery span `span` (the whole gallery: (0, gallery_rows)). The enrolled images come
        first: each probe's lowest mate score over the trials is its floor in the distractors' search (no
        distractor below it changes a rank; a search's best is kept whatever its floor)."""
        q, r = len(self.probe_rows), self.cfg.max_rank
        mates, vals, ids = [], [], []
        floor = np.full(q, np.inf, np.float32)
        for trial, gallery in zip(self.trials, self.enrolled, strict=True):
            at = np.searchsorted(gallery.people, self.labels[self.probe_rows])
            found = gallery.people[np.minimum(at, len(gallery.people) - 1)] == self.labels[self.probe_rows]
            mate_ids = np.where(found, at, -1)
            whole = (0, gallery.gallery.n)
            m, v, i = self._enrolled_state(gallery, whole, mate_ids)
            mated = np.isin(self.probe_rows, trial.mated)
            floor[mated] = np.minimum(floor[mated], m[mated])
            mine = (span[0], min(span[1], gallery.gallery.n))
            if mine != whole:  # a part: its own span of the enrolled images
                m, v, i = self._enrolled_state(gallery, mine, mate_ids)
            mates.append(m), vals.append(v), ids.append(i)
        e = self.enrolled_rows or 0
        lo, hi = max(span[0] - e, 0), min(span[1] - e, self.distractors.n)
        if span == (0, self.gallery_rows):
            lo, hi = 0, self.distractors.n  # the whole gallery, whatever the trials' gallery sizes
        top = TopScores(q, r, self.cuts, floor)
        if hi > lo:
            search(self.left, self.distractors, (lo, hi), top, progress=self.cfg.progress)
        d, seg = top.finish()
        return SearchState(np.stack(mates), np.stack(vals), np.stack(ids), d, seg)

    def _enrolled_state(self, enrolled, span: tuple[int, int], mate_ids: np.ndarray) -> tuple:
        """`enrolled_state` of the gallery rows in `span`, for the probes in chunks of whole canonical blocks whose
        [probes, people] scores take at most `ENROLLED_BYTES` (the same products as all probes at once)."""
        rows = max(1, ENROLLED_BYTES // (4 * max(1, len(enrolled.people))) // CHUNK) * CHUNK
        parts = []
        for q0, q1 in gallery_chunks(len(self.probe_rows), (0, len(self.probe_rows)), rows):
            reducer = IdentityScores(q1 - q0, enrolled.ids, len(enrolled.people))
            if span[1] > span[0]:
                search(self.left[q0:q1], enrolled.gallery, span, reducer)
            parts.append(enrolled_state(reducer.result(), mate_ids[q0:q1], self.cfg.max_rank))
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    def outcomes(self, state: SearchState) -> list:
        return outcomes(state, self.trials, self.probe_rows, self.labels)


def load_trials(cfg: IdentifyConfig, labels: np.ndarray) -> list[Trial]:
    if cfg.split is not None:
        return read_split(cfg.split, labels)
    return draw_trials(labels, cfg.gallery_people, cfg.gallery_images, cfg.trials, cfg.seed)


def identify(cfg: IdentifyConfig) -> dict:
    """Search, write the results (or part) folder, return metrics.json's (or part.json's) dict."""
    from pipeline.distributed import init_world

    out = None if cfg.out is None else Path(cfg.out)
    inputs = [Path(cfg.store), *cfg.distractors, *([cfg.split] if cfg.split else [])]
    if out is not None:
        check_identify_out(out, cfg.overwrite, inputs)
    from pipeline.runtime import resolve_device

    world, device = init_world(resolve_device(cfg.device))
    if cfg.rows is not None and world.size > 1:
        raise PipelineError("--rows splits the work by hand (job arrays): run it without torchrun")
    world.barrier()
    if out is None or not world.is_main:
        return _identify(cfg, world, device)
    with claim(out, lambda: check_identify_out(out, cfg.overwrite, inputs), IDENTIFY_FILES):
        return _identify(cfg, world, device)


def _identify(cfg: IdentifyConfig, world, device) -> dict:
    from pipeline.distributed import all_gather_objects, split_range
    from pipeline.runtime import full_float32

    t0 = time.perf_counter()
    with open_store(cfg.store) as store, contextlib.ExitStack() as stack:
        others = [stack.enter_context(open_store(p, need_labels=False)) for p in cfg.distractors]
        s = Search(cfg, store, others, load_trials(cfg, store.labels), device)
        g = s.gallery_rows
        span = cfg.rows or (0, g)
        if world.size > 1:
            share = split_range(g, world.size, world.rank)
            span = (share.start, share.stop)
        s.check_span(span)
        t1 = time.perf_counter()
        with full_float32(device):
            state = s.run(span)
        if world.size > 1:
            state, span = merge_states(all_gather_objects(state)), (0, g)
        info = _description(cfg, store, others, s, span, world.size, device)
        info.update(seconds=time.perf_counter() - t0, seconds_prepare=t1 - t0, seconds_search=time.perf_counter() - t1)
    if span != (0, g):
        if cfg.out is not None:
            write_part(Path(cfg.out), info, state, s)
        return info
    metrics = finish(info, state, s, cfg.seed)
    if cfg.out is not None and world.is_main:
        write_results(Path(cfg.out), metrics, s.trials, s.outcomes(state), s.sign)
    return metrics


def finish(info: dict, state: SearchState, s, seed: int) -> dict:
    """metrics.json's dict of a whole search (`s`: what `Search` gives, or a merge's stand-in)."""
    figures = identification_metrics(s.outcomes(state), info["max_rank"], s.cuts, seed, s.sign)
    out = {k: v for k, v in info.items() if k != "rows"}
    out.update(figures)
    log.info("rank 1 %.4f, FNIR at FPIR 0.01 %.4f over %d trials in %.2f s", figures["cmc"][0],
             figures["fnir_at_fpir"]["0.01"], len(s.trials), info["seconds"])  # fmt: skip
    return out


def _description(cfg: IdentifyConfig, store: Store, others: list[Store], s: Search, span, world_size: int,
                 device) -> dict:  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["distractors"] = [str(p) for p in cfg.distractors]
    return {
        "mode": MODE,
        **describe(json_attrs(store.attrs), Path(cfg.store), cfg.label, None),
        "metric": cfg.metric,
        "template": cfg.template,
        "max_rank": cfg.max_rank,
        "score_norm": s.offsets_used,
        "store_n": store.n,
        "store_dim": store.dim,
        "n_trials": len(s.trials),
        "gallery_people": [len(e.people) for e in s.enrolled],
        "n_probes": len(s.probe_rows),
        "n_distractors": s.distractors.n,
        "distractor_stores": [str(o.path) for o in others],
        "gallery_rows": s.gallery_rows,
        "rows": list(span),
        "world_size": world_size,
        "device": str(device),
        "config": config,
    }


def write_results(out: Path, metrics: dict, trials: list[Trial], outcomes: list, sign: float) -> None:
    files = {
        "metrics.json": json_writer(metrics),
        "split.csv": partial(write_split, trials=trials),
        "searches.csv": lambda p: write_searches(p, outcomes, sign),
        **figure_writers(metrics),
    }
    write_identify_folder(out, files)


def write_part(out: Path, info: dict, state: SearchState, s: Search) -> None:
    files = {
        PART_FILE: json_writer(info, null_nan=False),
        STATE_FILE: lambda p: save_state(p, state, probe_rows=s.probe_rows, labels=s.labels),
        "split.csv": partial(write_split, trials=s.trials),
    }
    write_identify_folder(out, files)
