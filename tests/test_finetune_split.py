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
from pipeline.faces import lfw
from pipeline.finetune.overlap import PHRASE, listed, overlap_warning, warn_training_overlap
from pipeline.finetune.split import training_faces, training_split
from pipeline.finetune.validation import random_people
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
    del config["split_seed"]
    torch.save({"model": {}, "config": config}, old)
    assert "its config lacks split_seed" in overlap_warning(str(old), faces, tiny_lfw, "deepfunneled")
    torch.save({"model": {}, "epoch": 1}, old)
    assert "(no finetune config)" in overlap_warning(str(old), faces, tiny_lfw, "deepfunneled")
    assert overlap_warning("imagenet", faces, tiny_lfw, "deepfunneled") is None


def test_real_view2_overlap_of_the_best_preset(shared_data, tmp_path):
    """View 2 holds 4,281 people, 2,985 of them in peopleDevTrain; `--recipe best` (seed 0) trains on 1,027 of them
    (its people with two or more images outside the held-out tenth) and validates on 34 more."""
    faces = listed(shared_data, "deepfunneled", "10fold", "test")
    dev_train = listed(shared_data, "deepfunneled", "people", "train")
    assert len(faces.people) == 4281 and len(faces.people & dev_train.people) == 2985
    message = overlap_warning(str(checkpoint(tmp_path / "b.pt", shared_data)), faces, shared_data, "deepfunneled")
    split = training_split(preset(shared_data, "best"))
    trained = faces.people & split.people("train")
    assert len(trained) == 1027
    assert f"View 2 (pairs.txt) {PHRASE}" in message and "1,027 of its 4,281 people trained the network" in message
    assert "34 more were its validation people" in message
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    assert "2,985 of its 4,281 people were among them" in overlap_warning(
        str(plain), faces, shared_data, "deepfunneled"
    )
