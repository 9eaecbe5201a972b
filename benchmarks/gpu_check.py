"""The GPU check, in one call on a machine with the device (under 8 minutes):

1. GPU against CPU on the same random store: same pair counts, histograms that differ only by the float
   rounding of the distances (pairs moved to a neighbouring bin, reported as a fraction), AUCs within
   their error bounds;
2. all-pairs scoring timed on the GPU for 3,708 x 1000, 100,000 x 128 and 1,000,000 x 512, each with the
   floor (matrix product + one histogram update per pair) measured on the same GPU in the same run;
3. `embed` images/s against model-only forward passes for alexnet and vgg16 (needs LFW: LFW_ROOT).

Without a GPU it runs the same steps on the CPU with small sizes, so that the tests exercise it.

    python -m benchmarks.gpu_check --out DIR       (on the device machine: --out "$OUT")
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import argparse_command
from benchmarks.bench_score import floor_seconds, write_random_store
from pipeline.metrics.roc import HistogramROC
from pipeline.scoring.stage import score_store

GPU_SIZES = ((3708, 1000), (100_000, 128), (1_000_000, 512))
CPU_SIZES = ((600, 64), (2000, 32))


def compare_devices(workdir: Path, n: int, d: int, device: str) -> dict:
    """Score one store on the CPU and on `device`; how far apart are the results?"""
    store = write_random_store(workdir / f"check_{n}x{d}.h5", n, d, seed=1)
    out = {}
    for where in ("cpu", device):
        folder = workdir / f"check_{where}"
        metrics = score_store(store, folder, device=where, overwrite=True, progress=False)
        out[where] = (metrics, HistogramROC.load(folder / "histogram.npz"))
    (mc, hc), (mg, hg) = out["cpu"], out[device]
    moved = int(np.abs(hc.pos - hg.pos).sum() + np.abs(hc.neg - hg.neg).sum()) // 2
    return {
        "n": n,
        "d": d,
        "same_counts": mc["n_pairs"] == mg["n_pairs"] and mc["n_positive"] == mg["n_positive"],
        "same_binning": hc.binning == hg.binning,
        "pairs_in_other_bin": moved,
        "fraction_in_other_bin": moved / mc["n_pairs"],
        "auc_cpu": mc["auc"],
        "auc_device": mg["auc"],
        "auc_difference": abs(mc["auc"] - mg["auc"]),
        "auc_error_bound": max(mc["auc_error_bound"], mg["auc_error_bound"]),
        "max_distance_cpu": mc["max_distance"],
        "max_distance_device": mg["max_distance"],
    }


def time_scoring(workdir: Path, sizes, device: str) -> list[dict]:
    rows = []
    for n, d in sizes:
        store = write_random_store(workdir / f"time_{n}x{d}.h5", n, d)
        floor = floor_seconds(n, d, torch.device(device))
        metrics = score_store(store, None, device=device, progress=False)
        rows.append(
            {
                "n": n,
                "d": d,
                "pairs": metrics["n_pairs"],
                "seconds": metrics["seconds"],
                "floor_seconds": floor,
                "ratio_to_floor": metrics["seconds"] / floor,
                "pairs_per_second": metrics["pairs_per_second"],
                "auc": metrics["auc"],
            }
        )
        store.unlink()
    return rows


def time_embedding(device: str, small: bool) -> list[dict]:
    from benchmarks.bench_embed import BenchEmbedConfig, run_bench

    root = Path(os.environ.get("LFW_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        return [{"skipped": f"no LFW at {root} (set LFW_ROOT)"}]
    models = ("squeezenet1_0",) if small else ("alexnet", "vgg16")
    cfg = BenchEmbedConfig(
        data_root=root,
        models=models,
        device=device,
        limit=48 if small else None,
        batch_size=16 if small else 128,
        decoded=16 if small else 512,
        workers=2 if small else 8,
    )
    return run_bench(cfg)


def markdown(result: dict) -> str:
    lines = [
        f"device: {result['device_name']}",
        "",
        "| N x D | pairs | seconds | floor s | ratio | pairs/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["scoring"]:
        lines.append(
            f"| {r['n']} x {r['d']} | {r['pairs']:.3g} | {r['seconds']:.3f} | {r['floor_seconds']:.3f} "
            f"| {r['ratio_to_floor']:.2f} | {r['pairs_per_second']:.3g} |"
        )
    c = result["check"]
    lines += [
        "",
        f"CPU vs device on {c['n']} x {c['d']}: same counts {c['same_counts']}, "
        f"{c['pairs_in_other_bin']} pairs ({c['fraction_in_other_bin']:.1e}) in a neighbouring bin, "
        f"AUC difference {c['auc_difference']:.1e} (bound {c['auc_error_bound']:.1e})",
        "",
    ]
    for r in result["embedding"]:
        if "skipped" in r:
            lines.append(f"embed: skipped ({r['skipped']})")
        else:
            lines.append(
                f"embed {r['model']}: {r['embed_rate']:.1f} img/s, model-only {r['model_rate']:.1f} img/s, "
                f"ratio {r['ratio']:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="Folder for gpu_check.json and gpu_check.md.")
    parser.add_argument("--small", action="store_true", help="CPU-sized run even on a GPU (quick check).")
    parser.add_argument("--no-embed", action="store_true", help="Skip the embedding benchmark.")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.small
    device = "cuda" if gpu else "cpu"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {
            "device": device,
            "device_name": torch.cuda.get_device_name() if gpu else "CPU",
            "check": compare_devices(work, *((3708, 1000) if gpu else (300, 16)), device),
            "scoring": time_scoring(work, GPU_SIZES if gpu else CPU_SIZES, device),
            "embedding": [] if args.no_embed else time_embedding(device, small=not gpu),
        }
    result["seconds_total"] = time.perf_counter() - start
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        (args.out / "gpu_check.md").write_text(text + "\n")
    return result


command = argparse_command("gpu-check", main, __doc__)

if __name__ == "__main__":
    main()
