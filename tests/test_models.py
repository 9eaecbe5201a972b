"""Model registry: architectures, layers, weights sources and their errors."""

from __future__ import annotations

import pytest
import torch

from pipeline import models
from pipeline.errors import PipelineError


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_layers_have_registered_sizes(name):
    torch.manual_seed(0)
    model = models.build_model(name, "none").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = models.Embedder(model, "output")(x)
        pen = models.Embedder(model, "penultimate")(x)
    assert out.shape == (2, 1000)
    assert pen.shape == (2, models.BACKBONES[name].penultimate_dim)


def test_penultimate_feeds_the_last_layer():
    """For AlexNet the output is the last linear layer applied to the penultimate features."""
    torch.manual_seed(0)
    model = models.build_model("alexnet", "none").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = model(x)
        got = model.classifier[-1](models.penultimate(model, x))
    torch.testing.assert_close(got, expected)


def test_state_dict_and_checkpoint_files(tmp_path):
    torch.manual_seed(1)
    reference = models.build_model("squeezenet1_0", "none")
    torch.save(reference.state_dict(), tmp_path / "plain.pth")
    torch.save(
        {"model": reference.state_dict(), "config": {"model": "squeezenet1_0"}, "epoch": 3}, tmp_path / "ckpt.pt"
    )
    for path in ("plain.pth", "ckpt.pt"):
        loaded = models.build_model("squeezenet1_0", str(tmp_path / path))
        for k, v in reference.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(PipelineError, match="trained for model squeezenet1_0, not resnet18"):
        models.build_model("resnet18", str(tmp_path / "ckpt.pt"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(models.build_model("resnet18", "none").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(PipelineError, match="do not fit model squeezenet1_0.*another architecture"):
        models.build_model("squeezenet1_0", str(tmp_path / "r18.pth"))


def test_bad_weights_files(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        models.build_model("squeezenet1_0", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(PipelineError, match="cannot read weights file"):
        models.build_model("squeezenet1_0", str(tmp_path / "junk.pth"))
    with pytest.raises(PipelineError, match="unknown model"):
        models.build_model("lenet", "none")


def test_imagenet_offline_names_cache_file_and_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PipelineError, match=r"squeezenet1_0-b66bff10.pth.*--weights PATH"):
        models.build_model("squeezenet1_0", "imagenet")


def test_shared_squeezenet_loads_strictly(shared_weights):
    model = models.build_model("squeezenet1_0", str(shared_weights))
    assert models.weights_provenance(str(shared_weights))["weights_sha256"].startswith("014d29c0")
    assert model.classifier[1].out_channels == 1000
