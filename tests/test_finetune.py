"""Fine-tuning on a tiny generated LFW with random-init SqueezeNet: the study's step, the phase-1 cache,
checkpoints, interrupt + resume (history and training figure included), refusals, the NaN guard, validation
(AUC and TAR at FAR 1e-3) and the best recipe."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from pipeline import finetune as ft
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.nets import models
from pipeline.store.layout import open_store


def config(root: Path, out: Path, **kw) -> ft.FinetuneConfig:
    base = dict(
        out=out,
        data_root=root,
        model="squeezenet1_0",
        weights="none",
        recipe="study",
        phase1_epochs=1,
        phase2_epochs=0,
        batch_size=4,
        lr=1e-3,
        workers=0,
        val_images=0,
        members=1,
        cohort_top=0,  # tests/test_cohort.py tests the cohort
    )
    return ft.FinetuneConfig(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_max_pairs_takes_both_classes(tiny_lfw):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "train")
    few = ft.study_pairs(proto, 5)
    assert few.pair_labels.tolist() == [1, 1, 1, 0, 0]


def test_study_loss_is_normalised_and_keeps_running_max():
    loss = ft.StudyLoss(eps=0.01)
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    d = loss.dissimilarity(a, b)
    assert torch.allclose(d, torch.tensor([5.01 / 5.02, 0.01 / 5.02]))
    loss.dissimilarity(a, b * 0.1)
    assert loss.running_max.item() == pytest.approx(5.01)


def test_study_loss_before_batch_divides_by_the_earlier_maximum():
    loss = ft.StudyLoss(eps=0.01, before_batch=True)
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    first = loss.dissimilarity(a, b)  # no maximum before: the batch's own, as the study's rule
    assert torch.allclose(first, torch.tensor([5.01 / 5.02, 0.01 / 5.02]))
    b2 = torch.tensor([[6.0, 8.0, 0.0], [0.3, 0.4, 0.0]], requires_grad=True)
    d = loss.dissimilarity(a, b2)
    assert torch.allclose(d, torch.tensor([1 - 0.01 / 5.02, 0.51 / 5.02]))  # 10.01 clipped, not 10.01 / 10.02
    assert loss.running_max.item() == pytest.approx(10.01)  # updated for the next batch
    F.binary_cross_entropy(d, torch.zeros(2)).backward()
    assert b2.grad[0].abs().max().item() == 0  # the pair that set the new maximum is not pulled
    study = ft.StudyLoss(eps=0.01)
    study.dissimilarity(a, b)
    b3 = b2.detach().clone().requires_grad_(True)
    F.binary_cross_entropy(study.dissimilarity(a, b3), torch.zeros(2)).backward()
    assert b3.grad[0].norm().item() > 40  # the study's rule: 1/eps (mean of two: 50) on the new maximum's distance


def test_one_study_step_lowers_the_loss_on_a_fixed_batch(tiny_lfw, tmp_path):
    cfg = config(tiny_lfw, tmp_path / "m.pt", lr=0.05).resolved()
    torch.manual_seed(0)
    tr = ft.StudyTrainer(cfg, torch.device("cpu"))
    tr.prepare_phase(1)
    idx = torch.arange(len(tr.pairs))

    rows = torch.cat([tr.pairs[idx, 0], tr.pairs[idx, 1]])

    def fixed_loss(scale: float) -> float:
        tr.model.eval()
        with torch.no_grad():
            a, b = tr.tail(tr.cached(rows)).chunk(2)
            d = (torch.linalg.vector_norm(a - b, dim=1) + cfg.eps) / scale
            return F.binary_cross_entropy(d.clamp(max=1), tr.different[idx].float()).item()

    with torch.no_grad():
        tr.model.eval()
        tr.loss.dissimilarity(*tr.tail(tr.cached(rows)).chunk(2))
    scale = tr.loss.running_max.item() + cfg.eps
    before = fixed_loss(scale)
    tr.prepare_phase(1)
    tr.train_step(idx, 1)
    assert fixed_loss(scale) < before


def test_cached_and_uncached_phase1_give_the_same_weights(tiny_lfw, tmp_path):
    a = ft.finetune(config(tiny_lfw, tmp_path / "a.pt", phase1_epochs=2))
    b = ft.finetune(config(tiny_lfw, tmp_path / "b.pt", phase1_epochs=2, cache_features=False))
    wa, wb = weights(a), weights(b)
    assert any(not torch.equal(wa[k], models.build_model("squeezenet1_0", "none").state_dict()[k]) for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_interrupt_and_resume_equal_an_uninterrupted_run(tiny_lfw, tmp_path, monkeypatch):
    kw = dict(phase1_epochs=1, phase2_epochs=1, batch_size=2, max_pairs=4)
    whole = ft.finetune(config(tiny_lfw, tmp_path / "whole.pt", **kw))
    step = ft.Trainer.train_step

    def interrupted_step(self, idx, phase):
        loss = step(self, idx, phase)
        if self.step == 3:  # mid phase 2: a real signal through the handler
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(ft.Trainer, "train_step", interrupted_step)
    out = tmp_path / "part.pt"
    with pytest.raises(ft.TrainingInterrupted, match="--resume"):
        ft.finetune(config(tiny_lfw, out, **kw))
    saved = torch.load(out, weights_only=True)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"], saved["complete"]) == (1, 1, 3, False)
    monkeypatch.setattr(ft.Trainer, "train_step", step)
    ft.finetune(config(tiny_lfw, out, resume=True, **kw))
    wa, wb = weights(whole), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.load(out, weights_only=True)["running_max"] == torch.load(whole, weights_only=True)["running_max"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_bad_checkpoints_and_configurations_are_refused(tiny_lfw, tmp_path):
    out = ft.finetune(config(tiny_lfw, tmp_path / "m.pt", max_pairs=4))
    with pytest.raises(PipelineError, match="exists"):
        ft.finetune(config(tiny_lfw, out, max_pairs=4))
    with pytest.raises(PipelineError, match=r"another configuration \(lr"):
        ft.finetune(config(tiny_lfw, out, max_pairs=4, lr=0.5, resume=True))
    with pytest.raises(PipelineError, match="is for model squeezenet1_0"):
        ft.finetune(config(tiny_lfw, out, max_pairs=4, model="resnet18", resume=True))
    with pytest.raises(PipelineError, match="trained for model squeezenet1_0"):
        models.build_model("resnet18", str(out))
    junk = tmp_path / "junk.pt"
    torch.save({"something": 1}, junk)
    with pytest.raises(PipelineError, match="not a finetune checkpoint"):
        ft.finetune(config(tiny_lfw, junk, resume=True))
    for bad in (dict(recipe="fancy"), dict(lr=-1.0), dict(max_pairs=1), dict(resume=True, overwrite=True)):
        with pytest.raises(ValueError):
            config(tiny_lfw, out, **bad)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_lfw, tmp_path, monkeypatch):
    forward = ft.StudyLoss.forward

    def nan_in_epoch_2(self, a, b, different):
        loss = forward(self, a, b, different)
        return loss * float("nan") if self.calls_seen > 1 else loss

    def counting(self, a, b, different):
        self.calls_seen = getattr(self, "calls_seen", 0) + 1
        return nan_in_epoch_2(self, a, b, different)

    monkeypatch.setattr(ft.StudyLoss, "forward", counting)
    out = tmp_path / "m.pt"
    with pytest.raises(PipelineError, match="loss became nan.*last good checkpoint"):
        ft.finetune(config(tiny_lfw, out, phase1_epochs=2, batch_size=12))
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_best_recipe_checkpoint_embeds(tiny_lfw, tmp_path):
    out = ft.finetune(
        config(
            tiny_lfw,
            tmp_path / "best.pt",
            recipe="best",
            phase1_epochs=2,
            batch_size=4,
            lr=0.01,
            val_images=600,
            val_fraction=0.4,
        )
    )
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["complete"] and ckpt["config"]["layer"] == "penultimate" and "head" in ckpt
    log = (tmp_path / "best.log").read_text().splitlines()
    assert len(log) == 3 and '"val_auc"' in log[-1]
    store = embed(
        EmbedConfig(
            out=tmp_path / "e.h5",
            data_root=tiny_lfw,
            protocol="pairs",
            model="squeezenet1_0",
            weights=str(out),
            layer="penultimate",
            workers=0,
            batch_size=8,
        )
    )
    assert np.isfinite(open_store(store).rows(0, 4)).all()


def test_cli_finetune_writes_a_checkpoint(tiny_lfw, tmp_path):
    from cli import main

    out = tmp_path / "c.pt"
    args = [
        "finetune",
        "--data-root",
        str(tiny_lfw),
        "--model",
        "squeezenet1_0",
        "--weights",
        "none",
        "--out",
        str(out),
        "--phase1-epochs",
        "1",
        "--phase2-epochs",
        "0",
        "--max-pairs",
        "4",
        "--workers",
        "0",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["complete"]
    again = CliRunner().invoke(main, [*args, "--lr", "0.5", "--resume"])
    assert again.exit_code == 2 and "another configuration" in again.output


def test_batch_pair_loss_prefers_separated_identities():
    loss = ft.BatchPairLoss(scale=20.0)
    labels = torch.tensor([0, 0, 1, 1])
    apart = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert loss(apart, labels) < loss(mixed, labels)
    with pytest.raises(ValueError, match="same-person and different-person"):
        loss(apart, torch.zeros(4, dtype=torch.int64))


def test_best_batches_hold_k_images_of_several_people(tiny_lfw, tmp_path):
    cfg = config(
        tiny_lfw, tmp_path / "b.pt", recipe="best", batch_size=4, images_per_person=2, val_fraction=0.0
    ).resolved()
    tr = ft.BestTrainer(cfg, torch.device("cpu"))
    batches = tr.batches(0)
    assert sum(len(b) for b in batches) == tr.n_items() == 8  # 4 people with 2+ images, 2 each
    for b in batches:
        counts = torch.bincount(tr.train_labels[b])
        assert (counts[counts > 0] == 2).all() and (counts > 0).sum() >= 2
    assert [b.tolist() for b in tr.batches(0)] == [b.tolist() for b in batches]


def test_validation_auc_and_tar_match_brute_force():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 70)
    emb = torch.as_tensor(rng.standard_normal((70, 5)) + 1.2 * rng.standard_normal((12, 5))[labels])
    i, j = np.triu_indices(70, 1)
    same = labels[i] == labels[j]
    for metric in ("l2", "cosine"):
        m = ft.all_pairs_metrics(emb, labels, metric)
        e = emb.double().numpy()
        if metric == "l2":
            sim = -np.linalg.norm(e[i] - e[j], axis=1)
        else:
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            sim = (e[i] * e[j]).sum(1)
        assert m["auc"] == pytest.approx(roc_auc_score(same, sim), abs=1e-9)
        assert ft.all_pairs_auc(emb, labels, metric) == m["auc"]
        # brute force: the best TAR over thresholds accepting at most 0.1% of the different-person pairs
        best = max([0.0] + [(sim[same] >= t).mean() for t in np.unique(sim) if (sim[~same] >= t).mean() <= 1e-3])
        assert m["tar_at_far"] == pytest.approx(best, abs=1e-6) and 0 < best < 1
    assert ft.all_pairs_metrics(emb[:3], np.array([0, 1, 2]), "l2") is None


def test_history_and_training_figure_survive_resume(tiny_lfw, tmp_path, monkeypatch):
    from pipeline.report.figures import recognise_figure

    kw = dict(recipe="best", loss="cosface", phase1_epochs=1, phase2_epochs=1, batch_size=2, val_fraction=0.4)
    whole = ft.finetune(config(tiny_lfw, tmp_path / "whole.pt", val_images=600, **kw))
    step = ft.Trainer.train_step

    def interrupted_step(self, idx, phase):
        loss = step(self, idx, phase)
        if self.step == self.steps_per_epoch() + 1:  # epoch 2, batch 1: after the figure of epoch 1 was drawn
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(ft.Trainer, "train_step", interrupted_step)
    out = tmp_path / "part.pt"
    with pytest.raises(ft.TrainingInterrupted):
        ft.finetune(config(tiny_lfw, out, val_images=600, **kw))
    saved = torch.load(out, weights_only=True)
    assert saved["batch_in_epoch"] == 1 and saved["epoch_loss"][1] == 2 and len(saved["history"]) == 2
    assert recognise_figure(tmp_path / "part.training.png", "training") is None
    monkeypatch.setattr(ft.Trainer, "train_step", step)
    ft.finetune(config(tiny_lfw, out, resume=True, val_images=600, **kw))

    def curves(path):
        keys = ("epoch", "phase", "loss", "val_auc", "val_tar_at_far_0.001")
        return [{k: r.get(k) for k in keys} for r in torch.load(path, weights_only=True)["history"]]

    assert curves(out) == curves(whole) and len(curves(out)) == 3
    # TAR at FAR 1e-3 recorded, null where the validation images give under 1,000 different-person pairs
    history = torch.load(out, weights_only=True)["history"]
    assert all(r["val_auc"] is not None and "val_tar_at_far_0.001" in r for r in history)
    assert [r["phase"] for r in curves(out)] == [0, 1, 2]
    assert recognise_figure(tmp_path / "part.training.png", "training") is None
    log = [json.loads(line) for line in (tmp_path / "part.log").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and "val_tar_at_far_0.001" in log[-1]


def test_finetune_keeps_a_training_figure_it_did_not_write(tiny_lfw, tmp_path):
    from cli import main

    figure = tmp_path / "x.training.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n my own figure")
    args = ["finetune", "--data-root", str(tiny_lfw), "--weights", "none", "--workers", "0", "--max-pairs", "4"]
    args += ["--phase1-epochs", "1", "--phase2-epochs", "0", "--out", str(tmp_path / "x.pt")]
    for extra in ([], ["--overwrite"], ["--resume"]):
        res = CliRunner().invoke(main, [*args, *extra])
        assert res.exit_code == 2 and "x.training.png" in res.output, res.output
    assert figure.read_bytes() == b"\x89PNG\r\n\x1a\n my own figure" and not (tmp_path / "x.pt").exists()
    figure.unlink()
    assert CliRunner().invoke(main, args).exit_code == 0
    assert ft.recognise_training_figure(figure) is None
    figure.unlink()  # a checkpoint of a version that did not draw it: --resume of the complete run draws it
    assert CliRunner().invoke(main, [*args, "--resume"]).exit_code == 0 and figure.is_file()
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0  # ours: replaced
