"""Validation of cohort score normalisations on finished `finetune` checkpoints of the best recipe (one network
or an ensemble): the plain cosine, the cohort mean (`pipeline.embedding.cohort`: cos - o_i - o_j, o half the mean of the K
largest cosines with the training images) and AS-norm (adaptive s-norm: the mean of the two images' z-scores over
their K largest cohort cosines), for several K. The cohort is the checkpoint's training images, the validation
images are its held-out people's; the test splits are never looked at. With `--tta-resizes`, each normalisation
is also scored on the validation images embedded as `embed --tta-resizes` embeds them (the mean over the crops at
each resize; the cohort stays the centre crops that `finetune` keeps):

    python cli.py bench cohort-norm --data-root ../shared/data runs/cn-seed0/finetune/model.pt ...
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from cli_options import tta_resizes_option


def embedded_as_embed(checkpoint: Path, model: str, files: list[Path], resizes: tuple[int, ...]) -> torch.Tensor:
    """`files` embedded as `embed --weights CHECKPOINT --layer penultimate --tta-flip --tta-resizes` embeds them."""
    from torch.utils.data import DataLoader

    from pipeline.embedding.embed import for_inference, forward
    from pipeline.faces import images
    from pipeline.nets import layers, models

    pre = images.Preprocess(tta_resizes=resizes)
    net = for_inference(
        layers.Embedder(models.build_model(model, str(checkpoint)), "penultimate", True), torch.device("cpu")
    )
    loader = DataLoader(images.ImageFiles(files, pre.crop(), pre.crops_shape), batch_size=32, num_workers=2)
    return torch.cat([torch.as_tensor(forward(net, x, torch.device("cpu"), preprocess=pre)) for x, _, _ in loader])


def variants(emb: torch.Tensor, cohort: torch.Tensor, tops: list[int]) -> dict[tuple[str, int], np.ndarray]:
    """(name, K) -> the validation images' score matrix."""
    from torch.nn import functional as F

    e, c = F.normalize(emb, dim=1), F.normalize(cohort, dim=1)
    s, sims = e @ e.T, e @ c.T
    out = {("cosine", 0): s.numpy()}
    for k in tops:
        top = sims.topk(min(k, sims.shape[1]), dim=1).values
        mu, sd = top.mean(1), top.std(1)
        out["cohort mean", k] = (s - 0.5 * (mu[:, None] + mu[None, :])).numpy()
        z = (s - mu[:, None]) / sd[:, None]
        out["AS-norm", k] = (0.5 * (z + z.T)).numpy()
    return out


@click.command("cohort-norm")
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--top", "tops", type=int, multiple=True, default=(25, 50, 100, 200, 400, 1000), show_default=True,
              help="K: how many of an image's most similar cohort images the normalisation uses.")  # fmt: skip
@tta_resizes_option("Also score the validation images embedded with these test-time scales [none].", "none")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def command(
    data_root: Path, tops: tuple[int, ...], tta_resizes: tuple[int, ...], checkpoints: tuple[Path, ...]
) -> None:
    """Print validation AUC and TAR at FAR 1e-3 of each normalisation, per checkpoint and their mean."""
    from pipeline.errors import PipelineError
    from pipeline.finetune import RECIPES, FinetuneConfig
    from pipeline.finetune.config import RUNTIME_FIELDS
    from pipeline.finetune.joined import joined_embedding
    from pipeline.finetune.validation import matrix_metrics

    known = set(FinetuneConfig.__dataclass_fields__) - set(RUNTIME_FIELDS)
    results: dict[tuple[str, int], list[dict]] = {}
    for path in checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt["config"]
        if config["recipe"] != "best":
            raise PipelineError(f"{path}: a checkpoint of the best recipe is needed")
        values = {k: v for k, v in config.items() if k in known} | {"data_root": data_root, "members": 1}
        values["split_seed"] = config["seed"] if config.get("split_seed") is None else config["split_seed"]
        trainer = RECIPES["best"].trainer(
            FinetuneConfig(out=Path("unused.pt"), **values).resolved(), torch.device("cpu")
        )
        states = [ckpt["model"], *ckpt.get("members", [])]
        embeddings = {"": joined_embedding(trainer, states)}
        if tta_resizes:
            scales = "+".join(map(str, (256, *tta_resizes)))
            embeddings[f", scales {scales}"] = embedded_as_embed(path, config["model"], trainer.val_files, tta_resizes)
        cohort = joined_embedding(trainer, states, np.arange(trainer.n_train))
        for views, emb in embeddings.items():
            for (name, k), scores in variants(emb, cohort, list(tops)).items():
                m = matrix_metrics(scores, trainer.val_labels, "cosine")
                results.setdefault((name + views, k), []).append(m)
                click.echo(json.dumps({"checkpoint": str(path), "variant": name + views, "top": k, **m}))
    names = " / ".join(p.parent.parent.name or p.name for p in checkpoints)
    click.echo(f"\n| normalisation | K | validation AUC ({names}) | TAR@1e-3 | mean AUC | mean TAR@1e-3 |")
    click.echo("| --- | --- | --- | --- | --- | --- |")
    for (name, k), ms in results.items():
        aucs, tars = [m["auc"] for m in ms], [m["tar_at_far"] for m in ms]
        tar_text = [f"{t:.3f}" if t is not None else "not measurable" for t in tars]  # under 1,000 different pairs
        mean_tar = "not measurable" if None in tars else f"{np.mean(tars):.3f}"
        click.echo(
            f"| {name} | {k or '-'} | {' / '.join(f'{a:.4f}' for a in aucs)} | {' / '.join(tar_text)}"
            f" | {np.mean(aucs):.4f} | {mean_tar} |"
        )
