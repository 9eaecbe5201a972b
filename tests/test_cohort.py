"""Cohort score normalisation: the offsets (`pipeline.embedding.cohort`) against brute force, the cohort `finetune` keeps
(one network and an ensemble), the offsets `embed`, torchrun's assembly and `run`'s shared pass write, and the
normalised validation; on a tiny generated LFW with random-init networks."""

from __future__ import annotations

import logging
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline import finetune as ft
from pipeline.embedding.cohort import Cohort, finish_store, model_cohort
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.embedding.shared import embed_together
from pipeline.errors import PipelineError
from pipeline.finetune.validation import TAR_KEY, all_pairs_metrics
from pipeline.nets import layers, models
from pipeline.store.layout import OFFSETS, SCORE_NORM
from pipeline.store.writer import StoreWriter
from tests.test_finetune import config

KW = dict(recipe="best", phase1_epochs=1, batch_size=8, lr=0.05, val_images=600, val_fraction=0.4, cohort_top=3)


def brute_offsets(rows: np.ndarray, cohort: np.ndarray, k: int) -> np.ndarray:
    x = rows.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    sims = x @ cohort.astype(np.float64).T
    return 0.5 * np.sort(sims, axis=1)[:, ::-1][:, :k].mean(axis=1)


@pytest.mark.parametrize("n,m,k", [(1, 1, 1), (5, 3, 3), (2049, 7, 2), (67, 200, 100)])
def test_offsets_are_half_the_mean_of_the_top_k_cosines(n, m, k):
    rng = np.random.default_rng(n + m + k)
    cohort = F.normalize(torch.as_tensor(rng.normal(size=(m, 9)), dtype=torch.float32), dim=1).numpy()
    rows = rng.normal(size=(n, 9)).astype(np.float32) * rng.uniform(0.1, 10, size=(n, 1)).astype(np.float32)
    got = Cohort(cohort, k).offsets(rows)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, brute_offsets(rows, cohort, k), atol=1e-6)
    assert Cohort(cohort, k).offsets(np.zeros((2, 9), np.float32)).tolist() == [0.0, 0.0]


def test_cohort_refuses_what_does_not_fit():
    cohort = np.eye(3, dtype=np.float32)
    with pytest.raises(PipelineError, match="cohort top"):
        Cohort(cohort, 4)
    with pytest.raises(PipelineError, match="do not match"):
        Cohort(cohort, 1).offsets(np.ones((2, 4), np.float32))


def test_dropped_rows_drop_their_offsets(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 4)).astype(np.float32)
    cohort = Cohort(F.normalize(torch.as_tensor(rng.normal(size=(5, 4))), dim=1).float().numpy(), 2, "test")
    arrays = {"labels": np.arange(6), "identities": list("abcdef"), "paths": [f"{c}.jpg" for c in "abcdef"]}
    writer = StoreWriter(tmp_path / "s.h5", 6, 4, {"model": "m"}, arrays)
    writer.write(0, rows)
    finish_store(writer, {}, cohort, drop_rows=[1, 4])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_allclose(f[OFFSETS][:], brute_offsets(rows[[0, 2, 3, 5]], cohort.embedding, 2), atol=1e-6)
        assert "2 largest cosines with 5 cohort images" in f.attrs[SCORE_NORM] and f.attrs["cohort_top"] == 2


def store(root, out, weights, flip=True, layer="penultimate", protocol="people"):
    return EmbedConfig(out=out, data_root=root, protocol=protocol, model="squeezenet1_0", weights=str(weights),
                       layer=layer, tta_flip=flip, workers=0, device="cpu", batch_size=4)  # fmt: skip


def read(path):
    with h5py.File(path, "r") as f:
        return f["embeddings"][:], (f[OFFSETS][:] if OFFSETS in f else None), dict(f.attrs)


@pytest.mark.parametrize("members", [1, 2])
def test_finetune_keeps_the_cohort_and_embed_writes_its_offsets(tiny_lfw, tmp_path, members, caplog):
    pre = tmp_path / "pre.pth"
    torch.save(models.build_model("squeezenet1_0", "none").state_dict(), pre)
    cfg = config(tiny_lfw, tmp_path / "c.pt", weights=str(pre), members=members, **KW)
    out = ft.finetune(cfg)
    ckpt = torch.load(out, weights_only=True)
    trainer = ft.RECIPES["best"].trainer(cfg.resolved() if members == 1 else ft.member_configs(cfg.resolved())[0],
                                  torch.device("cpu"))  # fmt: skip
    # the cohort: the training images as embed embeds them with the final network (test-time flip), unit rows
    net = layers.Embedder(models.build_model("squeezenet1_0", str(out)), "penultimate", True).eval()
    with torch.no_grad():
        train = net(trainer.bank.batch(torch.arange(trainer.n_train)))
        val = net(trainer.bank.batch(torch.as_tensor(trainer.val_rows)))
    assert ckpt["cohort"].dtype == torch.float16 and ckpt["cohort"].shape == (trainer.n_train, 512 * members)
    assert ckpt["cohort_top"] == 3
    torch.testing.assert_close(ckpt["cohort"].float(), F.normalize(train, dim=1), rtol=0, atol=5e-3)
    # the normalised validation is what embed's rows and offsets give
    o = torch.as_tensor(brute_offsets(val.numpy(), ckpt["cohort"].float().numpy(), 3))
    m = all_pairs_metrics(val, trainer.val_labels, "cosine", o)
    assert ckpt["cohort_validation"]["val_auc"] == pytest.approx(m["auc"], abs=3e-3)
    assert ckpt["cohort_validation"][TAR_KEY] == pytest.approx(m["tar_at_far"], abs=0.05)
    assert float(o.std()) > 1e-4  # offsets that differ between images: they change the scores
    # embed writes the offsets of its rows; the members' own checkpoints carry no cohort
    rows, offsets, attrs = read(embed(store(tiny_lfw, tmp_path / "s.h5", out)))
    np.testing.assert_allclose(offsets, brute_offsets(rows, ckpt["cohort"].float().numpy(), 3), atol=1e-5)
    assert attrs["cohort_top"] == 3 and attrs["cohort_size"] == trainer.n_train and "c.pt" in attrs[SCORE_NORM]
    if members == 2:
        assert "cohort" not in torch.load(tmp_path / "c.member0.pt", weights_only=True)
    # run's shared pass writes the same offsets
    together = [store(tiny_lfw, tmp_path / f"t{k}.h5", w) for k, w in enumerate((pre, out))]
    embed_together(together, blocks=2)
    assert read(together[0].out)[1] is None
    np.testing.assert_allclose(read(together[1].out)[1], offsets, atol=1e-5)
    # another layer or no test-time flip: no offsets, with a warning
    if members == 1:
        with caplog.at_level(logging.WARNING):
            _, none, _ = read(embed(store(tiny_lfw, tmp_path / "n.h5", out, flip=False)))
        assert none is None and "no score offsets" in caplog.text
        assert model_cohort(str(pre), "penultimate", True) is None


def test_resume_refuses_a_complete_store_without_the_cohorts_offsets(tiny_lfw, tmp_path):
    out = ft.finetune(config(tiny_lfw, tmp_path / "a.pt", **KW))
    cfg = store(tiny_lfw, tmp_path / "s.h5", out)
    embed(cfg)
    rows, offsets, _ = read(cfg.out)
    mtime = cfg.out.stat().st_mtime_ns
    assert embed(replace(cfg, resume=True)) == cfg.out and cfg.out.stat().st_mtime_ns == mtime  # complete: kept
    with h5py.File(cfg.out, "a") as f:  # a store of a version without score offsets
        del f[OFFSETS]
    with pytest.raises(PipelineError, match="no score offsets.*--overwrite"):
        embed(replace(cfg, resume=True))
    assert read(cfg.out)[1] is None  # left as it was
    embed(replace(cfg, resume=True, overwrite=True))
    again, restored, _ = read(cfg.out)
    np.testing.assert_array_equal(again, rows)
    np.testing.assert_array_equal(restored, offsets)


def test_torchrun_assembly_writes_the_offsets_of_the_whole_store(tiny_lfw, tmp_path, monkeypatch):
    from pipeline.embedding import parts as embed_parts

    out = ft.finetune(config(tiny_lfw, tmp_path / "a.pt", **KW))
    single = read(embed(store(tiny_lfw, tmp_path / "one.h5", out)))
    cohort = model_cohort(str(out), "penultimate", True)
    rows = single[0]
    parts = []
    for k, (a, b) in enumerate([(0, 5), (5, len(rows))]):
        w = StoreWriter(tmp_path / f"p{k}", b - a, rows.shape[1], {"model": "m"}, {})
        w.write(0, rows[a:b])
        parts.append(w.finish())
    arrays = {"labels": np.zeros(len(rows), np.int64)}
    embed_parts.assemble(tmp_path / "all.h5", parts, len(rows), rows.shape[1], {"model": "m"}, arrays, {},
                         "float32", cohort)  # fmt: skip
    np.testing.assert_array_equal(read(tmp_path / "all.h5")[1], single[1])


def test_bench_cohort_norm_agrees_with_finetunes_own_record(tiny_lfw, tmp_path):
    import json

    from click.testing import CliRunner

    from benchmarks.cohort_norm import command, embedded_as_embed
    from pipeline.finetune.joined import joined_embedding

    out = ft.finetune(config(tiny_lfw, tmp_path / "b.pt", **KW))
    args = ["--data-root", str(tiny_lfw), "--top", "3", "--top", "2", str(out)]
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    start = '{"checkpoint"'
    rows = [json.loads(line[line.index(start) :]) for line in result.output.splitlines() if start in line]
    assert [(r["variant"], r["top"]) for r in rows] == [
        ("cosine", 0), ("cohort mean", 3), ("AS-norm", 3), ("cohort mean", 2), ("AS-norm", 2)
    ]  # fmt: skip
    record = torch.load(out, weights_only=True)["cohort_validation"]
    assert rows[1]["auc"] == pytest.approx(record["val_auc"], abs=3e-3)  # finetune's cohort is float16
    assert "| cohort mean | 3 |" in result.output
    # with test-time scales: the same centre rows, and the rows of the validation images embedded as embed does
    scaled = CliRunner().invoke(command, [*args[:-1], "--tta-resizes", "240", str(out)], catch_exceptions=False)
    again = [json.loads(line[line.index(start) :]) for line in scaled.output.splitlines() if start in line]
    assert again[:5] == rows and [(r["variant"], r["top"]) for r in again[5:]] == [
        ("cosine, scales 256+240", 0), ("cohort mean, scales 256+240", 3), ("AS-norm, scales 256+240", 3),
        ("cohort mean, scales 256+240", 2), ("AS-norm, scales 256+240", 2),
    ]  # fmt: skip
    # embed's path (no scales) gives an ensemble's validation embedding as the trainer's path does
    cfg = config(tiny_lfw, tmp_path / "e.pt", members=2, **KW)
    ckpt = torch.load(ft.finetune(cfg), weights_only=True)
    trainer = ft.RECIPES["best"].trainer(ft.member_configs(cfg.resolved())[0], torch.device("cpu"))
    centre = embedded_as_embed(cfg.out, "squeezenet1_0", trainer.val_files, ())
    expected = joined_embedding(trainer, [ckpt["model"], *ckpt["members"]])
    torch.testing.assert_close(centre, expected, rtol=1e-4, atol=1e-4)


def test_real_lfw_slice_with_a_cohort(shared_data, shared_weights, tmp_path):
    """Real images, real SqueezeNet: a checkpoint whose cohort is 60 real training images; the offsets embed
    writes for the first 40 peopleDevTest images, and the AUC and TAR `score` gives, agree with brute force and
    scikit-learn on cos - o_i - o_j."""
    from sklearn.metrics import roc_auc_score

    from pipeline.scoring.stage import ScoreConfig, score

    def cfg(out, split, weights):
        return EmbedConfig(out=out, data_root=shared_data, protocol="people", split=split, weights=str(weights),
                           layer="penultimate", tta_flip=True, limit=40 if split == "test" else 60, workers=0,
                           device="cpu")  # fmt: skip

    train, _, _ = read(embed(cfg(tmp_path / "train.h5", "train", shared_weights)))
    ckpt = {
        "model": torch.load(shared_weights, weights_only=True),
        "config": {"model": "squeezenet1_0", "recipe": "best", "layer": "penultimate", "tta_flip": True},
        "cohort": F.normalize(torch.as_tensor(train), dim=1).half(),
        "cohort_top": 10,
    }
    torch.save(ckpt, tmp_path / "c.pt")
    store = embed(cfg(tmp_path / "test.h5", "test", tmp_path / "c.pt"))
    rows, offsets, _ = read(store)
    np.testing.assert_allclose(offsets, brute_offsets(rows, ckpt["cohort"].float().numpy(), 10), atol=1e-5)
    with h5py.File(store, "r") as f:
        labels = f["labels"][:]
    m = score(ScoreConfig(store=store, out=tmp_path / "res", metric="cosine", progress=False))
    x = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    i, j = np.triu_indices(len(rows), 1)
    values = (x @ x.T)[i, j] - offsets[i] - offsets[j]
    same = labels[i] == labels[j]
    assert m["score_norm"] is not None and m["n_pairs"] == len(i)
    exact = roc_auc_score(same, values)
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-6  # the bins' bound, as tests/test_score.py
    assert m["max_distance"] == pytest.approx(1 - values.min(), rel=1e-5)
    plain = score(ScoreConfig(store=store, out=tmp_path / "plain", metric="cosine", score_norm=False, progress=False))
    assert plain["score_norm"] is None and plain["auc"] != m["auc"]
