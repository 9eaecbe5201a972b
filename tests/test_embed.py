"""The embed stage end to end on a generated LFW (and a real slice): store layout, atomicity, resume,
bad images, NaN outputs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import TEST_PEOPLE

from cli import main
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.errors import PipelineError
from pipeline.faces import images, lfw
from pipeline.nets import models
from pipeline.store.layout import open_store, partial_path
from pipeline.store.writer import StoreWriter


def config(root: Path, out: Path, **kw) -> EmbedConfig:
    base = dict(data_root=root, model="squeezenet1_0", weights="none", workers=0, batch_size=4)
    return EmbedConfig(out=out, **{**base, **kw})


def reference_rows(model: torch.nn.Module, files: list[Path], resize: int = 256) -> np.ndarray:
    """An independent forward: PIL + torchvision's own transforms, one image at a time, no channels-last."""
    tf = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(resize),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    model.eval()
    with torch.no_grad():
        return np.stack([model(tf(images.load_image(f).convert("RGB"))[None])[0].numpy() for f in files])


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}


def test_people_store_layout_and_rows(tiny_lfw, tmp_path):
    out = embed(config(tiny_lfw, tmp_path / "s.h5", workers=2))
    with open_store(out) as store:
        assert store.n == sum(TEST_PEOPLE.values()) and store.dim == 1000
        assert store.strings("identities") == sorted(TEST_PEOPLE)
        assert store.labels.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
        paths = store.strings("paths")
        for key in (
            "model",
            "weights",
            "layer",
            "image_set",
            "split",
            "protocol",
            "transform",
            "dataset",
            "pairs_sha256",
            "torch_version",
            "created",
        ):
            assert key in store.attrs, key
        assert store.attrs["protocol"] == "people" and store.embeddings.chunks[1] == 1000
        assert store.attrs["dataset"] == "lfw" and store.attrs["pairs_sha256"] == ""
        assert json.loads(store.attrs["transform"]) == {
            "model": "squeezenet1_0",
            "resize": 256,
            "input_size": 224,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        }
        torch.manual_seed(0)  # the seed embed uses for --weights none
        model = models.build_model("squeezenet1_0", "none")
        expected = reference_rows(model, [tiny_lfw / p for p in paths])
        np.testing.assert_allclose(store.rows(0, store.n), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert not partial_path(out).exists()


def test_test_time_resizes_average_the_crops_of_each_size(tiny_lfw, tmp_path):
    result = CliRunner().invoke(
        main,
        ["embed", "--data-root", str(tiny_lfw), "--weights", "none", "--workers", "0", "--batch-size", "3"]
        + ["--tta-resizes", "240,300", "--out", str(tmp_path / "t.h5")],
    )
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "t.h5") as store:
        assert json.loads(store.attrs["transform"])["tta_resizes"] == [240, 300]
        torch.manual_seed(0)
        model = models.build_model("squeezenet1_0", "none")
        files = [tiny_lfw / p for p in store.strings("paths")]
        expected = np.mean([reference_rows(model, files, r) for r in (256, 240, 300)], axis=0)
        np.testing.assert_allclose(store.rows(0, store.n), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        assert not np.allclose(expected, reference_rows(model, files), rtol=1e-3)  # the scales change the rows
    bad = CliRunner().invoke(main, ["embed", "--tta-resizes", "big", "--out", str(tmp_path / "u.h5")])
    assert bad.exit_code == 2 and "expected sizes in pixels" in bad.output


def test_pairs_store_and_penultimate_float16(tiny_lfw, tmp_path):
    out = embed(config(tiny_lfw, tmp_path / "p.h5", protocol="pairs", layer="penultimate", dtype="float16"))
    with open_store(out) as store:
        pairs, labels, folds = store.pairs()
        assert store.dim == 512 and store.embeddings.dtype == np.float16 and store.rows(0, 2).dtype == np.float32
        assert pairs.shape == (12, 2) and labels.sum() == 6
        same = store.labels[pairs[:, 0]] == store.labels[pairs[:, 1]]
        assert (same == labels.astype(bool)).all()
        assert len(store.attrs["pairs_sha256"]) == 64


def test_existing_output_needs_overwrite(tiny_lfw, tmp_path):
    out = embed(config(tiny_lfw, tmp_path / "s.h5", limit=2))
    with pytest.raises(PipelineError, match="exists; pass --overwrite"):
        embed(config(tiny_lfw, out, limit=2))
    embed(config(tiny_lfw, out, limit=3, overwrite=True))
    assert read(out)["embeddings"].shape == (3, 1000)


def killed_after_rows(monkeypatch, rows: int, run) -> None:
    """`run()` (an embed) interrupted once its store has `rows` rows written, as a killed run would be."""
    original_write = StoreWriter.write

    def write_then_die(self, start, block):
        original_write(self, start, block)
        if self.rows_done >= rows:
            raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(StoreWriter, "write", original_write)


def test_interrupted_run_resumes_to_identical_store(tiny_lfw, tmp_path, monkeypatch):
    whole = read(embed(config(tiny_lfw, tmp_path / "whole.h5", batch_size=3)))
    out = tmp_path / "resumed.h5"
    killed_after_rows(monkeypatch, 6, lambda: embed(config(tiny_lfw, out, batch_size=3)))
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(PipelineError, match="other settings.*batch_size"):
        embed(config(tiny_lfw, out, batch_size=4, resume=True))
    resumed = read(embed(config(tiny_lfw, out, batch_size=3, resume=True)))
    assert resumed.keys() == whole.keys()
    for k in whole:
        np.testing.assert_array_equal(resumed[k], whole[k])


def test_unreadable_partial_starts_over_and_a_foreign_one_is_refused(tiny_lfw, tmp_path, caplog):
    """A partial HDF5 file left unreadable (a run killed while writing metadata) is started over by --resume, as
    a requeued job must go on; a file at OUT.partial that is not HDF5 is not ours and is refused."""
    whole = read(embed(config(tiny_lfw, tmp_path / "whole.h5")))
    out = tmp_path / "s.h5"
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\ntruncated")
    resumed = read(embed(config(tiny_lfw, out, resume=True)))
    assert "starting over" in caplog.text
    np.testing.assert_array_equal(resumed["embeddings"], whole["embeddings"])
    other = tmp_path / "t.h5"
    partial_path(other).write_bytes(b"someone else's file")
    with pytest.raises(PipelineError, match="not an HDF5 file"):
        embed(config(tiny_lfw, other, resume=True))
    assert partial_path(other).read_bytes() == b"someone else's file"


def test_corrupt_image_stops_or_is_skipped(tiny_lfw, tmp_path):
    proto = lfw.load_protocol(tiny_lfw, "deepfunneled", "pairs", "test")
    bad = proto.absolute(1)
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(PipelineError, match=f"{bad.name}.*--skip-bad"):
        embed(config(tiny_lfw, tmp_path / "a.h5", protocol="pairs"))
    out = embed(config(tiny_lfw, tmp_path / "b.h5", protocol="pairs", skip_bad=True))
    stored = read(out)
    assert len(stored["embeddings"]) == len(proto) - 1
    assert [s.decode() for s in stored["skipped_paths"]] == [proto.paths[1]]
    assert len(stored["pairs"]) == 12 - int((proto.pairs == 1).any(axis=1).sum())
    assert np.isfinite(stored["embeddings"]).all()


def test_nan_outputs_are_an_error(tiny_lfw, tmp_path):
    state = models.build_model("squeezenet1_0", "none").state_dict()
    state["classifier.1.bias"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(PipelineError, match="NaN or infinite.*Alice_Able_0001"):
        embed(config(tiny_lfw, tmp_path / "s.h5", weights=str(tmp_path / "nan.pth")))
    assert not (tmp_path / "s.h5").exists()


def test_config_checks():
    with pytest.raises(ValueError, match="protocol"):
        EmbedConfig(out=Path("x.h5"), protocol="lfw")
    with pytest.raises(ValueError, match="limit"):
        EmbedConfig(out=Path("x.h5"), limit=0)


def test_cli_embed_end_to_end_and_errors(tiny_lfw, tmp_path):
    runner = CliRunner()
    args = ["embed", "--data-root", str(tiny_lfw), "--weights", "none", "--workers", "0", "--protocol", "10fold"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "v2.h5")])
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "v2.h5") as store:
        assert store.attrs["split"] == "all" and len(store.pairs()[0]) == 20
    result = runner.invoke(main, ["embed", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, [*args, "--weights", str(tmp_path / "no.pth"), "--out", str(tmp_path / "y.h5")])
    assert result.exit_code == 2 and "no.pth does not exist" in result.output


def test_real_rows_equal_torchvision_forward(shared_data, shared_weights, tmp_path):
    out = embed(
        EmbedConfig(
            out=tmp_path / "real.h5",
            data_root=shared_data,
            protocol="people",
            split="test",
            weights=str(shared_weights),
            limit=12,
            batch_size=5,
            workers=1,
        )
    )
    model = torchvision.models.squeezenet1_0()
    model.load_state_dict(torch.load(shared_weights, map_location="cpu"))
    with open_store(out) as store:
        expected = reference_rows(model, [shared_data / p for p in store.strings("paths")])
        got = store.rows(0, store.n)
        assert store.n == 12
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        names = [Path(p).parent.name for p in store.strings("paths")]
        assert [store.strings("identities")[k] for k in store.labels] == names
