"""The best recipe's knobs on a tiny generated LFW with random-init networks: trained blocks and per-block learning
rates, test-time flip, learned pooling, bfloat16 training, feature-map shifts and single-image people."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline import finetune as ft
from pipeline.errors import PipelineError
from pipeline.finetune.averaging import WeightAverage
from pipeline.nets.split import split_model
from tests.test_finetune import config


@pytest.mark.parametrize("blocks", [1, 2, 5, 8])
def test_train_blocks_cut_squeezenet_where_asked(blocks):
    from torchvision import models as tvm

    from pipeline.nets import layers, models

    model = models.build_model("squeezenet1_0", "none").eval()
    frozen, tail = split_model(model, "penultimate", blocks)
    assert sum(isinstance(m, tvm.squeezenet.Fire) for m in tail.modules()) == blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tail(frozen(x)), layers.penultimate(model, x), atol=1e-5)
    with pytest.raises(PipelineError, match="between 1 and 8"):
        split_model(model, "penultimate", 9)


def test_resnet_blocks_and_layerwise_learning_rates_of_fire_modules(tiny_lfw, tmp_path):
    from torchvision import models as tvm

    from pipeline.nets import layers, models

    model = models.build_model("resnet18", "none").eval()
    frozen, tail = split_model(model, "penultimate", 2)
    assert list(tail.children())[:2] == [model.layer3, model.layer4]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tail(frozen(x)), layers.penultimate(model, x), atol=1e-5)
    cfg = config(tiny_lfw, tmp_path / "b.pt", recipe="best", train_blocks=3, lr_decay=0.5, lr=0.1).resolved()
    trainer = ft.RECIPES["best"].trainer(cfg, torch.device("cpu"))
    fires = [m for m in trainer.tail.children() if isinstance(m, tvm.squeezenet.Fire)]
    scales = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert [scales[id(next(m.parameters()))] for m in fires] == [0.25, 0.5, 1.0]
    assert scales[id(getattr(trainer.model, layers.POOL).weight)] == 1.0  # the preset's learned pooling
    trainer.train_step(trainer.batches(0)[0], 1)
    lrs = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[0.25] == pytest.approx(lrs[1.0] * 0.25) and lrs[1.0] > 0


def test_tta_flip_validation_is_the_mean_of_both_orientations(tiny_lfw, tmp_path):
    cfg = config(tiny_lfw, tmp_path / "t.pt", recipe="best", tta_flip=True, val_images=600, val_fraction=0.4)
    trainer = ft.RECIPES["best"].trainer(cfg.resolved(), torch.device("cpu"))
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
    from pipeline.nets import layers, models

    model = models.build_model("squeezenet1_0", "none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = layers.penultimate(model, x)
        layers.add_learned_pool(model, layers.feature_side(model, 64))
        assert torch.allclose(layers.penultimate(model, x), before, atol=1e-5)
    out = ft.finetune(
        config(tiny_lfw, tmp_path / "p.pt", recipe="best", pool="learned", phase1_epochs=1, lr=0.05, val_images=0)
    )
    state = torch.load(out, weights_only=True)["model"]
    assert state[f"{layers.POOL}.weight"].shape == (512, 1, 13, 13)
    assert not torch.allclose(state[f"{layers.POOL}.weight"], torch.full((512, 1, 13, 13), 1 / 169))
    loaded = models.build_model("squeezenet1_0", str(out))
    assert torch.equal(getattr(loaded, layers.POOL).weight, state[f"{layers.POOL}.weight"])


def test_bf16_trains_the_network_in_bfloat16_and_the_loss_in_float32(tiny_lfw, tmp_path):
    from pipeline.runtime import autocast

    cfg = config(tiny_lfw, tmp_path / "h.pt", recipe="best", bf16=True, val_images=0).resolved()
    trainer = ft.RECIPES["best"].trainer(cfg, torch.device("cpu"))
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


def test_singletons_join_the_batches_once_per_epoch(tiny_lfw, tmp_path):
    cfg = config(tiny_lfw, tmp_path / "s.pt", recipe="best", singletons=True, batch_size=8).resolved()
    trainer = ft.RECIPES["best"].trainer(cfg, torch.device("cpu"))
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


def test_weight_average_follows_its_formula_and_swaps_back():
    net = torch.nn.Linear(2, 1, bias=False)
    avg = WeightAverage(0.5)
    with torch.no_grad():
        net.weight.fill_(2.0)
        avg.update(net)  # starts at the weights
        net.weight.fill_(4.0)
        avg.update(net)  # 0.5 * 2 + 0.5 * 4
    assert torch.equal(avg.state["weight"], torch.full((1, 2), 3.0))
    with avg.swapped_into(net):
        assert torch.equal(net.weight, torch.full((1, 2), 3.0))
    assert torch.equal(net.weight, torch.full((1, 2), 4.0))
    unused = WeightAverage(0.0)
    unused.update(net)
    with unused.swapped_into(net):
        assert unused.state is None and torch.equal(net.weight, torch.full((1, 2), 4.0))


def test_ema_weights_are_validated_kept_and_resumed_exactly(tiny_lfw, tmp_path, monkeypatch):
    kw = dict(recipe="best", phase1_epochs=2, batch_size=8, lr=0.05, val_images=600, val_fraction=0.4, ema=0.9,
              keep_best=False)  # fmt: skip
    seen = []
    embed_rows = ft.Trainer.embed_rows

    def checking(self, rows):  # validation: the model holds the average once there is one
        if self.average.state:
            params = dict(self.model.named_parameters())
            seen.append(all(torch.equal(params[k], v) for k, v in self.average.state.items()))
        return embed_rows(self, rows)

    monkeypatch.setattr(ft.Trainer, "embed_rows", checking)
    whole = ft.finetune(config(tiny_lfw, tmp_path / "whole.pt", **kw))
    assert len(seen) == 2 and all(seen)
    a = torch.load(whole, weights_only=True)
    assert a["ema"] and all(torch.equal(a["model"][k], v) for k, v in a["ema"].items())  # the final weights
    step = ft.Trainer.train_step

    def interrupted_step(self, idx, phase):
        loss = step(self, idx, phase)
        if self.step == 1:  # after the first of two epochs' steps
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(ft.Trainer, "train_step", interrupted_step)
    out = tmp_path / "part.pt"
    with pytest.raises(ft.TrainingInterrupted):
        ft.finetune(config(tiny_lfw, out, **kw))
    monkeypatch.setattr(ft.Trainer, "train_step", step)
    ft.finetune(config(tiny_lfw, out, resume=True, **kw))
    b = torch.load(out, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert [r.get("val_auc") for r in a["history"]] == [r.get("val_auc") for r in b["history"]]


def test_feature_file_holds_the_bytes_of_the_memory_cache(tiny_lfw, tmp_path):
    """The cache in a file (`FeatureFile`, unlinked at once: no file left beside --out) reads back the rows the
    in-memory cache holds, bit for bit, for every variant pattern the trainer asks for."""
    from pipeline.finetune import features

    cfg = config(tiny_lfw, tmp_path / "t.pt", recipe="best", val_images=600, val_fraction=0.4)
    trainer = ft.RECIPES["best"].trainer(cfg.resolved(), torch.device("cpu"))
    args = (trainer.frozen, trainer.bank, torch.device("cpu"), "float16")
    before = set(os.listdir(tmp_path))
    for flip in (True, False):
        memory = features.compute_features(*args, flip, "memory")
        on_disk = features.compute_features(*args, flip, "file", tmp_path)
        assert isinstance(on_disk, features.FeatureFile) and on_disk.nbytes == memory.nbytes
        assert set(os.listdir(tmp_path)) == before  # nameless from the start
        idx = torch.tensor([3, 0, 3, len(trainer.bank) - 1])
        for mirror in (None, torch.tensor([True, False, False, True])):
            want = features.cached_rows(memory, idx, mirror, flip, torch.device("cpu"))
            got = features.cached_rows(on_disk, idx, mirror, flip, torch.device("cpu"))
            assert got.shape == want.shape and torch.equal(got, want) and got.stride() == want.stride()


def test_training_on_the_feature_file_equals_training_in_memory(tiny_lfw, tmp_path, monkeypatch):
    """The best recipe trained on the file cache and on the in-memory cache: the same weights, bit for bit."""
    from pipeline.finetune import features
    from tests.test_finetune import weights

    kw = dict(recipe="best", phase1_epochs=2, batch_size=4, val_images=600, val_fraction=0.4)
    on_disk = ft.finetune(config(tiny_lfw, tmp_path / "disk.pt", **kw))
    made = features._feature_cache
    monkeypatch.setattr(features, "_feature_cache", lambda folder, *a: made(None, *a))  # the heap, as before
    in_memory = ft.finetune(config(tiny_lfw, tmp_path / "memory.pt", **kw))
    wa, wb = weights(on_disk), weights(in_memory)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_images_decoded_for_the_cache_alone_train_as_kept_images(tiny_lfw, tmp_path, monkeypatch):
    """The best recipe reads only its feature cache: its images are decoded while caching and not kept; kept (as
    before), they train the same weights bit for bit (torch's global generator drawn as before)."""
    from pipeline.finetune import features
    from tests.test_finetune import weights

    kw = dict(recipe="best", phase1_epochs=2, batch_size=4, val_images=600, val_fraction=0.4, workers=1)
    banks = []
    made = features.ImageBank.__init__

    def recorded(self, proto, workers, keep=True):
        made(self, proto, workers, keep)
        banks.append(self)

    monkeypatch.setattr(features.ImageBank, "__init__", recorded)
    streamed = ft.finetune(config(tiny_lfw, tmp_path / "streamed.pt", **kw))
    assert len(banks) == 1 and banks[0].images is None and banks[0].nbytes == 0
    monkeypatch.setattr(
        features.ImageBank, "__init__", lambda self, proto, workers, keep=True: recorded(self, proto, workers)
    )
    kept = ft.finetune(config(tiny_lfw, tmp_path / "kept.pt", **kw))
    assert banks[1].images is not None and len(banks[1].images) == len(banks[0])
    wa, wb = weights(streamed), weights(kept)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = torch.tensor([2, 0, len(banks[0]) - 1])  # a row asked of a bank that keeps nothing is decoded then
    assert torch.equal(
        banks[0].batch(rows, torch.tensor([True, False, True])), banks[1].batch(rows, torch.tensor([True, False, True]))
    )


def test_two_processes_of_one_command_train_identical_weights(tiny_lfw, tmp_path):
    """Each run in a fresh process (its own allocations and threads), bfloat16 autocast as in the preset: the
    weights, the head and the history (timings aside) are the same bit for bit (docs/finetuning.md#runs-that-repeat)."""
    import subprocess
    import sys

    args = ["--data-root", str(tiny_lfw), "--weights", "none", "--recipe", "best", "--members", "1", "--cohort-top",
            "0", "--phase1-epochs", "2", "--batch-size", "8", "--workers", "0", "--bf16"]  # fmt: skip
    runs = []
    for name in ("a.pt", "b.pt"):
        done = subprocess.run([sys.executable, "cli.py", "finetune", *args, "--out", str(tmp_path / name)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(torch.load(tmp_path / name, map_location="cpu", weights_only=True))
    a, b = runs
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    timing = ("seconds", "imgs_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in b["history"]
    ]
