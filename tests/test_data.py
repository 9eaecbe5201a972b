"""LFW layouts and protocols on a generated LFW, and the real protocol files where present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_PEOPLE, TRAIN_PEOPLE, make_tiny_lfw
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.faces import images, lfw


def names_of(proto: lfw.FaceSet) -> list[str]:
    return [Path(p).parent.name for p in proto.paths]


def test_people_protocol_groups_images_by_person(tiny_lfw):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")
    assert len(proto) == sum(TEST_PEOPLE.values())
    assert proto.identities == sorted(TEST_PEOPLE)
    assert [proto.identities[k] for k in proto.labels] == names_of(proto)
    assert all((tiny_lfw / p).is_file() for p in proto.paths)
    assert proto.paths[0] == "lfw-py/lfw-deepfunneled/Alice_Able/Alice_Able_0001.jpg"
    train = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "train")
    assert sorted(set(names_of(train))) == sorted(TRAIN_PEOPLE)


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_protocol_indexes_deduplicated_images(tiny_lfw, split):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", split)
    assert len(set(proto.paths)) == len(proto.paths)
    assert proto.pairs.shape == (12, 2) and proto.pair_labels.sum() == 6
    names = np.array(names_of(proto))
    same = names[proto.pairs[:, 0]] == names[proto.pairs[:, 1]]
    assert (same == proto.pair_labels.astype(bool)).all()
    assert (proto.labels[proto.pairs[:, 0]] == proto.labels[proto.pairs[:, 1]]).tolist() == same.tolist()


def test_10fold_protocol_has_folds(tiny_lfw):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "10fold", "test")
    assert proto.pairs.shape == (20, 2)
    assert np.bincount(proto.pair_folds).tolist() == [2] * 10
    assert [proto.pair_labels[proto.pair_folds == f].sum() for f in range(10)] == [1] * 10


def test_plain_layout_and_other_image_sets(tmp_path):
    root = make_tiny_lfw(tmp_path / "plain", image_set_dir="lfw_funneled", torchvision_layout=False)
    proto = lfw.load_protocol(root, "funneled", "people", "test")
    assert proto.paths[0].startswith("lfw_funneled/")
    with pytest.raises(PipelineError, match="no 'lfw/' image folder"):
        lfw.load_protocol(root, "original", "people", "test")


def test_missing_root_and_missing_protocol_file(tmp_path, tiny_lfw):
    with pytest.raises(PipelineError, match="does not exist.*--data-root"):
        lfw.load_protocol(tmp_path / "nowhere", "deepfunneled", "people", "test")
    (tiny_lfw / "lfw-py" / "pairsDevTest.txt").unlink()
    with pytest.raises(PipelineError, match="pairsDevTest.txt is missing"):
        lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "test")


def test_archive_only_root_says_extract(tmp_path):
    (tmp_path / "lfw-py").mkdir()
    (tmp_path / "lfw-py" / "lfw-deepfunneled.tgz").write_bytes(b"x")
    with pytest.raises(PipelineError, match="extract them"):
        lfw.find_base(tmp_path, "deepfunneled")


def test_missing_image_is_named_or_skipped(tiny_lfw):
    folder = tiny_lfw / "lfw-py" / "lfw-deepfunneled"
    (folder / "Bob_Baker" / "Bob_Baker_0002.jpg").unlink()
    (folder / "Dan_Dorn" / "Dan_Dorn_0004.jpg").unlink()
    with pytest.raises(PipelineError, match=r"Bob_Baker_0002.jpg .* missing \(1 other"):
        lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test", skip_missing=True)
    assert len(proto) == sum(TEST_PEOPLE.values()) - 2 and len(proto.skipped) == 2
    pairs = lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "test", skip_missing=True)
    assert len(pairs.pairs) < 12 and pairs.pairs.max() < len(pairs)
    assert not any("Bob_Baker_0002" in pairs.paths[i] for i in pairs.pairs.ravel())


def test_checksum_mismatch_warns_with_file_name(tiny_lfw):
    with pytest.warns(UserWarning, match="peopleDevTest.txt differs from the official"):
        lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")


def test_malformed_protocol_file(tiny_lfw):
    (tiny_lfw / "lfw-py" / "pairsDevTest.txt").write_text("2\nA\t1\nB\t1\t2\n")
    with pytest.raises(PipelineError, match="expected 3 or 4 fields"):
        lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "test")


def test_limit_people_and_pairs(tiny_lfw):
    people = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test").limit(4)
    assert len(people) == 4 and people.labels.tolist() == [0, 0, 0, 1]
    pairs = lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "test").limit(3)
    assert len(pairs.pairs) == 3 and sorted(set(pairs.pairs.ravel().tolist())) == list(range(len(pairs)))


def test_image_files_reports_corrupt_image(tiny_lfw):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")
    bad = proto.absolute(1)
    bad.write_bytes(bad.read_bytes()[:100])
    files = images.ImageFiles([proto.absolute(i) for i in range(3)], images.imagenet_transform())
    x, i, err = files[1]
    assert err and str(bad) in err and x.shape == (3, 224, 224)
    assert files[0][2] == ""
    encoded = images.ImageFiles([bad.read_bytes()], images.imagenet_crop(), (3, 112, 112), names=["set.bin#7"])
    x, _, err = encoded[0]
    assert "cannot read image set.bin#7" in err and x.shape == (3, 112, 112) and x.dtype == torch.uint8


def test_preprocess_matches_torchvision_and_checks_values():
    pre = images.Preprocess(112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert pre.resize_to == 128 and images.Preprocess().resize_to == 256 and pre.shape == (3, 112, 112)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8))
    expected = pre.transform()(img)
    assert torch.equal(pre.normalize(pre.crop()(img)[None])[0], expected)
    assert expected.min() >= -1 and expected.max() <= 1
    assert json.loads(pre.describe("m")) == {
        "model": "m",
        "resize": 128,
        "input_size": 112,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    for bad in (dict(input_size=0), dict(resize=100), dict(std=(1.0, 0.0, 1.0)), dict(mean=(0.5,))):
        with pytest.raises(ValueError):
            images.Preprocess(**{"input_size": 112, **bad})


def test_test_time_resizes_stack_the_crops_of_each_size():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 97, 3), dtype=np.uint8))
    pre = images.Preprocess(64, tta_resizes=(80, 64))
    assert pre.crops_shape == (3, 3, 64, 64) and images.Preprocess(64).crops_shape == (3, 64, 64)
    crops = pre.crop()(img)
    assert crops.shape == (3, 3, 64, 64) and crops.dtype == torch.uint8
    for view, size in enumerate((73, 80, 64)):  # resize_to (64 * 256 / 224 = 73) first
        assert torch.equal(crops[view], images.Preprocess(64, size).crop()(img))
    assert json.loads(pre.describe("m"))["tta_resizes"] == [80, 64]
    assert "tta_resizes" not in json.loads(images.Preprocess(64).describe("m"))  # earlier stores stay valid
    for bad in ((63,), (73,), (80, 80)):  # below the input size; the resize itself; twice
        with pytest.raises(ValueError, match="resize"):
            images.Preprocess(64, tta_resizes=bad)
    # the mean over views: embed each crop alone, then average
    x = torch.randn(2, 3, 3, 8, 8)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5))
    alone = torch.stack([net(x[:, v]) for v in range(3)], 1).mean(1)
    torch.testing.assert_close(images.mean_over_views(net, x), alone)
    torch.testing.assert_close(images.mean_over_views(net, x[:, 0]), net(x[:, 0]))


def test_real_protocols(shared_data):
    people = lfw.load_protocol(shared_data, "deepfunneled", "people", "test")
    assert len(people) == 3708 and len(set(people.labels.tolist())) == 1711
    assert len(lfw.load_protocol(shared_data, "deepfunneled", "people", "train")) == 9525
    pairs = lfw.load_protocol(shared_data, "deepfunneled", "pairs", "test")
    assert len(pairs.pairs) == 1000 and pairs.pair_labels.sum() == 500
    assert len(lfw.load_protocol(shared_data, "deepfunneled", "pairs", "train").pairs) == 2200
    view2 = lfw.load_protocol(shared_data, "deepfunneled", "10fold", "test")
    assert np.bincount(view2.pair_folds).tolist() == [600] * 10
    base = lfw.find_base(shared_data, "deepfunneled")
    assert all(lfw.check_checksum(base / name) for name in lfw.CHECKSUMS)


def test_real_layout_without_archive_copy(shared_data, tmp_path):
    """The plain layout (image folder + .txt directly in the root) of real files, without any .tgz."""
    base = lfw.find_base(shared_data, "deepfunneled")
    (tmp_path / "lfw-deepfunneled").symlink_to(base / "lfw-deepfunneled")
    shutil.copy(base / "pairsDevTest.txt", tmp_path)
    proto = lfw.load_protocol(tmp_path, "deepfunneled", "pairs", "test")
    assert len(proto.pairs) == 1000
