"""Configuration of the `score` stage (`ScoreConfig`): which pairs of which store, how, and where the results go;
one config for every path (in memory, torchrun ranks, listed pairs, `--rows` spans read from the store)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.metrics.binning import METRICS

MAX_BLOCK = 4096  # a tile holds at most 2^24 values: float32 histogram counts stay exact


def parse_rows(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B (B is checked against the store later)."""
    a, sep, b = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        start, stop = int(a), int(b)
    except ValueError:
        raise ValueError(f"--rows must be A:B (two integers, e.g. 0:2000), not {text!r}") from None
    if start < 0 or stop <= start:
        raise ValueError(f"--rows {text}: need 0 <= A < B")
    return start, stop


@dataclass(frozen=True)
class ScoreConfig:
    """Configuration of `score`: which pairs of which store, how, and where the results go."""

    store: Path | None
    """The HDF5 embedding store (needs /embeddings and /labels; /pairs for `pairs`); None with `scores`."""
    out: Path | None = None
    """Results folder (metrics.json, roc.csv, roc.png, histogram.npz); None writes nothing. With `rows`: a part
    folder (part.json, histogram.npz; the full results too when the part covers every row)."""
    all_pairs: bool = True
    """True: every unordered pair i < j. False: the pairs listed in the store (embed --protocol pairs|10fold)."""
    metric: str = "l2"
    """l2: Euclidean distance (the study's); cosine: cosine similarity."""
    bins: int = 1 << 18
    """Histogram bins over the data's score range (more bins: smaller `auc_error_bound`, slower; every part of
    one merge needs the same)."""
    block: int = 4096
    """Rows per tile side (a tile holds block^2 scores; at most 4096; every part of one merge needs the same)."""
    backend: str = "torch"
    """torch, or faiss (pairwise distances by FAISS; falls back to torch when faiss is not installed)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    gemm: str = "auto"
    """Tile products of the torch backend: auto (NumPy's BLAS on the CPU, torch on CUDA), torch or numpy."""
    exact: bool = False
    """Also compute the exact AUC by sorting every score in float64 (checking; needs memory for all pairs)."""
    rank1: bool = False
    """Also compute rank-1 identification accuracy (nearest other image shows the same person)."""
    overwrite: bool = False
    """Replace an existing results folder."""
    log_fpr: bool = False
    """Draw roc.png with a logarithmic false-positive-rate axis."""
    seed: int = 0
    """Seed of the pair sample that sets the bin range (every part of one merge needs the same)."""
    sample_pairs: int = 1 << 18
    """About this many pairs (random rows against all rows) are scored first to find the score range for the bins."""
    progress: bool = True
    """Show a progress bar with pairs/s."""
    label: str | None = None
    """Name of this result in legends and tables (default: model and weights from the store)."""
    variant: str | None = None
    """pretrained or finetuned, for `report`'s table (default: guessed from the store's weights)."""
    score_norm: bool = True
    """Subtract the store's score offsets (cohort normalisation, cosine only) when it has them; False: plain
    scores (`--no-score-norm`)."""
    rows: tuple[int, int] | None = None
    """[A, B): only the pairs i < j with A <= i < B, rows counted in label order, read from the store in blocks
    (out of core, `pipeline.scoring.rows`); the parts add up with `merge`. None: every pair, in memory."""
    scores: Path | None = None
    """A score file (another system's scores) scored in place of a store (`pipeline.scoring.scorefiles`)."""
    score_format: str = "bob4"
    """The format of `scores`: bob4, bob5, bobcsv, pyeer (with `impostor_scores`) or csv."""
    impostor_scores: Path | None = None
    """pyeer's impostor file (`scores` then holds the genuine scores)."""
    export: str | None = None
    """Also write the listed pairs' scores into the results folder: bob4 (scores.bob4) or csv (scores.csv)."""
    calibrate_on: Path | None = None
    """A results folder of `score` (same network and metric, another set) on whose histograms a logistic
    calibration (score -> log-likelihood ratio) is fitted and applied here: Cllr, minCllr, calibration.png
    (`pipeline.scoring.calibrate`). None: no calibration."""
    threshold_from: Path | None = None
    """A results folder of `score` (same network and metric, another set) whose threshold for FAR `at_far` is
    carried here: the FAR and FRR it gives on these pairs, their 95% upper bounds, whether the claim holds
    (`pipeline.scoring.carry`). None: none."""
    at_far: float | None = None
    """The FAR (0 < F < 1) whose threshold `threshold_from` gives."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be l2 or cosine, not {self.metric!r}")
        if not 2 <= self.bins <= 1 << 24:
            raise ValueError(f"--bins must be between 2 and {1 << 24}, not {self.bins}")
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(
                f"--block must be between 1 and {MAX_BLOCK} (a tile holds block^2 scores), not {self.block}"
            )
        if self.gemm not in ("auto", "torch", "numpy"):
            raise ValueError(f"gemm must be auto, torch or numpy, not {self.gemm!r}")
        if self.backend not in ("torch", "faiss"):
            raise ValueError(f"--backend must be torch or faiss, not {self.backend!r}")
        if self.sample_pairs < 1:
            raise ValueError(f"sample_pairs must be at least 1, not {self.sample_pairs}")
        if self.variant not in (None, "pretrained", "finetuned"):
            raise ValueError(f"variant must be pretrained or finetuned, not {self.variant!r}")
        if self.rows is not None:
            self._check_rows()
        self._check_files()

    def _check_files(self) -> None:
        if (self.store is None) == (self.scores is None):
            raise ValueError("score a store or a score file (--scores FILE): exactly one")
        if self.export is not None and (self.all_pairs or self.scores is not None):
            raise ValueError(
                "--export writes the scores of listed pairs (--pairs); all pairs would be N(N-1)/2 lines: the "
                "results folder already holds their histogram (histogram.npz) with the exact tail of the most "
                "similar pairs and every same-person score's bin"
            )
        if self.calibrate_on is not None and (self.scores is not None or self.rows is not None):
            raise ValueError("--calibrate-on goes with a store scored whole (not yet with --scores or --rows)")
        if (self.threshold_from is None) != (self.at_far is None):
            raise ValueError("--threshold-from DIR and --at-far F go together")
        if self.at_far is not None and not 0 < self.at_far < 1:
            raise ValueError(f"--at-far must be a rate between 0 and 1, not {self.at_far}")
        if self.threshold_from is not None and (self.scores is not None or self.rows is not None):
            raise ValueError("--threshold-from goes with a store scored whole (not yet with --scores or --rows)")
        if self.scores is not None and (self.rows is not None or self.exact or self.rank1):
            raise ValueError("--rows, --exact and --rank1 go with a store, not with --scores")

    def _check_rows(self) -> None:
        if not 0 <= self.rows[0] < self.rows[1]:
            raise ValueError(f"--rows must satisfy 0 <= A < B, not {self.rows}")
        if not self.all_pairs:
            raise ValueError("--rows goes with --all-pairs")
        for flag in ("exact", "rank1"):
            if getattr(self, flag):
                raise ValueError(f"--{flag} needs the whole store in memory: drop --rows")
