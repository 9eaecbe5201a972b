"""`merge` of `identify --rows A:B` parts: their states (maxima and top scores per probe) merge exactly into the
state of the union of their spans; when the spans cover the whole gallery the results folder is written, the same
as one run's, otherwise a part folder that can be merged further."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.identify.folder import IDENTIFY_FILES, MODE, STATE_FILE, check_identify_out
from pipeline.identify.protocol import Trial, read_split
from pipeline.identify.results import distractor_cuts, outcomes
from pipeline.identify.stage import finish, write_part, write_results
from pipeline.identify.state import load_state, merge_states
from pipeline.outputs import claim
from pipeline.report.results import PART_FILE, read_json
from pipeline.scoring.merge import covered

SAME = ("store", "store_n", "store_dim", "metric", "template", "max_rank", "score_norm", "n_trials", "n_probes",
        "n_distractors", "gallery_rows", "gallery_people")  # fmt: skip
SUMMED = ("seconds", "seconds_prepare", "seconds_search")


def is_identify_part(folder: Path) -> bool:
    """True when `folder` holds a part.json written by identify."""
    try:
        return json.loads((Path(folder) / PART_FILE).read_text()).get("mode") == MODE
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Merged:
    """What `finish` and the writers need of a search, from the parts' files."""

    trials: list[Trial]
    probe_rows: np.ndarray
    labels: np.ndarray
    cuts: list[int]
    sign: float

    def outcomes(self, state):
        return outcomes(state, self.trials, self.probe_rows, self.labels)


def merge_identify(parts: list[Path], out: Path, overwrite: bool = False) -> dict:
    """Check and merge the parts; write `out`; return metrics.json's dict (complete) or part.json's."""
    out = Path(out)
    with claim(out, lambda: check_identify_out(out, overwrite, list(parts)), IDENTIFY_FILES):
        return _merge(list(map(Path, parts)), out)


def _merge(parts: list[Path], out: Path) -> dict:
    infos = [read_json(p / PART_FILE, "part description") for p in parts]
    first, split = infos[0], (parts[0] / "split.csv").read_bytes()
    for folder, info in zip(parts, infos, strict=True):
        differ = [f"{k} {info.get(k)!r} vs {first.get(k)!r}" for k in SAME if info.get(k) != first.get(k)]
        if (folder / "split.csv").read_bytes() != split:
            differ.append("another split.csv")
        if differ:
            raise PipelineError(f"cannot merge {folder} with {parts[0]}: {'; '.join(differ)}. Search every part of "
                                f"one gallery with the same store, options and split.")  # fmt: skip
    ranges = sorted(r for info in infos for r in (info["ranges"] if "ranges" in info else [info["rows"]]))
    for (a0, b0), (a1, b1) in zip(ranges, ranges[1:], strict=False):
        if a1 < b0:
            raise PipelineError(f"parts overlap: gallery rows {a0}:{b0} and {a1}:{b1}")
    loaded = [load_state(p / STATE_FILE) for p in parts]
    state, arrays = merge_states([s for s, _ in loaded]), loaded[0][1]
    trials = read_split(parts[0] / "split.csv", arrays["labels"])
    merged = Merged(trials, arrays["probe_rows"], arrays["labels"], distractor_cuts(first["n_distractors"]),
                    -1.0 if first["metric"] == "l2" else 1.0)  # fmt: skip
    info = {k: v for k, v in first.items() if k not in ("rows", "ranges", *SUMMED)}
    info.update({k: sum(p.get(k, 0.0) for p in infos) for k in SUMMED})
    info.update(ranges=covered(infos), parts=sum(p.get("parts", 1) for p in infos))
    if info["ranges"] != [[0, first["gallery_rows"]]]:
        write_part(out, info, state, merged)
        return info
    metrics = finish(info, state, merged, info["config"]["seed"])
    write_results(out, metrics, trials, merged.outcomes(state), merged.sign)
    return metrics
