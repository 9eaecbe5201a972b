"""The figures pyeer and bob.measure give for two score lists (genuine and impostor, one score per line), as JSON
on standard output: run by `cli.py bench oracles` with any Python that has them installed (`--oracle-python`;
bob.measure 6.1 pins numpy 1.26, below this project's, so it usually lives in a venv of its own). Imports neither
this project nor torch.

    python benchmarks/oracle_figures.py GENUINE IMPOSTOR --levels 0.001 0.01 --points 100
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np


def pyeer_figures(gen: np.ndarray, imp: np.ndarray, levels: list[float]) -> dict:
    """pyeer 0.5's ROC over every distinct score (accept score >= t): the (false matches, false non-matches) of
    each threshold, its AUC (trapezoids between those points), its EER interval, and FNMR at FMR read from that curve as the lowest FNMR with FMR <= level."""
    from pyeer.eer_stats import calculate_roc, calculate_roc_auc, get_eer_values

    thr, fm, fnm = calculate_roc(gen, imp, rates=False)
    fmr, fnmr = fm / len(imp), fnm / len(gen)
    _, low, high, eer = get_eer_values(fmr, fnmr)
    return {
        "auc": float(calculate_roc_auc(fmr, fnmr)),
        "eer": float(eer),
        "eer_interval": [float(low), float(high)],
        "fnmr_at_fmr": {f"{f:g}": float(fnmr[fmr <= f].min()) if (fmr <= f).any() else 1.0 for f in levels},
        "points": np.c_[fm, fnm].astype(np.int64).tolist(),
    }


def bob_figures(gen: np.ndarray, imp: np.ndarray, levels: list[float], points: int) -> dict:
    """bob.measure's EER, FNMR at the threshold `far_threshold` gives for each FMR level, its AUC, and the
    (FMR, FNMR) of its ROC at `points` thresholds as counts."""
    import bob.measure as bm

    out: dict = {"eer": float(bm.eer(imp, gen)), "fnmr_at_fmr": {}}
    for f in levels:
        t = bm.far_threshold(imp, gen, f)
        far, frr = bm.farfrr(imp, gen, t)
        out["fnmr_at_fmr"][f"{f:g}"] = float(frr)
        out.setdefault("fmr_at_its_threshold", {})[f"{f:g}"] = float(far)
    far, frr = bm.roc(imp, gen, points)
    out["points"] = np.c_[np.rint(far * len(imp)), np.rint(frr * len(gen))].astype(np.int64).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["auc"] = float(bm.roc_auc_score(imp, gen))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("genuine")
    ap.add_argument("impostor")
    ap.add_argument("--levels", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--points", type=int, default=100)
    a = ap.parse_args()
    gen, imp = (np.loadtxt(p, dtype=np.float64, ndmin=1) for p in (a.genuine, a.impostor))
    out: dict = {}
    for name, fig in (("pyeer", lambda: pyeer_figures(gen, imp, a.levels)),
                      ("bob.measure", lambda: bob_figures(gen, imp, a.levels, a.points))):  # fmt: skip
        try:
            out[name] = fig()
        except ImportError as e:
            out[name] = {"missing": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
