"""Cohort score normalisation: each image's offset from a cohort of other people's images.

Some images are similar to many faces (a blurred, dark or turned face; a common expression); their impostor
scores are high, and at a low false accept rate such images can take most of the accepted impostors. The
cohort normalisation (the mean-only form of adaptive score normalisation, AS-norm) corrects for it: an image's
offset o is half the mean of its K largest cosine similarities with a cohort of images of people the score never
sees (for a fine-tuned model: its training images), and the score of two images is

    cos(x_i, x_j) - o_i - o_j

`finetune --cohort-top K` stores the cohort's embedding in the checkpoint; `embed` then computes the offsets of
the rows it stored and writes them into the store (`/score_offsets`, `pipeline.store.layout.OFFSETS`;
`finish_store`), and `score` applies them in every path."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.nets.models import read_weights_file
from pipeline.store.layout import OFFSETS, SCORE_NORM
from pipeline.store.writer import StoreWriter

log = logging.getLogger(__name__)

OFFSET_ROWS = 2048  # rows against the cohort at a time (bounded memory)


@dataclass(frozen=True)
class Cohort:
    """The cohort's unit-length embeddings and K, the number of most similar cohort images an offset averages."""

    embedding: np.ndarray
    """[M, D] float32, unit-length rows."""
    top: int
    source: str = ""
    """What the cohort is (for the store's `score_norm` attribute)."""

    def __post_init__(self):
        if self.embedding.ndim != 2 or len(self.embedding) == 0:
            raise PipelineError(f"the cohort of {self.source or 'the model'} is empty or not a matrix")
        if not 1 <= self.top <= len(self.embedding):
            raise PipelineError(f"cohort top {self.top} must be in 1..{len(self.embedding)} (the cohort's images)")

    @classmethod
    def from_checkpoint(cls, meta: dict, source: str) -> Cohort | None:
        """The cohort of a `finetune` checkpoint (`cohort`, `cohort_top`), or None when it has none."""
        if meta.get("cohort") is None:
            return None
        emb = np.asarray(meta["cohort"].float().numpy() if hasattr(meta["cohort"], "numpy") else meta["cohort"])
        return cls(emb.astype(np.float32), int(meta["cohort_top"]), source)

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        """float32 [n]: half the mean of each row's `top` largest cosines with the cohort (rows of any length;
        all-zero rows get 0)."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape[1:] != self.embedding.shape[1:]:
            raise PipelineError(
                f"the embedding has {rows.shape[1]} dimensions but the cohort {self.embedding.shape[1]}: the store "
                f"and the model's cohort do not match"
            )
        out = np.zeros(len(rows), dtype=np.float32)
        k = self.top
        for s in range(0, len(rows), OFFSET_ROWS):
            x = rows[s : s + OFFSET_ROWS]
            norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
            sims = (x / np.where(norms > 0, norms, 1)[:, None]) @ self.embedding.T
            top = np.partition(sims, len(self.embedding) - k, axis=1)[:, len(self.embedding) - k :]
            out[s : s + len(x)] = 0.5 * top.mean(axis=1, dtype=np.float64)
        return out

    def attrs(self) -> dict:
        """The store attributes that say which normalisation its offsets are."""
        digest = hashlib.sha256(np.ascontiguousarray(self.embedding).tobytes()).hexdigest()
        return {
            SCORE_NORM: (
                f"cohort mean: score = cos - o_i - o_j, o = half the mean of the {self.top} largest cosines with "
                f"{len(self.embedding)} cohort images ({self.source})"
            ),
            "cohort_top": self.top,
            "cohort_size": len(self.embedding),
            "cohort_sha256": digest,
        }


def model_cohort(weights: str, layer: str, tta_flip: bool) -> Cohort | None:
    """The cohort of a `finetune` checkpoint `weights`, when it has one and was embedded as `embed` will embed
    (the same layer and test-time flip); None otherwise (with a warning when the embedding differs)."""
    if weights in ("imagenet", "none") or not Path(weights).is_file():
        return None
    _, meta = read_weights_file(weights)
    cohort = Cohort.from_checkpoint(meta, f"{Path(weights).name}: its training images")
    if cohort is None:
        return None
    config = meta.get("config", {})
    if (config.get("layer"), bool(config.get("tta_flip"))) != (layer, bool(tta_flip)):
        log.warning(
            "%s holds a cohort for --layer %s%s; this store is embedded with --layer %s%s, so it gets no score "
            "offsets (scores are plain cosines)",
            weights,
            config.get("layer"),
            " --tta-flip" if config.get("tta_flip") else "",
            layer,
            " --tta-flip" if tta_flip else "",
        )
        return None
    return cohort


def finish_store(
    writer: StoreWriter, extra_attrs: dict, cohort: Cohort | None, drop_rows: list[int] | None = None
) -> Path:
    """Complete the store of `writer` (`StoreWriter.finish`); with a `cohort`, with the score offsets of its rows
    as stored (a float16 store's offsets are those of its float16 rows), read back `OFFSET_ROWS` at a time, and
    the attributes that say which normalisation they are."""
    if cohort is None:
        return writer.finish(extra_attrs, drop_rows=drop_rows)
    n = writer.n
    offsets = np.concatenate(
        [cohort.offsets(writer.rows(s, min(s + OFFSET_ROWS, n))) for s in range(0, n, OFFSET_ROWS)]
        or [np.zeros(0, dtype=np.float32)]
    )
    return writer.finish({**cohort.attrs(), **extra_attrs}, drop_rows=drop_rows, arrays={OFFSETS: offsets})
