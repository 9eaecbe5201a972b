"""CUDA paths: scoring, embedding and fine-tuning on a GPU against the CPU. Skipped without a GPU; a session
with the device machine runs them through `benchmarks/device_run.sh`. `TEST_GPU_DEVICE=cpu` runs them on the CPU
instead, to check the tests themselves where there is no GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import finetune as ft
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.metrics.roc import HistogramROC
from pipeline.scoring.stage import ScoreConfig, score, score_store
from pipeline.store.layout import open_store
from tests.stores import random_store
from tests.test_score import check_against_sklearn

DEVICE = os.environ.get("TEST_GPU_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_scoring_equals_sklearn(tmp_path):
    path, x, labels = random_store(tmp_path / "s.h5", n=149, d=16, n_ids=50, duplicates=10)
    for metric in ("l2", "cosine"):
        m = score(ScoreConfig(store=path, metric=metric, device=DEVICE, block=33, progress=False))
        assert m["device"].startswith(DEVICE)
        check_against_sklearn(m, x, labels, metric)


def test_gpu_histograms_match_the_cpu(tmp_path):
    """Same bins and counts; a pair may sit in a neighbouring bin where float rounding differs (rare)."""
    path, _, _ = random_store(tmp_path / "s.h5", n=1500, d=64, n_ids=300, duplicates=20)
    (mc, hc), (mg, hg) = (
        (
            score_store(path, tmp_path / where, device=device, progress=False),
            HistogramROC.load(tmp_path / where / "histogram.npz"),
        )
        for where, device in (("cpu", "cpu"), ("gpu", DEVICE))
    )
    assert (mc["n_pairs"], mc["n_positive"]) == (mg["n_pairs"], mg["n_positive"])
    assert hc.binning == hg.binning
    moved = (np.abs(hc.pos - hg.pos).sum() + np.abs(hc.neg - hg.neg).sum()) // 2
    assert moved <= 1e-4 * mc["n_pairs"]
    assert abs(mc["auc"] - mg["auc"]) <= max(mc["auc_error_bound"], 1e-6)


def _embed(root, out, **kw) -> np.ndarray:
    cfg = dict(out=out, data_root=root, model="squeezenet1_0", weights="none", workers=0, batch_size=4)
    return open_store(embed(EmbedConfig(**{**cfg, **kw}))).rows(0, 10**9)


def test_gpu_embedding_is_close_to_the_cpu(tiny_lfw, tmp_path):
    """float16 autocast on the GPU: rows agree with the float32 CPU rows to about 1e-3 relative."""
    cpu = _embed(tiny_lfw, tmp_path / "cpu.h5", device="cpu")
    gpu = _embed(tiny_lfw, tmp_path / "gpu.h5", device=DEVICE)
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    rel = np.linalg.norm(gpu - cpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert rel.max() < 2e-2, rel.max()


def test_gpu_deterministic_embedding_repeats_exactly(tiny_lfw, tmp_path):
    a = _embed(tiny_lfw, tmp_path / "a.h5", device=DEVICE, deterministic=True)
    b = _embed(tiny_lfw, tmp_path / "b.h5", device=DEVICE, deterministic=True, batch_size=3)
    c = _embed(tiny_lfw, tmp_path / "c.h5", device=DEVICE, deterministic=True)
    assert np.array_equal(a, c)
    assert np.allclose(a, b, rtol=2e-2, atol=1e-3)  # another batch size may pick other kernels


def test_gpu_finetune_checkpoint_embeds(tiny_lfw, tmp_path):
    base = dict(out=tmp_path / "m.pt", data_root=tiny_lfw, model="squeezenet1_0", weights="none", workers=0,
                batch_size=4, lr=0.01, val_images=0, device=DEVICE)  # fmt: skip
    for recipe, extra in (("study", dict(phase1_epochs=1, phase2_epochs=1)), ("best", dict(phase1_epochs=2))):
        out = ft.finetune(ft.FinetuneConfig(**{**base, **extra, "recipe": recipe, "overwrite": True}))
        state = torch.load(out, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        layer = "penultimate" if recipe == "best" else "output"
        rows = _embed(tiny_lfw, tmp_path / f"{recipe}.h5", device=DEVICE, weights=str(out), layer=layer)
        assert np.isfinite(rows).all()


def test_gpu_identify_matches_the_cpu(tmp_path):
    """identify on the GPU (the search loop's torch branch) against the CPU, with distractors: the same searches
    up to float rounding (a mate rank may differ only where the mate ties a non-mate within 1e-5)."""
    from pipeline.identify.config import IdentifyConfig
    from pipeline.identify.stage import identify

    path, _, _ = random_store(tmp_path / "s.h5", n=1700, d=48, n_ids=500, signal=0.8)
    dist, _, _ = random_store(tmp_path / "d.h5", n=3000, d=48, seed=3, signal=0.8, dtype="float16")
    cpu, gpu = (identify(IdentifyConfig(store=path, out=tmp_path / name, distractors=(dist,), gallery_people=150,
                                        trials=2, progress=False, device=device))
                for name, device in (("cpu", "cpu"), ("gpu", DEVICE)))  # fmt: skip
    assert gpu["device"].startswith(DEVICE)
    np.testing.assert_allclose(gpu["cmc"], cpu["cmc"], atol=2 / cpu["n_mated"])
    for f, v in cpu["fnir_at_fpir"].items():
        assert abs(gpu["fnir_at_fpir"][f] - v) <= 2 / cpu["n_mated"]
    rank1 = [p["rank1"] for p in gpu["distractor_curve"]]
    assert all(b <= a for a, b in zip(rank1, rank1[1:], strict=False))
