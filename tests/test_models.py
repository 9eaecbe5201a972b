"""Model registry: architectures, layers, weights sources and their errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline.errors import PipelineError
from pipeline.nets import layers, models


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_layers_have_registered_sizes(name):
    torch.manual_seed(0)
    model = models.build_model(name, "none").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = layers.Embedder(model, "output")(x)
        pen = layers.Embedder(model, "penultimate")(x)
    assert out.shape == (2, 1000)
    assert pen.shape == (2, models.BACKBONES[name].penultimate_dim)


def test_penultimate_feeds_the_last_layer():
    """For AlexNet the output is the last linear layer applied to the penultimate features."""
    torch.manual_seed(0)
    model = models.build_model("alexnet", "none").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = model(x)
        got = model.classifier[-1](layers.penultimate(model, x))
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


def test_registry_models_build_by_name():
    assert {"mobilenet_v3_small", "efficientnet_b0", *models.BACKBONES} <= set(models.registry_models())
    torch.manual_seed(0)
    small = models.build_model("mobilenet_v3_small", "none").eval()
    with torch.inference_mode():
        assert layers.Embedder(small, "output")(torch.randn(2, 3, 96, 96)).shape == (2, 1000)
    with pytest.raises(PipelineError, match="penultimate is known for .* not MobileNetV3"):
        layers.Embedder(small, "penultimate")
    resnet34 = models.build_model("resnet34", "none").eval()  # a known family: penultimate works
    e = layers.Embedder(resnet34, "penultimate")
    assert layers.embedding_size(e, (3, 64, 64), torch.device("cpu")) == 512


def test_model_names_are_checked():
    for name in ("mobilenet_v3_small", "alexnet", "pkg.sub:build_net"):
        models.check_model_name(name)
    for name, message in (("lenet", "unknown model"), ("vgg_16", "Did you mean vgg16"), ("a-b:c", "module:function")):
        with pytest.raises(ValueError, match=message):
            models.check_model_name(name)


def test_registry_imagenet_weights_are_read_safely(tmp_path, monkeypatch):
    """A registry model's ImageNet weights take the hash-checked path: offline, the error names the file; a
    cached file is read with weights_only and handed to torchvision's builder, whose own loader is restored."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PipelineError, match=r"mobilenet_v3_small-047dcff4.pth.*--weights PATH"):
        models.build_model("mobilenet_v3_small", "imagenet")
    torch.manual_seed(3)
    reference = models.build_model("mobilenet_v3_small", "none").state_dict()
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, cached)
    with pytest.raises(PipelineError, match="is not torchvision's"):
        models.build_model("mobilenet_v3_small", "imagenet")
    monkeypatch.setattr(models, "sha256", lambda path: "047dcff4" + "0" * 56)
    loaded = models.build_model("mobilenet_v3_small", "imagenet")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    weights_class = type(torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT)
    assert "get_state_dict" not in weights_class.__dict__


def test_registry_weights_file(tmp_path):
    torch.manual_seed(2)
    reference = models.build_model("shufflenet_v2_x0_5", "none")
    torch.save(reference.state_dict(), tmp_path / "s.pth")
    loaded = models.build_model("shufflenet_v2_x0_5", str(tmp_path / "s.pth"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(PipelineError, match="do not fit model mobilenet_v3_small"):
        models.build_model("mobilenet_v3_small", str(tmp_path / "s.pth"))
