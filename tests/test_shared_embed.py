"""`pipeline.embedding.shared`: the stores of one pass equal those `embed` writes one by one, and the first layers
that two networks share run once per image."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline.embedding.embed import EmbedConfig, embed
from pipeline.embedding.shared import build_networks, embed_together
from pipeline.nets import models
from pipeline.nets.split import split_model


def two_networks(tmp_path):
    """A random SqueezeNet and a copy whose last two Fire modules differ (as the best recipe leaves them)."""
    torch.manual_seed(1)
    a = models.build_model("squeezenet1_0", "none")
    b = models.build_model("squeezenet1_0", "none")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in split_model(b, "penultimate", 2)[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(a.state_dict(), tmp_path / "a.pth")
    torch.save(b.state_dict(), tmp_path / "b.pth")
    return str(tmp_path / "a.pth"), str(tmp_path / "b.pth")


def configs(root, out, weights, flip, resizes=None):
    resizes = resizes or [()] * len(weights)
    return [
        EmbedConfig(
            out=out / f"{w[-5]}-{p}.h5",
            data_root=root,
            protocol=p,
            model="squeezenet1_0",
            weights=w,
            layer="penultimate",
            tta_flip=f,
            tta_resizes=r,
            workers=0,
            device="cpu",
            batch_size=4,
        )
        for w, f, r in zip(weights, flip, resizes, strict=True)
        for p in ("pairs", "people")
    ]


@pytest.mark.parametrize("resizes", [None, [(), (240, 272)], [(272,), (240, 300)]])
def test_shared_pass_equals_embed_one_by_one(tiny_lfw, tmp_path, resizes):
    weights = two_networks(tmp_path)
    shared = configs(tiny_lfw, tmp_path / "shared", weights, (False, True), resizes)
    alone = configs(tiny_lfw, tmp_path / "alone", weights, (False, True), resizes)
    paths = embed_together(shared, blocks=2)
    for path, cfg in zip(paths, alone, strict=True):
        embed(cfg)
        with h5py.File(path, "r") as f, h5py.File(cfg.out, "r") as g:
            np.testing.assert_allclose(f["embeddings"][:], g["embeddings"][:], rtol=1e-4, atol=1e-5)
            assert f["paths"][:].tolist() == g["paths"][:].tolist()
            for key in ("labels", "pairs", "pair_labels"):
                if key in g:
                    assert np.array_equal(f[key][:], g[key][:])
            for key in ("weights_sha256", "layer", "protocol", "n_images", "transform"):
                assert f.attrs[key] == g.attrs[key]
            assert bool(f.attrs.get("tta_flip", False)) == cfg.tta_flip == bool(g.attrs.get("tta_flip", False))
    with h5py.File(paths[0], "r") as p, h5py.File(paths[2], "r") as q:  # the two networks differ
        assert not np.allclose(p["embeddings"][:], q["embeddings"][:])


def test_equal_first_layers_run_once(tmp_path):
    weights = two_networks(tmp_path)
    nets = build_networks(configs(tmp_path, tmp_path, weights, (False, False)), 2, torch.device("cpu"))
    assert len(nets) == 2 and nets[0].frozen is nets[1].frozen and nets[0].tail is not nets[1].tail
    # a cut below the changed modules: nothing is shared
    nets = build_networks(configs(tmp_path, tmp_path, weights, (False, False)), 1, torch.device("cpu"))
    assert nets[0].frozen is not nets[1].frozen


def test_mixed_models_are_refused(tiny_lfw, tmp_path):
    cfgs = configs(tiny_lfw, tmp_path, two_networks(tmp_path), (False, False))
    cfgs[1] = EmbedConfig(out=tmp_path / "r.h5", data_root=tiny_lfw, model="resnet18", weights="none")
    with pytest.raises(ValueError, match="share the model"):
        embed_together(cfgs)
