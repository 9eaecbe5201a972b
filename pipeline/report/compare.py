"""`compare`: two results folders of `score` on the same pairs, A and B, compared metric by metric (AUC, EER, TAR
at each FAR level): B - A with a paired 95% interval and p-value (`pipeline.metrics.paired`), as a table and as
comparison.json in a folder of its own (one writer, replaced only when compare wrote it).

All pairs (and score files with identities) are compared by the paired jackknife over the identity groups their
histogram.npz counts; listed pairs by the paired bootstrap over their per-pair scores (`pair_scores`), with
DeLong's test of the AUC beside it. Results of different pairs are refused."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.metrics import paired
from pipeline.metrics.curve import measurable
from pipeline.metrics.intervals import COARSE, GROUPS, ROUNDS, group_replicates
from pipeline.metrics.roc import HistogramROC
from pipeline.report.read import title_of
from pipeline.report.results import json_writer, read_json, write_files

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
MODES = {"all-pairs": "all pairs", "pairs": "listed pairs", "scores": "a score file's pairs"}
SAME_SET = ("dataset", "protocol", "split", "limit", "n_images", "pairs_sha256")
"""Store provenance that must agree (where both results have it) for their pairs to be the same."""


@dataclass
class Scored:
    """A results folder read back for a comparison."""

    folder: Path
    metrics: dict
    acc: HistogramROC

    @property
    def name(self) -> str:
        return f"{self.folder} ({title_of(self.metrics)})"


def read_scored(folder: Path | str) -> Scored:
    """metrics.json and histogram.npz of a results folder of `score` (a PipelineError naming what is missing)."""
    folder = Path(folder)
    if not (folder / "metrics.json").is_file() or not (folder / "histogram.npz").is_file():
        raise PipelineError(f"{folder} is not a results folder of `score` (no metrics.json and histogram.npz)")
    metrics = read_json(folder / "metrics.json", "results")
    if "n_pairs" not in metrics or "auc" not in metrics:
        raise PipelineError(f"{folder} is not a results folder of `score` (its metrics.json has no n_pairs, auc)")
    return Scored(folder, metrics, HistogramROC.load(folder / "histogram.npz"))


def _method(s: Scored) -> str | None:
    """How `s` is compared: over identity groups where it counts them (pairs that share people are not
    independent), else over its per-pair scores; None with neither."""
    if s.acc.groups is not None:
        return "jackknife"
    return "bootstrap" if "pair_scores" in s.acc.arrays else None


def check_same_pairs(a: Scored, b: Scored) -> str:
    """The method both can be compared by ("jackknife" or "bootstrap"); a PipelineError when their pairs differ or
    one of them keeps neither identity groups nor per-pair scores."""
    ma, mb = a.metrics, b.metrics
    count = [(m["n_pairs"], m["n_positive"], m.get("mode")) for m in (ma, mb)]
    if count[0] != count[1]:
        raise PipelineError(f"{a.folder} and {b.folder} were not scored on the same pairs: "
                            + " against ".join(f"{n:,} pairs ({p:,} same, {mode})" for n, p, mode in count))  # fmt: skip
    pa, pb = ma.get("provenance") or {}, mb.get("provenance") or {}
    differ = [k for k in SAME_SET if k in pa and k in pb and pa[k] != pb[k]]
    if differ:
        raise PipelineError(f"{a.folder} and {b.folder} were not scored on the same pairs: their stores' "
                            + ", ".join(f"{k} {pa[k]!r} and {pb[k]!r}" for k in differ) + " differ")  # fmt: skip
    methods = (_method(a), _method(b))
    for s, m in zip((a, b), methods, strict=True):
        if m is None:
            raise PipelineError(f"{s.folder} keeps neither identity groups nor per-pair scores (scored by an older "
                                f"version?): score its store again to compare it")  # fmt: skip
    if methods[0] != methods[1]:
        raise PipelineError(f"{a.folder} and {b.folder} were not scored on the same pairs: one holds listed pairs, "
                            f"the other all pairs")  # fmt: skip
    if methods[0] == "jackknife" and not np.array_equal(a.acc.groups[2], b.acc.groups[2]):
        raise PipelineError(f"{a.folder} and {b.folder} were not scored on the same pairs: their identity groups "
                            f"hold {a.acc.groups[2].tolist()} and {b.acc.groups[2].tolist()} rows")  # fmt: skip
    if methods[0] == "bootstrap":
        ia, ib = a.acc.arrays, b.acc.arrays
        if str(ia["pair_set"]) != str(ib["pair_set"]) or not np.array_equal(ia["pair_labels"], ib["pair_labels"]):
            raise PipelineError(f"{a.folder} and {b.folder} were not scored on the same pairs: their listed pairs "
                                f"differ (pair_set {str(ia['pair_set'])[:12]} and {str(ib['pair_set'])[:12]})")  # fmt: skip
    return methods[0]


def _levels(a: Scored, b: Scored) -> dict[str, tuple[float | None, float | None]]:
    """TAR at each FAR level of both, null where either is null or the pairs cannot show the level (f N < 1)."""
    n = a.metrics["n_negative"]
    out = {}
    for k, va in a.metrics["tar_at_far"].items():
        vb = b.metrics["tar_at_far"].get(k)
        shown = measurable(float(k), n)
        out[k] = (va, vb) if shown and va is not None and vb is not None else (None, None)
    return out


def _jackknife(a: Scored, b: Scored) -> dict:
    ga, *ra = group_replicates(a.acc, a.metrics, coarse_tar=True)
    gb, *rb = group_replicates(b.acc, b.metrics, coarse_tar=True)
    if ga != gb:
        raise PipelineError(f"{a.folder} and {b.folder}: their identity groups leave different replicates")
    out = {k: paired.jackknife_difference(a.metrics[k], b.metrics[k], x, y)
           for k, x, y in zip(paired.NAMES, ra[:2], rb[:2], strict=True)}  # fmt: skip
    out["tar_at_far"] = {
        k: paired.jackknife_difference(va, vb, ra[2].get(k, [None]), rb[2].get(k, [None]))
        if va is not None
        else paired.entry(None, None, None, None)
        for k, (va, vb) in _levels(a, b).items()
    }
    out["method"] = (
        f"paired delete-a-group jackknife over {GROUPS} groups of identities ({len(ga)} replicates): the difference "
        f"recomputed without each group in both results, se from the replicates of the difference, 95% interval "
        f"difference +- 1.96 se, p-value from the normal approximation; AUC and EER replicates from {COARSE} coarse "
        f"bins, TAR at FAR from the exact tail (beyond it, from the coarse bins, the ROC straight within a bin)"
    )
    return out


def _bootstrap(a: Scored, b: Scored, seed: int, rounds: int) -> dict:
    sa, sb = (np.asarray(s.acc.arrays["pair_scores"], dtype=np.float64) for s in (a, b))
    positive = np.asarray(a.acc.arrays["pair_labels"]).astype(bool)
    levels = _levels(a, b)
    d = paired.bootstrap_differences(sa, sb, positive, [float(k) for k in levels], seed=seed, rounds=rounds)
    out = {k: paired.bootstrap_entry(a.metrics[k], b.metrics[k], d[k]) for k in paired.NAMES}
    out["tar_at_far"] = {k: paired.bootstrap_entry(va, vb, d[k]) for k, (va, vb) in levels.items()}
    out["delong"] = paired.delong(sa, sb, positive)
    out["method"] = (
        f"paired bootstrap over the {len(positive):,} listed pairs, {rounds} rounds, seed {seed} (the same resampled "
        f"pairs for A and B): 95% percentile interval of the differences, p-value from the normal approximation with "
        f"their standard deviation; DeLong's test for AUC as a cross-check"
    )
    return out


def compare(a: Scored, b: Scored, seed: int = 0, rounds: int = ROUNDS) -> dict:
    """comparison.json's dict: what was compared, then for `auc`, `eer` and each FAR of `tar_at_far`
    `{"a", "b", "difference": b - a, "ci95", "p_value", "se"}`, the `method` (and `delong` for listed pairs)."""
    how = check_same_pairs(a, b)
    m = a.metrics
    head = {
        "a": str(a.folder.resolve()),
        "b": str(b.folder.resolve()),
        "a_label": title_of(a.metrics),
        "b_label": title_of(b.metrics),
        "mode": m.get("mode"),
        "n_pairs": m["n_pairs"],
        "n_positive": m["n_positive"],
        "n_negative": m["n_negative"],
    }
    return {**head, **(_jackknife(a, b) if how == "jackknife" else _bootstrap(a, b, seed, rounds))}


def _num(v: float | None, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _p(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else (f"{v:.3g}" if v >= 1e-4 else f"{v:.1e}")


def comparison_cells(c: dict) -> list[list[str]]:
    """One row per compared metric of a comparison (`compare`'s dict): metric, A, B, B - A, 95% interval, p; the
    cells of `comparison_table` and of `report --html`'s comparisons."""
    rows = [("AUC", c["auc"]), ("EER", c["eer"])] + [(f"TAR at FAR {k}", e) for k, e in c["tar_at_far"].items()]
    out = []
    for name, e in rows:
        ci = "-" if e["ci95"] is None else f"[{_num(e['ci95'][0], True)}, {_num(e['ci95'][1], True)}]"
        out.append([name, _num(e["a"]), _num(e["b"]), _num(e["difference"], True), ci, _p(e["p_value"])])
    return out


def delong_text(c: dict) -> str | None:
    """DeLong's test of AUC in a sentence (listed pairs' comparisons), None without it."""
    if "delong" not in c:
        return None
    d = c["delong"]
    return (f"DeLong's test of AUC: B - A {_num(d['difference'], True)}, 95% interval "
            f"[{_num(d['ci95'][0], True)}, {_num(d['ci95'][1], True)}], p {_p(d['p_value'])}")  # fmt: skip


def comparison_table(c: dict) -> str:
    """Markdown: one row per compared metric (A, B, B - A, 95% interval, p), DeLong's test and the method below."""
    lines = [f"- A: {c['a_label']} ({c['a']})", f"- B: {c['b_label']} ({c['b']})",
             f"- {c['n_pairs']:,} pairs ({c['n_positive']:,} same): {MODES.get(c['mode'], c['mode'])}", "",
             "| metric | A | B | B - A | 95% interval | p |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in comparison_cells(c)]
    delong = delong_text(c)
    if delong is not None:
        lines += ["", delong]
    return "\n".join([*lines, "", f"Method: {c['method']}.", ""])


def report_comparison_results(folders: list[Path], results: list[dict]) -> list[dict]:
    """`report`'s comparisons (`compare`'s dicts): among its results folders (`results`: their metrics) of the same
    pairs, each against the first pretrained one (else the first); [] when there are none. Results that cannot be
    compared (other pairs, folders of older versions) are left out. table.md shows them through
    `comparisons_markdown`, report.html through `pipeline.report.html.comparisons`."""
    metrics = {Path(f): m for f, m in zip(folders, results, strict=True)}
    sets: dict[tuple, list[Path]] = {}
    for folder, m in metrics.items():
        sets.setdefault((m.get("mode"), m.get("n_pairs"), m.get("n_positive")), []).append(folder)
    parts = []
    for members in (m for m in sets.values() if len(m) > 1):
        comparable = []
        for folder in members:
            try:
                s = read_scored(folder)
            except PipelineError as e:
                log.info("report: %s not compared: %s", folder, e)
                continue
            if _method(s) is None:  # a folder of an older version: neither identity groups nor per-pair scores
                log.info("report: %s not compared: scored by an older version", folder)
                continue
            comparable.append(s)
        if len(comparable) < 2:
            continue
        base = next((s for s in comparable if s.metrics.get("variant") == "pretrained"), comparable[0])
        for other in (s for s in comparable if s is not base):
            try:
                parts.append(compare(base, other))
            except PipelineError as e:
                log.info("report: %s and %s not compared: %s", base.folder, other.folder, e)
    return parts


def comparisons_markdown(comparisons: list[dict]) -> str:
    """table.md's "Paired comparisons" section of `report_comparison_results`' comparisons; "" without any."""
    tables = [comparison_table(c) for c in comparisons]
    return "\n## Paired comparisons\n\n" + "\n".join(tables) if tables else ""


def recognise_comparison_folder(path: Path) -> str | None:
    """None when `path` is an empty folder or one holding only a comparison.json that compare wrote."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    if names != [COMPARISON_FILE] or not (path / COMPARISON_FILE).is_file():
        return f"it holds {', '.join(n for n in names if n != COMPARISON_FILE)[:200]}, which compare does not write"
    try:
        value = json.loads((path / COMPARISON_FILE).read_text())
    except (OSError, ValueError):
        value = None
    ours = isinstance(value, dict) and {"a", "b", "auc", "method"} <= set(value)
    return None if ours else f"its {COMPARISON_FILE} was not written by compare"


def check_comparison_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Before anything is read or created: a safe place for OUT, and an existing OUT only with `overwrite` when
    compare wrote it."""
    outputs.check_folder_out(out, inputs=inputs)
    outputs.check_replaceable(out, overwrite, recognise_comparison_folder, "comparison folder")


def write_comparison(out: Path, comparison: dict, inputs: list[Path], overwrite: bool) -> Path:
    """OUT/comparison.json, in a folder of its own written whole (`write_files`), under OUT's lock and checked
    again there (`check_comparison_out`)."""
    out, own = Path(out), (COMPARISON_FILE,)
    with outputs.claim(out, lambda: check_comparison_out(out, inputs, overwrite), own):
        return write_files(out, {COMPARISON_FILE: json_writer(comparison)}, recognise_comparison_folder, own)


__all__ = [
    "COMPARISON_FILE",
    "Scored",
    "check_comparison_out",
    "check_same_pairs",
    "compare",
    "comparison_cells",
    "comparison_table",
    "comparisons_markdown",
    "delong_text",
    "read_scored",
    "recognise_comparison_folder",
    "report_comparison_results",
    "write_comparison",
]
