"""A finetune checkpoint's own validation images as a face set (`embed --split validation`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.nets import models

VALIDATION = "validation"
"""The `split` of a finetune checkpoint's own validation images."""


def validation_faces(weights: str | Path, data_root: Path | str, image_set: str) -> lfw.FaceSet:
    """The held-out validation images a finetune checkpoint records (`validation_paths`, relative to the data root
    it trained on), as a people set: each image's person is its folder's name."""
    _, meta = models.read_weights_file(weights)
    paths = meta.get("validation_paths")
    if not paths:
        raise PipelineError(
            f"{weights} records no validation images (checkpoints of finetune record them since 2026-12-07, and a "
            f"run with no held-out people has none): --split validation needs such a checkpoint"
        )
    names = [Path(p).parent.name for p in paths]
    identities = sorted(set(names))
    labels = np.searchsorted(identities, names).astype(np.int64)
    return lfw.FaceSet(Path(data_root), image_set, "people", VALIDATION, list(paths), labels, identities)
