"""Are two results folders the same result? `python -m benchmarks.same_results A B [C ...]` compares each folder
with the first: `histogram.npz` array by array (bit for bit) and every value of `metrics.json` that does not
describe how or how fast the run went (timings `seconds*`, configuration, provenance, backend, ranks, parts, tile
count). Prints one
line per folder and exits 1 when any differs. Used to check that in-memory, torchrun and `--rows` + `merge`
runs, or two commits, give one result. `--common`: only what both have (a result of an older version: new keys
and arrays left out, and `tar_at_far`, exact since the tail of commit 27ed6df). `--ref`: only what both have,
`tar_at_far` included (a reference made by a version with the tail, e.g. ddca428, against a later one).

    python -m benchmarks.same_results [--common | --ref] REF OTHER..."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HOW = {"seconds", "seconds_prepare", "seconds_tiles", "pairs_per_second", "config", "backend", "parts",
       "world_size", "n_tiles", "store", "label", "provenance"}  # fmt: skip
CHANGED = {"tar_at_far"}  # --common: exact where the tail reaches since commit 27ed6df (bins before)


def differences(a: Path, b: Path, common: bool = False, changed: bool = True) -> list[str]:
    """What differs; with `common`, only arrays and keys both folders have (e.g. against an older version), and
    with `changed` too, not the values that changed meaning since (`CHANGED`)."""
    out = []
    ha, hb = np.load(a / "histogram.npz"), np.load(b / "histogram.npz")
    for k in sorted(set(ha.files) & set(hb.files) if common else set(ha.files) | set(hb.files)):
        if k not in ha.files or k not in hb.files or not np.array_equal(ha[k], hb[k]):
            out.append(f"histogram {k}")
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (a, b))
    keys = ((set(ma) & set(mb)) if common else (set(ma) | set(mb))) - HOW - (CHANGED if common and changed else set())
    for k in sorted(k for k in keys if not k.startswith("seconds")):
        if ma.get(k, "<missing>") != mb.get(k, "<missing>"):
            out.append(f"{k}: {str(ma.get(k, '<missing>'))[:60]} vs {str(mb.get(k, '<missing>'))[:60]}")
    return out


def main(argv: list[str]) -> int:
    ref = "--ref" in argv
    common = "--common" in argv or ref
    argv = [a for a in argv if a not in ("--common", "--ref")]
    if len(argv) < 2:
        print(__doc__)
        return 2
    first, bad = Path(argv[0]), 0
    for other in map(Path, argv[1:]):
        diff = differences(first, other, common, changed=not ref)
        bad += bool(diff)
        print(f"{other} vs {first}: " + (("identical (histograms and every non-timing metric" + (" both have)" if common else ")")) if not diff else
                                        "DIFFERENT: " + "; ".join(diff)))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
