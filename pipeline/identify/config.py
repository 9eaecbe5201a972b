"""Configuration of the `identify` stage (`IdentifyConfig`): which store, which protocol, which gallery span,
and where the results go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.metrics.binning import METRICS

TEMPLATES = ("best", "mean")


@dataclass(frozen=True)
class IdentifyConfig:
    """Configuration of `identify`."""

    store: Path
    """The store of probes and enrolled images (needs /labels)."""
    out: Path | None = None
    """Results folder (metrics.json, split.csv, searches.csv, cmc.png, iet.png); with `rows`, a part folder
    (part.json, search.npz, split.csv) that `merge` joins. None writes nothing."""
    distractors: tuple[Path, ...] = ()
    """Stores whose rows join every trial's gallery, each an identity of its own (never a probe's mate)."""
    gallery_people: int | None = None
    """People enrolled in each trial, among those with at least gallery_images + 1 images (default: half of
    them)."""
    gallery_images: int = 1
    """Images enrolled per person; the person's other images are mated probes."""
    trials: int = 10
    """Random splits (averaged; intervals over them)."""
    seed: int = 0
    """Seed of the splits and of the bootstrap."""
    split: Path | None = None
    """The trials from a split.csv (`trial,row,role`, as identify writes it) instead of drawing them."""
    template: str = "best"
    """An enrolled person's score: best (the best over their images) or mean (their mean unit-length embedding;
    cosine only)."""
    max_rank: int = 50
    """Ranks of the CMC (and top scores kept per search)."""
    metric: str = "cosine"
    """cosine (minus the stores' score offsets, as score computes it) or l2 (squared Euclidean distance)."""
    rows: tuple[int, int] | None = None
    """[A, B): search only this span of each trial's gallery (its enrolled images in identity order, then the
    distractors), into a part folder; `merge` joins the parts. None: the whole gallery."""
    score_norm: bool = True
    """Subtract the stores' score offsets (cosine) when they have them; False: plain cosines."""
    overwrite: bool = False
    """Replace an existing results folder (only one that identify or merge wrote)."""
    progress: bool = True
    """Show a progress bar over the distractors."""
    label: str | None = None
    """Name of this result in legends and tables (default: the store's model)."""
    device: str = "cpu"
    """cpu (NumPy's BLAS in fixed blocks: the same bits in any split of the work), cuda (torch on the GPU, full
    float32 products, no TF32), or auto (cuda when there is one)."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be l2 or cosine, not {self.metric!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"--template must be best or mean, not {self.template!r}")
        if self.template == "mean" and self.metric != "cosine":
            raise ValueError("--template mean averages unit-length embeddings: use it with --metric cosine")
        if self.max_rank < 1:
            raise ValueError(f"--max-rank must be at least 1, not {self.max_rank}")
        if self.trials < 1 or self.gallery_images < 1:
            raise ValueError("--trials and --gallery-images must be at least 1")
        if self.gallery_people is not None and self.gallery_people < 1:
            raise ValueError(f"--gallery-people must be at least 1, not {self.gallery_people}")
        if self.rows is not None and not 0 <= self.rows[0] < self.rows[1]:
            raise ValueError(f"--rows must satisfy 0 <= A < B, not {self.rows}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        object.__setattr__(self, "distractors", tuple(Path(p) for p in self.distractors))
