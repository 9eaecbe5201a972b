"""Which people fine-tuning sees (`pipeline.finetune.split`) and `embed`'s warning where a face set holds them
(`pipeline.finetune.overlap`): on the real protocol files, the training, validation and cohort people of the
presets share no person with each other's parts or with either test split (LFWPairs test = pairsDevTest,
LFWPeople test = peopleDevTest), for every seed; on the tiny generated LFW, the trainers train on the split and
`embed --protocol 10fold` with a fine-tuned checkpoint warns with the count."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline import finetune as ft
from pipeline.embedding.embed import EmbedConfig
from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.finetune.overlap import PHRASE, listed, overlap_warning, warn_training_overlap
from pipeline.finetune.split import training_faces, training_split
from pipeline.finetune.validation import random_people, validation_rows
from pipeline.finetune.validation_folder import remove_validation_outputs, validation_outputs
from pipeline.report.results import read_json
from pipeline.store.layout import open_store
from tests.conftest import TRAIN_PEOPLE

SPLIT_SEEDS = range(100)
"""The best recipe's split seeds tried (`split_seed`, else `seed`; members share their run's): the proof for any
seed is that every part is drawn from peopleDevTrain, which shares no person with the test files."""


def names(faces: lfw.FaceSet) -> set[str]:
    return {faces.identities[i] for i in np.unique(faces.labels)}


def preset(root: Path, recipe: str, **kw) -> ft.FinetuneConfig:
    """The recipe's preset (`--recipe RECIPE`), with `kw` set."""
    return ft.FinetuneConfig(**{"out": Path("x.pt"), "data_root": root, "recipe": recipe, **kw}).resolved()


def check_disjoint(split, dev_train: set[str], tests: dict[str, set[str]]) -> None:
    train, val, cohort = (split.people(p) for p in ("train", "validation", "cohort"))
    assert train and val and cohort <= train
    assert not train & val, "a validation person trains"
    assert train | val <= dev_train
    for name, people in tests.items():
        assert not (train | val | cohort) & people, f"a training, validation or cohort person is in {name}"


def test_presets_share_no_person_with_the_test_splits(shared_data):
    faces = training_faces(shared_data, "deepfunneled", ("people", "pairs"))
    tests = {f: names(lfw.load_protocol(shared_data, "deepfunneled", p, "test")) for p, f in
             (("pairs", "pairsDevTest"), ("people", "peopleDevTest"))}  # fmt: skip
    dev_train = names(faces["people"])
    assert not dev_train & (tests["pairsDevTest"] | tests["peopleDevTest"])  # so any split of peopleDevTrain
    assert names(faces["pairs"]) <= dev_train
    study = [training_split(preset(shared_data, "study", seed=s), faces) for s in (0, 1, 2)]
    assert all(s.train.paths == study[0].train.paths and s.validation.paths == study[0].validation.paths for s in study)
    check_disjoint(study[0], dev_train, tests)
    assert not study[0].people("validation") & names(faces["pairs"])  # held out: in no pairsDevTrain pair
    helds = set()
    for seed in SPLIT_SEEDS:
        cfg = preset(shared_data, "best", seed=seed)
        split = training_split(cfg, faces)
        check_disjoint(split, dev_train, tests)
        helds.add(tuple(split.held))
        if seed < 3:  # the members of `--recipe best` (seed + 1000 k) hold out the run's people
            for member in ft.member_configs(cfg):
                assert training_split(member, faces).train.paths == split.train.paths
        if seed == 0:  # the split seed alone sets it
            other = training_split(preset(shared_data, "best", seed=5, split_seed=0), faces)
            assert other.validation.paths == split.validation.paths and other.train.paths == split.train.paths
    assert len(helds) == len(SPLIT_SEEDS)  # the seeds do vary it


def same_person_share(labels: np.ndarray) -> tuple[float, float]:
    """(largest share of one person's images, share of same-person pairs among all pairs)."""
    counts = np.bincount(labels)
    n = len(labels)
    return counts.max() / n, (counts * (counts - 1)).sum() / (n * (n - 1))


def test_validation_looks_like_the_test(shared_data):
    """Seeds 0, 1, 2 of both presets: no person above 5% of the images, at most 2% same-person pairs (LFWPeople
    test: 3.3% and 0.36%), hundreds of people; the rule of older checkpoints (`val_per_person` 0) did not."""
    faces = training_faces(shared_data, "deepfunneled", ("people", "pairs"))
    for recipe in ("best", "study"):
        for seed in (0, 1, 2):
            split = training_split(preset(shared_data, recipe, seed=seed), faces)
            largest, same = same_person_share(split.validation.labels)
            assert len(split.validation) == 600 and largest <= 0.05 and same <= 0.02, (recipe, seed, largest, same)
            assert len(split.people("validation")) >= 250
    old = training_split(preset(shared_data, "best", seed=0, val_per_person=0), faces)
    assert same_person_share(old.validation.labels)[0] > 0.5  # seed 0's: 462 of 600 images of one person


@pytest.mark.parametrize(("cap", "per_person"), [(0, 3), (1, 1), (7, 2), (40, 3), (1000, 5), (1000, 1)])
def test_validation_rows_draw_people_and_cap_them(cap, per_person):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 30, 200) ** 2 % 37  # uneven people, some absent
    people = np.unique(labels)[::2]
    rows = validation_rows(labels, people, cap, per_person, seed=11)
    assert np.all(np.diff(rows) > 0) and np.isin(labels[rows], people).all()
    taken = np.bincount(labels[rows], minlength=37)
    assert taken.max(initial=0) <= per_person
    available = np.minimum(np.bincount(labels, minlength=37)[people], per_person)
    assert len(rows) == min(cap, available.sum())
    partial = (taken[people] > 0) & (taken[people] < available)  # only the last person drawn may give fewer
    assert partial.sum() <= 1
    assert rows.tolist() == validation_rows(labels, people, cap, per_person, seed=11).tolist()
    if 0 < cap < available.sum():
        others = [validation_rows(labels, people, cap, per_person, seed=s).tolist() for s in range(5)]
        assert len({tuple(o) for o in others}) > 1  # the seed draws them


@pytest.mark.parametrize("recipe", ["study", "best"])
def test_trainers_train_and_validate_on_the_split(tiny_lfw, recipe):
    kw = dict(weights="none", workers=0, val_images=600, val_fraction=0.4, batch_size=4, phase1_epochs=1)
    cfg = preset(tiny_lfw, recipe, **kw)
    split = training_split(cfg)
    trainer = ft.RECIPES[recipe].trainer(cfg, torch.device("cpu"))
    assert trainer.val_files == [split.validation.absolute(i) for i in range(len(split.validation))]
    assert trainer.val_labels.tolist() == split.validation.labels.tolist()
    if recipe == "best":
        assert trainer.n_train == len(split.train) == len(split.cohort)
        held = {sorted(TRAIN_PEOPLE)[i] for i in random_people(len(TRAIN_PEOPLE), 0.4, 0)}
        assert split.people("train") == {n for n, k in TRAIN_PEOPLE.items() if k >= 2} - held
    else:
        assert trainer.pairs.tolist() == split.train.pairs.tolist()


def checkpoint(path: Path, root: Path, **kw) -> Path:
    """A finetune checkpoint's fields that the warning reads (its config), without training."""
    config = preset(root, kw.pop("recipe", "best"), **kw).identity()
    torch.save({"model": {}, "config": config, "complete": True}, path)
    return path


def view2(root: Path) -> lfw.FaceSet:
    return lfw.load_protocol(root, "deepfunneled", "10fold", "test")


def test_embed_10fold_with_a_finetuned_checkpoint_warns_with_the_count(tiny_lfw, tmp_path, caplog):
    out = ft.finetune(preset(tiny_lfw, "best", out=tmp_path / "b.pt", weights="none", workers=0, phase1_epochs=1,
                             batch_size=4, members=1, cohort_top=0, val_fraction=0.4, bf16=False))  # fmt: skip
    held = {sorted(TRAIN_PEOPLE)[i] for i in random_people(len(TRAIN_PEOPLE), 0.4, 0)}
    trained = {n for n, k in TRAIN_PEOPLE.items() if k >= 2} - held
    v2 = view2(tiny_lfw)
    people = names(v2)
    seen = trained | (held & people)
    n_pairs = sum(v2.identities[v2.labels[a]] in seen or v2.identities[v2.labels[b]] in seen for a, b in v2.pairs)
    args = ["embed", "--data-root", str(tiny_lfw), "--weights", str(out), "--workers", "0", "--protocol", "10fold"]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "v2.h5")])
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if PHRASE in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"View 2 (pairs.txt) {PHRASE} of {out}")
    assert f"{len(trained & people)} of its {len(people)} people trained the network" in warned[0]
    assert f"{len(held & people)} more were its validation people" in warned[0]
    assert f"{n_pairs} of its {len(v2.pairs)} pairs hold one of them" in warned[0]
    caplog.clear()
    for protocol in ("people", "pairs"):  # the test splits: no warning
        cfg = EmbedConfig(out=tmp_path / "t.h5", data_root=tiny_lfw, protocol=protocol, split="test", weights=str(out))
        assert warn_training_overlap(cfg) is None
    assert not caplog.records


def test_the_warning_says_where_the_people_were_read_and_what_it_cannot_tell(tiny_lfw, tmp_path):
    faces = listed(tiny_lfw, "deepfunneled", "10fold", "test")
    moved = checkpoint(tmp_path / "moved.pt", tmp_path / "elsewhere", recipe="study")
    message = overlap_warning(str(moved), faces, tiny_lfw, "deepfunneled")
    pairs_people = names(lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "train"))
    assert f"{len(pairs_people)} of its {len(faces.people)} people trained the network" in message
    assert f"the training files of {tiny_lfw} (the checkpoint's data root {tmp_path / 'elsewhere'}" in message
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    message = overlap_warning(str(plain), faces, tiny_lfw, "deepfunneled")
    n = len(faces.people & set(TRAIN_PEOPLE))
    assert "does not record what it was trained on (a plain state_dict)" in message and PHRASE in message
    assert f"{n} of its {len(faces.people)} people were among them" in message
    old = tmp_path / "old.pt"
    config = preset(tiny_lfw, "best").identity()
    del config["split_seed"], config["val_per_person"]  # added since: their values before (LATER_FIELDS)
    torch.save({"model": {}, "config": config}, old)
    assert "people trained the network" in overlap_warning(str(old), faces, tiny_lfw, "deepfunneled")
    del config["val_fraction"]
    torch.save({"model": {}, "config": config}, old)
    assert "its config lacks val_fraction" in overlap_warning(str(old), faces, tiny_lfw, "deepfunneled")
    torch.save({"model": {}, "epoch": 1}, old)
    assert "(no finetune config)" in overlap_warning(str(old), faces, tiny_lfw, "deepfunneled")
    assert overlap_warning("imagenet", faces, tiny_lfw, "deepfunneled") is None


def test_real_view2_overlap_of_the_best_preset(shared_data, tmp_path):
    """View 2 holds 4,281 people, 2,985 of them in peopleDevTrain; `--recipe best` (seed 0) trains on 1,027 of them
    (its people with two or more images outside the held-out tenth) and validates on 220 more (34 under the rule
    before `val_per_person`)."""
    faces = listed(shared_data, "deepfunneled", "10fold", "test")
    dev_train = listed(shared_data, "deepfunneled", "people", "train")
    assert len(faces.people) == 4281 and len(faces.people & dev_train.people) == 2985
    message = overlap_warning(str(checkpoint(tmp_path / "b.pt", shared_data)), faces, shared_data, "deepfunneled")
    split = training_split(preset(shared_data, "best"))
    trained = faces.people & split.people("train")
    assert len(trained) == 1027
    assert f"View 2 (pairs.txt) {PHRASE}" in message and "1,027 of its 4,281 people trained the network" in message
    assert "220 more were its validation people" in message
    assert len(faces.people & split.people("validation")) == 220
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    assert "2,985 of its 4,281 people were among them" in overlap_warning(
        str(plain), faces, shared_data, "deepfunneled"
    )


def test_finetune_writes_its_validation_paths_and_results_folder(tiny_lfw, tmp_path):
    """The checkpoint names its validation images; NAME.validation/ scores all their pairs as `score` does (its
    store made from the training's feature cache: `embed`'s rows but for the cache's float16 rounding; from the
    images, as `embed` makes it, where nothing is cached), and `compare` and `score --threshold-from` read it (a
    threshold from 4 images: refused, and why); a foreign folder there is refused before training."""
    kw = dict(out=tmp_path / "b.pt", weights="none", workers=0, phase1_epochs=1, batch_size=4, members=1,
              cohort_top=0, val_fraction=0.4, val_per_person=2, bf16=False)  # fmt: skip
    cfg = preset(tiny_lfw, "best", **kw)
    out = ft.finetune(cfg)
    split = training_split(cfg)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["validation_paths"] == split.validation.paths
    assert all((tiny_lfw / p).is_file() for p in ckpt["validation_paths"])
    store, folder = validation_outputs(out)
    with open_store(store) as s:
        assert s.strings("paths") == split.validation.paths and s.labels.tolist() == split.validation.labels.tolist()
    # `embed --split validation --weights CKPT`: the same images and people, embedded as finetune embedded them
    args = ["embed", "--data-root", str(tiny_lfw), "--split", "validation", "--weights", str(out), "--layer",
            "penultimate", "--tta-flip", "--workers", "0", "--out", str(tmp_path / "v.h5")]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    with open_store(store) as s, open_store(tmp_path / "v.h5") as v:
        assert v.strings("paths") == s.strings("paths")
        who = [[ids[i] for i in st.labels] for st, ids in ((s, s.strings("identities")), (v, v.strings("identities")))]
        assert who[0] == who[1]
        assert s.attrs["frozen_outputs"] == "finetune's cached features (float16)"
        assert not np.array_equal(v.embeddings[:], s.embeddings[:])  # float16 features, not the images' float32
        assert np.allclose(v.embeddings[:], s.embeddings[:], rtol=2e-3, atol=2e-4)
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(out, weights_only=True)["model"], plain)
    refused = CliRunner().invoke(main, [*args[:6], str(plain), "--out", str(tmp_path / "w.h5")])
    assert refused.exit_code != 0 and "records no validation images" in refused.output
    n = len(split.validation)
    metrics = read_json(folder / "metrics.json", "results")
    assert metrics["n_pairs"] == n * (n - 1) // 2 and metrics["metric"] == "cosine"
    counts = np.bincount(split.validation.labels)
    assert metrics["n_positive"] == (counts * (counts - 1) // 2).sum()
    again = CliRunner().invoke(main, ["compare", str(folder), str(folder), "--out", str(tmp_path / "cmp")])
    assert again.exit_code == 0, again.output
    assert read_json(tmp_path / "cmp" / "comparison.json", "comparison")["auc"]["difference"] == 0
    carried = CliRunner().invoke(main, ["score", str(store), "--all-pairs", "--metric", "cosine", "--threshold-from",
                                        str(folder), "--at-far", "0.25", "--out", str(tmp_path / "carried")])  # fmt: skip
    assert carried.exit_code == 2 and "its exact tail holds the 1 most similar of its 4" in carried.output  # tiny
    written = (folder / "metrics.json").stat().st_mtime_ns
    resumed = ft.finetune(preset(tiny_lfw, "best", resume=True, **kw))  # complete: the folder stays
    assert resumed == out and (folder / "metrics.json").stat().st_mtime_ns == written
    remove_validation_outputs(out)  # resumed complete, nothing cached: the images embedded as `embed` does
    ft.finetune(preset(tiny_lfw, "best", resume=True, **kw))
    with open_store(store) as s, open_store(tmp_path / "v.h5") as v:
        assert "frozen_outputs" not in s.attrs and np.allclose(v.embeddings[:], s.embeddings[:], atol=1e-5)
    other = tmp_path / "c.pt"
    foreign = validation_outputs(other)[1]
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="finetune writes its validation results folder there"):
        ft.finetune(preset(tiny_lfw, "best", **{**kw, "out": other}))
    assert not other.exists() and (foreign / "notes.txt").read_text() == "mine"
