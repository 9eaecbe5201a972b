"""How options reach a stage: `--config FILE` (TOML or JSON) for `finetune`, `run` and `embed`, derived from
the configs' fields (the command line wins, an unknown field is one `error:` line); the recipe and loss
registries that the CLI and the configs read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline import finetune as ft
from pipeline.finetune.recipes import RECIPES


@pytest.fixture
def captured(monkeypatch):
    """The configs the stages are called with (the stages themselves do not run)."""
    got = {}

    def finetune(cfg):
        got["finetune"] = cfg
        return Path(cfg.out)

    def run(cfg):
        got["run"] = cfg
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "table.md").write_text("table\n")
        return {p: {"pretrained": 0.5, "finetuned": 0.6} for p in ("pairs", "people")}

    def embed(cfg):
        got["embed"] = cfg
        return Path(cfg.out)

    monkeypatch.setattr("pipeline.finetune.finetune", finetune)
    monkeypatch.setattr("pipeline.run.run", run)
    monkeypatch.setattr("pipeline.embedding.embed.embed", embed)
    return got


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_finetune_config_file_fills_fields_without_options_and_the_command_line_wins(tmp_path, captured):
    (tmp_path / "c.toml").write_text('recipe = "best"\nloss = "cosface"\nweight_decay = 1e-3\nlr = 0.5\nmargin = 1\n')
    res = invoke("finetune", "--out", tmp_path / "m.pt", "--lr", "0.1", "--config", tmp_path / "c.toml")
    assert res.exit_code == 0, res.output
    cfg = captured["finetune"]
    assert (cfg.recipe, cfg.loss, cfg.weight_decay, cfg.lr) == ("best", "cosface", 1e-3, 0.1)  # --lr wins
    assert cfg.margin == 1.0 and isinstance(cfg.margin, float)
    assert cfg.phase1_epochs is None  # unset: the recipe's preset (resolved by the stage)


def test_config_file_errors_are_one_line_and_exit_2(tmp_path, captured):
    cases = {
        "unknown.toml": ("learning_rate = 0.1\n", "learning_rate: no such field of FinetuneConfig"),
        "type.toml": ('lr = "fast"\n', "lr must be float"),
        "broken.toml": ("lr = \n", "--config"),
        "list.json": ("[1, 2]", "expected a table"),
        "loss.toml": ('loss = "cosface"\n', "the study recipe trains with loss study"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        res = invoke("finetune", "--out", tmp_path / "m.pt", "--config", tmp_path / name)
        assert res.exit_code == 2, (name, res.output)
        assert res.output.startswith("error: ") and res.output.count("\n") == 1 and message in res.output, res.output
    assert "finetune" not in captured


def test_run_config_file_routes_fields_to_the_run_and_its_fine_tuning(tmp_path, captured):
    (tmp_path / "c.json").write_text(json.dumps({"limit": 10, "tta_resizes": [240], "weight_decay": 0.01, "seed": 3}))
    res = invoke("run", "--out", tmp_path / "r", "--phase1-epochs", "2", "--config", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    cfg = captured["run"]
    assert (cfg.limit, cfg.tta_resizes, cfg.test_resizes()) == (10, (240,), (240,))
    assert cfg.finetune["weight_decay"] == 0.01 and cfg.finetune["seed"] == 3 and cfg.finetune["phase1_epochs"] == 2
    t = cfg.finetune_config()
    assert t.out == tmp_path / "r" / "finetune" / "model.pt" and t.resume and t.phase1_epochs == 2
    assert (t.lr, t.tta_flip) == (1e-4, False)  # the study recipe's preset for the rest
    (tmp_path / "bad.toml").write_text("resume = false\n")
    res = invoke("run", "--out", tmp_path / "r", "--config", tmp_path / "bad.toml")
    assert res.exit_code == 2 and "error: run sets the fine-tuning step's resume itself" in res.output


def test_embed_config_file_converts_lists_and_paths(tmp_path, captured):
    (tmp_path / "c.toml").write_text(f'mean = [0.5, 0.5, 0.5]\nstd = [1, 1, 1]\npairs_file = "{tmp_path}/p.csv"\n')
    args = ["embed", "--out", tmp_path / "s.h5", "--dataset", "folder", "--data-root", tmp_path]
    res = invoke(*args, "--config", tmp_path / "c.toml", "--std", "0.5,0.5,0.5")
    assert res.exit_code == 0, res.output
    cfg = captured["embed"]
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)  # --std wins
    assert cfg.pairs_file == tmp_path / "p.csv" and cfg.weights == "imagenet"


def test_help_lists_the_fields_without_options_and_the_recipes():
    res = invoke("finetune", "--help")
    assert res.exit_code == 0
    fields = res.output.split("Fields without an option")[1]
    assert "weight_decay" in fields and "margin" in fields and "\n  lr " not in fields
    assert "Recipes (--recipe)" in res.output and all(name in res.output for name in RECIPES)
    run_help = invoke("run", "--help").output
    assert "weight_decay" in run_help and "\n  resume " not in run_help and "\n  finetune " not in run_help


def test_a_recipe_is_one_registry_entry(tmp_path, captured, monkeypatch):
    """A registered recipe is a `--recipe` choice, resolves to its preset and builds its trainer."""
    best = RECIPES["best"]
    tiny = dataclasses.replace(best, name="tiny", summary="a test recipe", preset={**best.preset, "lr": 0.25})
    monkeypatch.setitem(RECIPES, "tiny", tiny)
    res = invoke("finetune", "--out", tmp_path / "m.pt", "--recipe", "tiny")
    assert res.exit_code == 0, res.output
    cfg = captured["finetune"].resolved()
    assert cfg.recipe == "tiny" and cfg.lr == 0.25 and cfg.loss == "pairs"
    assert "tiny" in invoke("finetune", "--help").output
    assert invoke("finetune", "--out", tmp_path / "m.pt", "--recipe", "nope").exit_code == 2


def test_losses_are_chosen_by_name():
    assert set(ft.LOSSES) == {"study", "pairs", "cosface"}
    assert all(loss in ft.LOSSES for r in RECIPES.values() for loss in r.losses)
    cfg = ft.FinetuneConfig(out=Path("m.pt"), recipe="best", loss="cosface").resolved()
    head = ft.LOSSES[cfg.loss].from_config(cfg, dim=8, n_classes=3)
    assert isinstance(head, ft.CosFaceLoss) and head.weight.shape == (3, 8) and not head.per_identity
    assert ft.LOSSES["pairs"].per_identity and head.scale == cfg.scale
    assert isinstance(ft.LOSSES["study"].from_config(ft.FinetuneConfig(out=Path("m.pt")).resolved()), ft.StudyLoss)
    with pytest.raises(ValueError, match="trains with loss pairs or cosface"):
        ft.FinetuneConfig(out=Path("m.pt"), recipe="best", loss="study")
    assert torch.is_tensor(head(torch.randn(4, 8), torch.tensor([0, 1, 2, 0])))
