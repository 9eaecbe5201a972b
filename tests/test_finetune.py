"""Fine-tuning on a tiny generated LFW with random-init SqueezeNet: the study's step, the phase-1 cache,
checkpoints, interrupt + resume (history and training figure included), refusals, the NaN guard, validation
(AUC and TAR at FAR 1e-3) and the best recipe."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from pipeline import data
from pipeline import finetune as ft
from pipeline.embed import EmbedConfig, embed
from pipeline.errors import PipelineError
from pipeline.store import open_store


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
    )
    return ft.FinetuneConfig(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_max_pairs_takes_both_classes(tiny_lfw):
    proto = data.load_protocol(tiny_lfw, "deepfunneled", "pairs", "train")
    few = ft.study_pairs(proto, 5)
    assert few.pair_labels.tolist() == [1, 1, 1, 0, 0]


def test_study_loss_is_normalised_and_keeps_running_max():
    loss = ft.StudyLoss(eps=0.01)
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    d = loss.dissimilarity(a, b)
    assert torch.allclose(d, torch.tensor([5.01 / 5.02, 0.01 / 5.02]))
    loss.dissimilarity(a, b * 0.1)
    assert loss.running_max.item() == pytest.approx(5.01)


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
    assert any(not torch.equal(wa[k], ft.models.build_model("squeezenet1_0", "none").state_dict()[k]) for k in wa)
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
        ft.models.build_model("resnet18", str(out))
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
    from pipeline.figures import recognise_figure

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
    assert all(r["val_auc"] is not None and r["val_tar_at_far_0.001"] is not None for r in curves(out))
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


@pytest.mark.parametrize("blocks", [1, 2, 5, 8])
def test_train_blocks_cut_squeezenet_where_asked(blocks):
    from torchvision import models as tvm

    from pipeline import models

    model = models.build_model("squeezenet1_0", "none").eval()
    frozen, tail = ft.split_model(model, "penultimate", blocks)
    assert sum(isinstance(m, tvm.squeezenet.Fire) for m in tail.modules()) == blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tail(frozen(x)), models.penultimate(model, x), atol=1e-5)
    with pytest.raises(PipelineError, match="between 1 and 8"):
        ft.split_model(model, "penultimate", 9)


def test_resnet_blocks_and_layerwise_learning_rates_of_fire_modules(tiny_lfw, tmp_path):
    from torchvision import models as tvm

    from pipeline import models

    model = models.build_model("resnet18", "none").eval()
    frozen, tail = ft.split_model(model, "penultimate", 2)
    assert list(tail.children())[:2] == [model.layer3, model.layer4]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tail(frozen(x)), models.penultimate(model, x), atol=1e-5)
    cfg = config(tiny_lfw, tmp_path / "b.pt", recipe="best", train_blocks=3, lr_decay=0.5, lr=0.1).resolved()
    trainer = ft.TRAINERS["best"](cfg, torch.device("cpu"))
    fires = [m for m in trainer.tail.children() if isinstance(m, tvm.squeezenet.Fire)]
    scales = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert [scales[id(next(m.parameters()))] for m in fires] == [0.25, 0.5, 1.0]
    assert scales[id(getattr(trainer.model, models.POOL).weight)] == 1.0  # the preset's learned pooling
    trainer.train_step(trainer.batches(0)[0], 1)
    lrs = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[0.25] == pytest.approx(lrs[1.0] * 0.25) and lrs[1.0] > 0


def test_tta_flip_validation_is_the_mean_of_both_orientations(tiny_lfw, tmp_path):
    cfg = config(tiny_lfw, tmp_path / "t.pt", recipe="best", tta_flip=True, val_images=600, val_fraction=0.4)
    trainer = ft.TRAINERS["best"](cfg.resolved(), torch.device("cpu"))
    trainer.prepare_phase(1)
    rows = torch.as_tensor(trainer.val_rows)
    got = trainer.embed_rows(rows)
    trainer.model.eval()
    with torch.no_grad():
        own = trainer.tail(trainer.frozen(trainer.bank.batch(rows)))
        mirror = trainer.tail(trainer.frozen(trainer.bank.batch(rows, torch.ones(len(rows), dtype=torch.bool))))
    assert torch.allclose(got, (own + mirror) / 2, rtol=1e-2, atol=1e-3)  # the cache is float16
    assert not torch.allclose(own, mirror, atol=1e-3)


def test_learned_pool_starts_as_the_average_and_travels_with_the_checkpoint(tiny_lfw, tmp_path):
    from pipeline import models

    model = models.build_model("squeezenet1_0", "none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = models.penultimate(model, x)
        models.add_learned_pool(model, models.feature_side(model, 64))
        assert torch.allclose(models.penultimate(model, x), before, atol=1e-5)
    out = ft.finetune(
        config(tiny_lfw, tmp_path / "p.pt", recipe="best", pool="learned", phase1_epochs=1, lr=0.05, val_images=0)
    )
    state = torch.load(out, weights_only=True)["model"]
    assert state[f"{models.POOL}.weight"].shape == (512, 1, 13, 13)
    assert not torch.allclose(state[f"{models.POOL}.weight"], torch.full((512, 1, 13, 13), 1 / 169))
    loaded = models.build_model("squeezenet1_0", str(out))
    assert torch.equal(getattr(loaded, models.POOL).weight, state[f"{models.POOL}.weight"])


def test_bf16_trains_the_network_in_bfloat16_and_the_loss_in_float32(tiny_lfw, tmp_path):
    from pipeline.runtime import autocast

    cfg = config(tiny_lfw, tmp_path / "h.pt", recipe="best", bf16=True, val_images=0).resolved()
    trainer = ft.TRAINERS["best"](cfg, torch.device("cpu"))
    trainer.prepare_phase(1)
    idx = trainer.batches(0)[0]
    seen = {}
    trainer.tail.register_forward_hook(lambda m, i, o: seen.update(tail=seen.get("tail", o.dtype)))
    losses = []
    for bf16 in (True, False):
        torch.manual_seed(0)  # the same flips
        with torch.no_grad(), autocast(trainer.device, cpu_bf16=bf16):
            losses.append(trainer.loss_of(idx, 1))
    assert seen["tail"] == torch.bfloat16
    assert losses[0].dtype == losses[1].dtype == torch.float32
    assert losses[0].item() != losses[1].item()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=0.05)
    assert np.isfinite(trainer.train_step(idx, 1))


def test_random_shift_moves_each_map_by_at_most_the_cells_asked():
    x = torch.rand(6, 3, 5, 7) + 1  # no zeros of its own
    torch.manual_seed(1)
    y = ft.random_shift(x, 1)
    assert y.shape == x.shape and torch.equal(ft.random_shift(x, 0), x)
    moves = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(y[i], F.pad(x[i], (1, 1, 1, 1))[:, 1 - dy : 6 - dy, 1 - dx : 8 - dx])
        ]
        assert len(found) == 1
        moves |= set(found)
    assert len(moves) > 1  # not one move for all


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks_without_new_page_faults():
    from pipeline.runtime import keep_freed_memory

    def faults_of_a_new_64mb_array() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = np.ones(16 << 20, dtype=np.float32)  # 64 MB, above glibc's mmap ceiling
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    keep_freed_memory()
    faults_of_a_new_64mb_array()
    # mapped afresh, every array faults in its pages again: 16,384 (4 kB pages) or 32 huge pages and their tables
    assert faults_of_a_new_64mb_array() < 16


def test_singletons_join_the_batches_once_per_epoch(tiny_lfw, tmp_path):
    cfg = config(tiny_lfw, tmp_path / "s.pt", recipe="best", singletons=True, batch_size=8).resolved()
    trainer = ft.TRAINERS["best"](cfg, torch.device("cpu"))
    assert len(trainer.singles) > 0
    counts = np.bincount(trainer.train_labels.numpy())
    assert (counts[trainer.train_labels[trainer.singles]] == 1).all()
    batches = trainer.batches(0)
    seen = torch.cat(batches)
    assert sorted(seen[np.isin(seen, trainer.singles)].tolist()) == sorted(trainer.singles.tolist())
    assert len(seen) == trainer.n_items()
    for b in batches:  # every batch still holds same-person pairs
        assert counts[trainer.train_labels[b]].max() >= 2 and len(set(trainer.train_labels[b].tolist())) >= 2
    assert np.isfinite(trainer.train_step(batches[0], 1))
