"""`finetune --members`: the members' runs, the checkpoint that joins them, its embedding (the concatenation of the
members' unit-length embeddings) in `embed`, `run`'s shared pass and the ensemble's validation, resumption and
refusals; on a tiny generated LFW with random-init networks."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline import finetune as ft
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.embedding.shared import embed_together
from pipeline.errors import PipelineError
from pipeline.finetune.joined import joined_embedding
from pipeline.finetune.validation import TAR_KEY, all_pairs_metrics
from pipeline.nets import layers, models
from tests.test_finetune import config

KW = dict(recipe="best", phase1_epochs=1, batch_size=8, lr=0.05, val_images=600, val_fraction=0.4, members=2)
KW1 = {**KW, "members": 1}


def store(root, out, weights, flip=False, protocol="people"):
    return EmbedConfig(
        out=out,
        data_root=root,
        protocol=protocol,
        model="squeezenet1_0",
        weights=str(weights),
        layer="penultimate",
        tta_flip=flip,
        workers=0,
        device="cpu",
        batch_size=4,
    )


def rows(path):
    with h5py.File(path, "r") as f:
        return f["embeddings"][:]


def test_member_configs_differ_in_seed_only_and_share_the_validation_split(tmp_path):
    cfg = ft.FinetuneConfig(out=tmp_path / "m.pt", recipe="best", seed=3, members=3).resolved()
    members = ft.member_configs(cfg)
    assert [m.seed for m in members] == [3, 1003, 2003]
    assert {m.split_seed for m in members} == {3} and {m.members for m in members} == {1}
    assert [m.out.name for m in members] == ["m.member0.pt", "m.member1.pt", "m.member2.pt"]
    assert ft.member_configs(ft.FinetuneConfig(out=tmp_path / "one.pt", recipe="best", members=1).resolved()) == []
    with pytest.raises(PipelineError, match="penultimate"):
        ft.member_configs(ft.FinetuneConfig(out=tmp_path / "s.pt", recipe="study", members=2).resolved())
    with pytest.raises(ValueError, match="members"):
        ft.FinetuneConfig(out=tmp_path / "z.pt", members=0)


def test_split_seed_holds_out_the_same_people_for_other_seeds(tiny_lfw, tmp_path):
    trainers = [
        ft.RECIPES["best"].trainer(
            config(tiny_lfw, tmp_path / f"{s}.pt", seed=s, split_seed=5, **KW).resolved(), torch.device("cpu")
        )
        for s in (0, 1)
    ]
    assert trainers[0].val_labels.tolist() == trainers[1].val_labels.tolist()
    own = ft.RECIPES["best"].trainer(config(tiny_lfw, tmp_path / "5.pt", seed=5, **KW).resolved(), torch.device("cpu"))
    assert own.bank.files.paths == trainers[0].bank.files.paths


@pytest.mark.parametrize("start", ["file", "none"])
def test_ensemble_checkpoint_embeds_the_joined_unit_embeddings_of_its_members(tiny_lfw, tmp_path, start, caplog):
    pre = tmp_path / "pre.pth"
    torch.save(models.build_model("squeezenet1_0", "none").state_dict(), pre)
    out = ft.finetune(config(tiny_lfw, tmp_path / "e.pt", weights=str(pre) if start == "file" else "none", **KW))
    built = models.build_model("squeezenet1_0", str(out))
    # members started from one file share their frozen part (it runs once); random starts run their own
    assert isinstance(built.frozen, torch.nn.Identity) == (start == "none")
    ckpt = torch.load(out, weights_only=True)
    member_files = [tmp_path / "e.member0.pt", tmp_path / "e.member1.pt"]
    assert ckpt["member_files"] == [p.name for p in member_files] and len(ckpt["members"]) == 1
    states = [torch.load(p, weights_only=True)["model"] for p in member_files]
    assert all(torch.equal(ckpt["model"][k], states[0][k]) for k in states[0])
    assert all(torch.equal(ckpt["members"][0][k], states[1][k]) for k in states[1])
    tails = [k for k in states[0] if k.startswith(("features.11", "features.12", layers.POOL))]
    assert tails and not all(torch.equal(states[0][k], states[1][k]) for k in tails)  # other seeds: other tails
    # embed: the concatenation of each member's unit-length penultimate features
    joined = rows(embed(store(tiny_lfw, tmp_path / "joined.h5", out)))
    alone = [rows(embed(store(tiny_lfw, tmp_path / f"m{k}.h5", p))) for k, p in enumerate(member_files)]
    expected = np.concatenate([F.normalize(torch.as_tensor(a), dim=1).numpy() for a in alone], axis=1)
    np.testing.assert_allclose(joined, expected, rtol=1e-4, atol=1e-5)
    # run's shared pass (pretrained and ensemble, test-time flip) writes what embed writes
    together = [store(tiny_lfw, tmp_path / f"t{k}.h5", w, flip=True) for k, w in enumerate((pre, out))]
    with caplog.at_level("INFO"):
        embed_together(together, blocks=2)
    assert ("shares its first layers" in caplog.text) == (start == "file")
    one = rows(embed(store(tiny_lfw, tmp_path / "one.h5", out, flip=True)))
    np.testing.assert_allclose(rows(together[1].out), one, rtol=1e-4, atol=1e-5)
    with pytest.raises(PipelineError, match="--layer penultimate"):
        embed(EmbedConfig(**{**store(tiny_lfw, tmp_path / "o.h5", out).__dict__, "layer": "output"}))


@pytest.mark.parametrize("start", ["file", "none"])
def test_ensemble_validation_is_what_embed_computes(tiny_lfw, tmp_path, start):
    pre = tmp_path / "pre.pth"
    torch.save(models.build_model("squeezenet1_0", "none").state_dict(), pre)
    cfg = config(tiny_lfw, tmp_path / "v.pt", weights=str(pre) if start == "file" else "none", **KW)
    out = ft.finetune(cfg)
    ckpt = torch.load(out, weights_only=True)
    record = ckpt["history"][-1]
    assert record["member"] == "ensemble" and {r["member"] for r in ckpt["history"][:-1]} == {0, 1}
    trainer = ft.RECIPES["best"].trainer(ft.member_configs(cfg.resolved())[0], torch.device("cpu"))
    ensemble = layers.Embedder(models.build_model("squeezenet1_0", str(out)), "penultimate", True)
    with torch.no_grad():
        emb = ensemble.eval()(trainer.bank.batch(torch.as_tensor(trainer.val_rows)))
    # each member's own frozen part (members from --weights none differ there), the cache in float16
    got = joined_embedding(trainer, [ckpt["model"], *ckpt["members"]])
    assert torch.allclose(got, emb, rtol=1e-2, atol=2e-3)
    m = all_pairs_metrics(emb, trainer.val_labels, "cosine")
    assert record["val_auc"] == pytest.approx(m["auc"], abs=2e-3)  # the cache is float16
    assert record[TAR_KEY] == pytest.approx(m["tar_at_far"], abs=0.05)
    assert (tmp_path / "v.training.png").is_file() and (tmp_path / "v.log").is_file()


def test_ensemble_resumes_reuses_and_refuses(tiny_lfw, tmp_path):
    cfg = config(tiny_lfw, tmp_path / "r.pt", **KW)
    out = ft.finetune(cfg)
    before = out.stat().st_mtime_ns
    member1 = tmp_path / "r.member1.pt"
    m1 = member1.stat().st_mtime_ns
    assert ft.finetune(config(tiny_lfw, out, resume=True, **KW)) == out and out.stat().st_mtime_ns == before
    first = torch.load(out, weights_only=True)
    out.unlink()  # killed after the members: resuming joins them again without training
    ft.finetune(config(tiny_lfw, out, resume=True, **KW))
    again = torch.load(out, weights_only=True)
    assert member1.stat().st_mtime_ns == m1
    assert all(torch.equal(first["members"][0][k], v) for k, v in again["members"][0].items())
    assert again["history"][-1] == first["history"][-1]
    with pytest.raises(PipelineError, match="ensemble"):  # a joined checkpoint is no starting point
        ft.finetune(config(tiny_lfw, tmp_path / "x.pt", weights=str(out), **KW1))
    out.unlink()
    with pytest.raises(PipelineError, match="exists"):  # files of the earlier run are never replaced without asking
        ft.finetune(config(tiny_lfw, out, **KW))
    with pytest.raises(PipelineError, match="configuration"):
        ft.finetune(config(tiny_lfw, tmp_path / "r.pt", resume=True, **{**KW, "lr": 0.01}))


def test_join_members_validates_finished_runs_as_finetune_joins_them(tiny_lfw, tmp_path):
    from click.testing import CliRunner

    from benchmarks.join_members import command

    paths = [ft.finetune(config(tiny_lfw, tmp_path / f"s{s}.pt", seed=s, split_seed=0, **KW1)) for s in (0, 1000)]
    joined = ft.finetune(config(tiny_lfw, tmp_path / "j.pt", **{**KW1, "members": 2}))
    result = CliRunner().invoke(command, ["--data-root", str(tiny_lfw), *map(str, paths)], catch_exceptions=False)
    start = '{"networks"'  # a row may follow a progress bar on its line
    rows = [json.loads(line[line.index(start) :]) for line in result.output.splitlines() if start in line]
    assert [r["networks"] for r in rows] == [["s0.pt"], ["s1000.pt"], ["s0.pt", "s1000.pt"]]
    record = torch.load(joined, weights_only=True)["history"][-1]  # the same two networks, joined by finetune
    assert rows[-1]["val_auc"] == pytest.approx(record["val_auc"], abs=2e-3)  # finetune's features are cached
    other = ft.finetune(config(tiny_lfw, tmp_path / "o.pt", seed=7, **KW1))
    with pytest.raises(PipelineError, match="one split"):
        CliRunner().invoke(command, ["--data-root", str(tiny_lfw), str(paths[0]), str(other)], catch_exceptions=False)
