"""Face sets beyond LFW's protocol files (folder trees with optional pair lists, insightface `.bin` files, read
without running code) and networks beyond the five backbones (torchvision's registry, the user's own), end to end
through `cli.py embed` and `cli.py score` on generated images."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.errors import PipelineError
from pipeline.faces import facesets, lfw
from pipeline.store.layout import open_store

ROOT = Path(__file__).resolve().parent.parent
PEOPLE = {"ann lee": 3, "Bo": 2, "Çelik": 1, "dee-2": 4}  # free names: spaces, non-ASCII, digits
USER_MODULE = """
import torch
from torch import nn


def build():
    torch.manual_seed(123)
    return nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 8))


def not_a_module():
    return 3


def broken():
    raise RuntimeError("no GPU here")
"""


def face(identity: int, k: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(100 * identity + k)
    base = np.full((size, size, 3), (identity * 53 % 255, identity * 97 % 255, identity * 31 % 255), np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """DIR/<identity>/<image>: JPEG and PNG files, numbered so that plain sorting would misorder them, plus files
    that are no images."""
    root = tmp_path / "faces"
    for ident, (name, n) in enumerate(PEOPLE.items()):
        (root / name).mkdir(parents=True)
        for k in range(1, n + 1):
            face(ident, k).save(root / name / f"shot {k * 5}.{'png' if k % 2 else 'jpg'}")
    (root / "Bo" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    face(9, 9).save(root / "loose.jpg")
    return root


def cli(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def embed_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["embed", "--data-root", root, "--weights", "none", "--workers", "0", "--batch-size", "4", "--out", out,
            "--input-size", "64", *extra]  # fmt: skip


def test_folder_layout_order_and_labels(tree):
    proto = facesets.load_faceset("folder", tree)
    assert proto.identities == sorted(PEOPLE) and proto.protocol == "folder" and proto.pairs is None
    assert proto.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3]  # sorted identities: Bo, ann lee, dee-2, Çelik
    assert proto.paths[5:9] == ["dee-2/shot 5.png", "dee-2/shot 10.jpg", "dee-2/shot 15.png", "dee-2/shot 20.jpg"]
    with pytest.raises(PipelineError, match="is not a folder"):
        facesets.load_faceset("folder", tree / "Bo" / "shot 5.png")
    (tree.parent / "empty").mkdir()
    with pytest.raises(PipelineError, match="no images under"):
        facesets.load_folder(tree.parent / "empty")


def test_folder_equals_the_lfw_people_store(tiny_lfw, tmp_path):
    """The people test split laid out under other names (p0001/img_1.jpg) gives the same rows and labels."""
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "people", "test")
    tree = tmp_path / "renamed"
    for i, path in enumerate(proto.paths):
        target = tree / f"p{proto.labels[i] + 1:04d}" / f"img_{int(Path(path).stem[-4:])}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(tiny_lfw / path)
    assert cli(*embed_args(tiny_lfw, tmp_path / "lfw.h5")).exit_code == 0
    result = cli(*embed_args(tree, tmp_path / "folder.h5", "--dataset", "folder"))
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "lfw.h5") as a, open_store(tmp_path / "folder.h5") as b:
        assert np.array_equal(a.rows(0, a.n), b.rows(0, b.n)) and np.array_equal(a.labels, b.labels)
        assert b.attrs["dataset"] == "folder" and b.attrs["protocol"] == "folder" and b.attrs["pairs_sha256"] == ""


def test_folder_embed_then_score_all_pairs(tree, tmp_path):
    store = tmp_path / "f.h5"
    result = cli(*embed_args(tree, store, "--dataset", "folder"))
    assert result.exit_code == 0, result.output
    with open_store(store) as s:
        assert s.n == 10 and s.strings("identities") == sorted(PEOPLE) and s.strings("paths")[0] == "Bo/shot 5.png"
        assert s.attrs["dataset"] == "folder" and s.attrs["data_root"] == str(tree.resolve())
    result = cli("score", store, "--all-pairs", "--out", tmp_path / "res", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 45 and metrics["n_positive"] == 3 + 1 + 6 and 0 <= metrics["auc"] <= 1


def write_pairs(tree: Path, rows: list[str], header: bool = True) -> Path:
    path = tree.parent / "pairs.csv"
    path.write_text("\n".join((["path_a,path_b,same,fold"] if header else []) + rows) + "\n")
    return path


def test_folder_pairs_file_then_score_pairs(tree, tmp_path):
    rows = []
    for fold in range(3):
        rows.append(f"dee-2/shot {5 * (fold + 1)}.{'png' if fold % 2 == 0 else 'jpg'},dee-2/shot 20.jpg,1,{fold}")
        rows.append(f"ann lee/shot 5.png,./Bo/shot {5 + 5 * (fold % 2)}.{'jpg' if fold % 2 else 'png'},0,{fold}")
    pairs_file = write_pairs(tree, rows)
    store = tmp_path / "p.h5"
    result = cli(*embed_args(tree, store, "--dataset", "folder", "--pairs-file", pairs_file))
    assert result.exit_code == 0, result.output
    proto = facesets.load_folder(tree, pairs_file)
    with h5py.File(store, "r") as f:
        assert f["pairs"].dtype == np.int64 and f["pair_labels"].dtype == np.int8 and f["pair_folds"].dtype == np.int8
        assert f["pairs"][...].tolist() == proto.pairs.tolist() and f["pair_labels"][...].tolist() == [1, 0] * 3
        assert f["pair_folds"][...].tolist() == [0, 0, 1, 1, 2, 2] and f.attrs["protocol"] == "pairs-file"
        assert f.attrs["pairs_sha256"] == facesets.pairs_sha256(proto) and len(f.attrs["pairs_sha256"]) == 64
    result = cli("score", store, "--pairs", "--out", tmp_path / "res", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 6 and len(metrics["accuracy_10fold"]) == 3


def test_pairs_file_errors(tree, tmp_path):
    cases = [
        (["Bo/shot 5.png,Bo/shot 99.jpg,1"], "shot 99.jpg, which is missing.*--skip-missing"),
        (["../faces/Bo/shot 5.png,Bo/shot 10.jpg,1"], "line 2: .* not a path inside the data root"),
        (["Bo/shot 5.png,Bo/notes.txt,1"], "notes.txt is not an image of an identity folder"),
        (["Bo/shot 5.png,Bo/shot 10.jpg,yes"], "line 2: `same` must be 1"),
        (["Bo/shot 5.png,Bo/shot 10.jpg,1,x"], "line 2: fold must be an integer"),
        (["Bo/shot 5.png,Bo/shot 10.jpg"], "line 2: expected path_a,path_b,same"),
    ]
    for rows, message in cases:
        with pytest.raises(PipelineError, match=message):
            facesets.load_folder(tree, write_pairs(tree, rows))
    kept = facesets.load_folder(tree, write_pairs(tree, ["Bo/shot 5.png,Bo/shot 99.jpg,1", "Bo/shot 5.png,Bo/shot 10.jpg,true"], header=False), skip_missing=True)  # fmt: skip
    assert kept.pairs.tolist() == [[0, 1]] and kept.skipped == ["Bo/shot 99.jpg"] and kept.pair_folds.tolist() == [0]
    result = cli(*embed_args(tree, tmp_path / "x.h5", "--pairs-file", tree.parent / "pairs.csv"))
    assert result.exit_code == 2 and "--pairs-file applies to --dataset folder" in result.output
    result = cli(*embed_args(tree, tmp_path / "x.h5", "--dataset", "folder", "--protocol", "pairs"))
    assert result.exit_code == 2 and "--protocol and --download apply to --dataset lfw" in result.output


def make_bin(path: Path, n_pairs: int = 20, protocol: int = 2, as_arrays: bool = False) -> list[bool]:
    """An insightface-style verification .bin of generated JPEGs: pair i = images 2i, 2i+1, alternately the same
    identity (two photos) and two identities."""
    bins, issame = [], []
    for i in range(n_pairs):
        same = i % 2 == 0
        a, b = face(i % 5, 1), face(i % 5 if same else (i + 1) % 5, 2)
        bins += [jpeg(a), jpeg(b)]
        issame.append(same)
    if as_arrays:
        bins, flags = [np.frombuffer(b, np.uint8) for b in bins], np.array(issame)
    else:
        flags = issame
    path.write_bytes(pickle.dumps((bins, flags), protocol=protocol))
    return issame


def test_bin_embed_then_score_pairs_with_ten_folds(tmp_path):
    issame = make_bin(tmp_path / "set.bin")
    store = tmp_path / "b.h5"
    result = cli(*embed_args(tmp_path / "set.bin", store, "--dataset", "bin"))
    assert result.exit_code == 0, result.output
    with open_store(store) as s:
        pairs, labels, folds = s.pairs()
        assert s.n == 40 and pairs.tolist() == [[2 * i, 2 * i + 1] for i in range(20)]
        assert labels.tolist() == [int(v) for v in issame] and folds.tolist() == [k for k in range(10) for _ in "ab"]
        assert s.labels.tolist() == list(range(40)) and s.strings("paths")[3] == "set.bin#3"
        assert s.attrs["dataset"] == "bin" and s.attrs["protocol"] == "bin" and len(s.attrs["pairs_sha256"]) == 64
    result = cli("score", store, "--pairs", "--out", tmp_path / "res", "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert metrics["n_pairs"] == 20 and len(metrics["accuracy_10fold"]) == 10
    assert 0 <= metrics["accuracy_10fold_mean"] <= 1
    result = cli("score", store, "--all-pairs", "--out", tmp_path / "all", "--no-progress")
    assert result.exit_code == 2 and "no same-person pair" in result.output  # each image is its own identity


def test_bin_variants_and_folds(tmp_path):
    """NumPy arrays (protocol 5 pickles too) are read; folds follow scikit-learn's KFold for uneven counts."""
    make_bin(tmp_path / "a.bin", n_pairs=13, protocol=5, as_arrays=True)
    proto = facesets.load_bin(tmp_path / "a.bin")
    assert len(proto) == 26 and proto.encoded[0][:2] == b"\xff\xd8" and np.bincount(proto.pair_folds).tolist() == [2] * 3 + [1] * 7  # fmt: skip
    assert facesets.bin_folds(6000).tolist() == np.repeat(np.arange(10), 600).tolist()
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"x"] * 3, [True])))
    with pytest.raises(PipelineError, match="3 images for 1 pairs"):
        facesets.load_bin(tmp_path / "odd.bin")
    (tmp_path / "dict.bin").write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(PipelineError, match="expected a pickled \\(bins, issame_list\\)"):
        facesets.load_bin(tmp_path / "dict.bin")


class Exploit:
    """What a malicious .bin holds: unpickling it would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_bin_runs_nothing_and_exits_2(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([jpeg(face(0, 1)), Exploit(marker)], [True])))
    result = cli(*embed_args(evil, tmp_path / "e.h5", "--dataset", "bin"))
    assert result.exit_code == 2 and "refusing" in result.output and "system" in result.output
    assert not marker.exists() and not (tmp_path / "e.h5").exists()
    pickle.loads(evil.read_bytes())  # the exploit is real: plain pickle runs it
    assert marker.exists()


def test_registry_model_writes_a_store(tree, tmp_path):
    store = tmp_path / "m.h5"
    args = embed_args(tree, store, "--dataset", "folder", "--model", "mobilenet_v3_small", "--limit", "3")
    result = cli(*[a for a in args if a not in ("--input-size", "64")])
    assert result.exit_code == 0, result.output
    with open_store(store) as s:
        assert s.n == 3 and s.dim == 1000 and np.isfinite(s.rows(0, 3)).all()
        assert json.loads(s.attrs["transform"])["model"] == "mobilenet_v3_small"
    result = cli(*embed_args(tree, tmp_path / "x.h5", "--dataset", "folder", "--model", "mobilenet_v3_small",
                             "--layer", "penultimate"))  # fmt: skip
    assert result.exit_code == 2 and "--layer penultimate is known for" in result.output


def test_user_module_rows_equal_its_own_forward(tree, tmp_path):
    """`--model mymodule:build` from PYTHONPATH, 112 x 112 crops in [-1, 1]: rows equal an independent forward."""
    (tmp_path / "mymodule.py").write_text(USER_MODULE)
    store = tmp_path / "u.h5"
    args = ["embed", "--dataset", "folder", "--data-root", tree, "--model", "mymodule:build", "--workers", "0",
            "--input-size", "112", "--mean", "0.5,0.5,0.5", "--std", "0.5", "--out", store]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the default weights of module:function: none
    done = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodule

        model = mymodule.build().eval()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodule", None)
    tf = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(128),
            torchvision.transforms.CenterCrop(112),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    with open_store(store) as s, torch.no_grad():
        paths = s.strings("paths")
        expected = np.stack([model(tf(Image.open(tree / p).convert("RGB"))[None])[0].numpy() for p in paths])
        np.testing.assert_allclose(s.rows(0, s.n), expected, rtol=1e-5, atol=1e-6)
        assert s.dim == 8 and s.attrs["weights"] == "none"
        assert json.loads(s.attrs["transform"]) == {
            "model": "mymodule:build",
            "resize": 128,
            "input_size": 112,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }


@pytest.mark.parametrize(
    "model, message",
    [
        ("lenet", "unknown model 'lenet'"),
        ("resnet_18", "Did you mean resnet18"),
        ("mymodule:", "is not module:function"),
        ("no_such_module_xyz:build", "no module 'no_such_module_xyz' on the Python path"),
        ("mymodule:missing", "has no function 'missing'"),
        ("mymodule:not_a_module", "returned a int, not a torch.nn.Module"),
        ("mymodule:broken", r"broken\(\) failed \(RuntimeError: no GPU here\)"),
    ],
)
def test_bad_model_values_exit_2(tree, tmp_path, monkeypatch, model, message):
    (tmp_path / "mymodule.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodule", raising=False)
    result = cli(*embed_args(tree, tmp_path / "x.h5", "--dataset", "folder", "--model", model))
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "x.h5").exists()


def test_user_module_needs_weights_none_or_a_file(tree, tmp_path):
    args = embed_args(tree, tmp_path / "x.h5", "--dataset", "folder", "--model", "mymodule:build")
    args[args.index("--weights") + 1] = "imagenet"
    result = cli(*args)
    assert result.exit_code == 2 and "has no ImageNet weights: pass --weights none" in result.output
    result = cli(*embed_args(tree, tmp_path / "x.h5", "--dataset", "folder", "--mean", "0.5,0.5"))
    assert result.exit_code == 2 and "expected three numbers" in result.output
