"""ONNX networks in `embed` (`--model FILE.onnx`, onnxruntime) against the PyTorch network they were exported from:
rows, provenance, input size, errors, resume, torchrun; and `bench onnx-parity`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from benchmarks.onnx_parity import all_pair_scores, decision_flips, far_threshold
from cli import main
from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.errors import PipelineError
from pipeline.nets import models
from pipeline.nets.onnx_model import export_onnx, fixed_input_size, load_onnx
from pipeline.store.layout import open_store, partial_path
from tests.test_embed import killed_after_rows
from tests.torchrun import ROOT, torchrun

TOLERANCE = 1e-4  # largest absolute difference between a row of ONNX and one of PyTorch


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A random SqueezeNet's weights (`weights`), its export with a free batch size at 224 (`onnx`) and with a fixed
    batch of 2 at 64 x 64 (`fixed`); another random SqueezeNet's export (`other`)."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    network = models.build_model("squeezenet1_0", "none")
    torch.save(network.state_dict(), folder / "w.pth")
    return {
        "weights": folder / "w.pth",
        "onnx": export_onnx(network, folder / "net.onnx"),
        "fixed": export_onnx(network, folder / "net64.onnx", input_size=64, dynamic_batch=False),
        "other": export_onnx(models.build_model("squeezenet1_0", "none"), folder / "other.onnx"),
    }


def config(root: Path, out: Path, model: str, **kw) -> EmbedConfig:
    base = dict(data_root=root, model=model, weights="none", workers=0, batch_size=4)
    return EmbedConfig(out=out, **{**base, **kw})


def torch_and_onnx(root: Path, tmp_path: Path, exported: dict, **kw) -> tuple[Path, Path]:
    """The same face set embedded through the PyTorch network and through its ONNX export."""
    a = embed(config(root, tmp_path / "torch.h5", "squeezenet1_0", weights=str(exported["weights"]), **kw))
    b = embed(config(root, tmp_path / "onnx.h5", str(exported["onnx"]), **kw))
    return a, b


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "options",
    [dict(protocol="people"), dict(protocol="pairs", tta_flip=True, tta_resizes=(240,), batch_size=3)],
    ids=["people", "pairs-tta"],
)
def test_onnx_rows_equal_pytorch_rows_and_store_records_the_file(tiny_lfw, tmp_path, exported, options):
    a, b = torch_and_onnx(tiny_lfw, tmp_path, exported, **options)
    ours, theirs = read(a), read(b)
    assert ours.keys() == theirs.keys() and ours["embeddings"].shape == (10, 1000)
    assert np.abs(ours["embeddings"] - theirs["embeddings"]).max() <= TOLERANCE
    for key in ours.keys() - {"embeddings"}:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    with open_store(b) as store:
        assert store.attrs["weights_sha256"] == models.sha256(exported["onnx"])
        assert store.attrs["weights"] == str(exported["onnx"].resolve()) and store.attrs["layer"] == "output"
        assert store.attrs["model"] == str(exported["onnx"])
        assert bool(store.attrs.get("tta_flip")) == ("tta_flip" in options)


def test_cli_end_to_end_reads_the_input_size_of_a_fixed_size_model(tiny_lfw, tmp_path, exported):
    """A graph fixed at 64 x 64 and batch 2: embed crops 64 (resize 73) without being told, runs batches of 3 as
    2 + 2 (one padded), and gives PyTorch's rows at that size; another --input-size is refused."""
    args = ["embed", "--data-root", str(tiny_lfw), "--workers", "0", "--batch-size", "3", "--protocol", "pairs"]
    result = CliRunner().invoke(main, [*args, "--model", str(exported["fixed"]), "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 0, result.output
    torch_args = ["--model", "squeezenet1_0", "--weights", str(exported["weights"]), "--input-size", "64"]
    result = CliRunner().invoke(main, [*args, *torch_args, "--out", str(tmp_path / "t.h5")])
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "o.h5") as onnx_store, open_store(tmp_path / "t.h5") as torch_store:
        assert onnx_store.attrs["transform"] == torch_store.attrs["transform"].replace(
            '"squeezenet1_0"', f'"{exported["fixed"]}"'
        )
        assert '"input_size": 64' in onnx_store.attrs["transform"] and '"resize": 73' in onnx_store.attrs["transform"]
        assert np.abs(onnx_store.rows(0, onnx_store.n) - torch_store.rows(0, torch_store.n)).max() <= TOLERANCE
    out = str(tmp_path / "x.h5")
    result = CliRunner().invoke(main, [*args, "--model", str(exported["fixed"]), "--input-size", "224", "--out", out])
    assert result.exit_code == 2 and "takes 64 x 64 images, not 224 x 224: pass --input-size 64" in result.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript-based exporter, called directly
def test_free_input_size_and_a_feature_map_output(tmp_path):
    """A graph with free height and width takes --input-size (default 224); an output [B, C, 1, 1] is flattened."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(1)).eval()
    path = tmp_path / "free.onnx"
    axes = {"input": {0: "b", 2: "h", 3: "w"}, "out": {0: "b"}}
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes=axes, dynamo=False)  # fmt: skip
    assert fixed_input_size(path) is None
    assert models.embed_network_options(str(path), None, None, None)["input_size"] == 224
    x = torch.randn(5, 3, 48, 48)
    got = load_onnx(path, torch.device("cpu"))(x)
    assert got.shape == (5, 8) and torch.allclose(got, net(x).flatten(1), atol=1e-5)


def test_weights_and_layer_do_not_apply_to_an_onnx_model(tiny_lfw, tmp_path, exported):
    base = ["embed", "--data-root", str(tiny_lfw), "--model", str(exported["onnx"]), "--out", str(tmp_path / "o.h5")]
    for extra, message in (
        (["--weights", "none"], "--weights does not apply to an ONNX model"),
        (["--weights", str(exported["weights"])], "--weights does not apply"),
        (["--layer", "output"], "--layer does not apply"),
        (["--layer", "penultimate", "--weights", "imagenet"], "--weights and --layer do not apply"),
    ):
        result = CliRunner().invoke(main, [*base, *extra])
        lines = error_lines(result.output)
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    with pytest.raises(ValueError, match="ONNX network: it holds its weights"):
        EmbedConfig(out=tmp_path / "o.h5", model=str(exported["onnx"]))  # weights default to imagenet
    with pytest.raises(ValueError, match="layer must be output"):
        EmbedConfig(out=tmp_path / "o.h5", model=str(exported["onnx"]), weights="none", layer="penultimate")
    with pytest.raises(PipelineError, match="ONNX network is run by `embed` only"):
        models.build_model(str(exported["onnx"]), "none")  # finetune and run need the PyTorch network
    assert not models.is_factory("C:/nets/face.onnx")


def test_files_that_are_not_onnx_models_are_one_error_line(tiny_lfw, tmp_path, exported):
    good = exported["onnx"].read_bytes()
    files = {
        "truncated.onnx": good[: len(good) // 3],
        "random.onnx": np.random.default_rng(0).bytes(4096),
        "zip.onnx": exported["weights"].read_bytes(),  # torch.save writes a zip archive
        "empty.onnx": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    for name in [*files, "missing.onnx"]:
        args = ["embed", "--data-root", str(tiny_lfw), "--model", str(tmp_path / name), "--out", str(tmp_path / "o.h5")]
        result = CliRunner().invoke(main, args)
        lines = error_lines(result.output)
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, result.output)
        assert name in lines[0] and "Traceback" not in result.output
        assert not (tmp_path / "o.h5").exists()
    # the process itself (onnxruntime's own logging included) writes that one line and nothing else
    args = [sys.executable, "cli.py", "embed", "--data-root", str(tiny_lfw), "--model", str(tmp_path / "random.onnx")]
    run = subprocess.run(
        [*args, "--out", str(tmp_path / "o.h5")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and run.stdout == "" and len(error_lines(run.stderr)) == 1, run.stderr
    assert "is not an ONNX model onnxruntime can run" in run.stderr


def test_interrupted_onnx_run_resumes_to_the_same_store(tiny_lfw, tmp_path, exported, monkeypatch):
    """--resume continues an ONNX run; a file of the same name that now holds another network is refused (its
    sha256 is part of the store's identity)."""
    model = tmp_path / "net.onnx"
    model.write_bytes(exported["onnx"].read_bytes())
    whole = read(embed(config(tiny_lfw, tmp_path / "whole.h5", str(model), batch_size=3)))
    out = tmp_path / "resumed.h5"
    killed_after_rows(monkeypatch, 6, lambda: embed(config(tiny_lfw, out, str(model), batch_size=3)))
    assert not out.exists() and partial_path(out).exists()
    model.write_bytes(exported["other"].read_bytes())
    with pytest.raises(PipelineError, match="other settings.*weights_sha256"):
        embed(config(tiny_lfw, out, str(model), batch_size=3, resume=True))
    model.write_bytes(exported["onnx"].read_bytes())
    resumed = read(embed(config(tiny_lfw, out, str(model), batch_size=3, resume=True)))
    for k in whole:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)


def test_two_ranks_give_the_single_process_store(tiny_lfw, tmp_path, exported):
    """Under torchrun each rank runs its own onnxruntime session on its shard; with --deterministic (one thread
    per session) the assembled store equals one process's."""
    single = embed(config(tiny_lfw, tmp_path / "one.h5", str(exported["onnx"]), batch_size=3, deterministic=True))
    args = ["embed", "--data-root", str(tiny_lfw), "--model", str(exported["onnx"]), "--workers", "0"]
    result = torchrun(2, *args, "--batch-size", "3", "--deterministic", "--out", str(tmp_path / "two.h5"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read(single), read(tmp_path / "two.h5")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_far_threshold_and_flips_against_brute_force():
    rng = np.random.default_rng(3)
    rows, labels = rng.standard_normal((149, 24)).astype(np.float32), rng.integers(0, 30, 149)
    scores, same = all_pair_scores(rows, labels)
    i, j = np.triu_indices(149, 1)
    np.testing.assert_allclose(scores, -np.linalg.norm(rows[i] - rows[j], axis=1), rtol=1e-5)
    assert (same == (labels[i] == labels[j])).all()
    negative = scores[~same]
    t = far_threshold(negative, 0.01)
    assert (negative > t).sum() == int(0.01 * len(negative))  # continuous scores: no ties
    moved = rows + rng.normal(0, 0.05, rows.shape).astype(np.float32)
    moved_scores, _ = all_pair_scores(moved, labels)
    expected = (scores > t) != (moved_scores > far_threshold(moved_scores[~same], 0.01))
    assert decision_flips(rows, moved, labels, 0.01) == (int(expected.sum()), len(scores))
    assert decision_flips(rows, rows, labels, 0.01) == (0, len(scores))


def test_bench_onnx_parity_on_a_tiny_lfw(tiny_lfw, tmp_path):
    args = ["bench", "onnx-parity", "squeezenet1_0", "--weights", "none", "--data-root", str(tiny_lfw)]
    result = CliRunner().invoke(main, [*args, "--workers", "0", "--batch-size", "4", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.output.splitlines() if "LFW" in line}
    people, pairs = rows["LFWPeople test"], rows["LFWPairs test"]
    assert float(people[3]) <= TOLERANCE and float(pairs[3]) <= TOLERANCE
    assert people[5] == people[6] and pairs[5] == pairs[6] and people[8].strip() == "0 of 45 pairs"
    assert (tmp_path / "p" / "model.onnx").is_file() and (tmp_path / "p" / "people-onnx.h5").is_file()
    result = CliRunner().invoke(main, [*args[:2], "nonet", "--data-root", str(tiny_lfw)])
    assert result.exit_code == 2 and "unknown model" in result.output


def test_real_squeezenet_export_gives_pytorch_rows(shared_data, shared_weights, tmp_path):
    """SqueezeNet with the shared ImageNet weights, exported: the first 200 LFWPeople test images."""
    network = models.build_model("squeezenet1_0", str(shared_weights))
    onnx_file = export_onnx(network, tmp_path / "squeezenet.onnx")
    common = dict(data_root=shared_data, protocol="people", split="test", limit=200, batch_size=32, workers=1)
    a = embed(EmbedConfig(out=tmp_path / "torch.h5", weights=str(shared_weights), **common))
    b = embed(EmbedConfig(out=tmp_path / "onnx.h5", model=str(onnx_file), weights="none", **common))
    with open_store(a) as torch_store, open_store(b) as onnx_store:
        assert onnx_store.n == torch_store.n == 200
        assert np.abs(onnx_store.rows(0, 200) - torch_store.rows(0, 200)).max() <= TOLERANCE
        assert onnx_store.attrs["weights_sha256"] == models.sha256(onnx_file)
