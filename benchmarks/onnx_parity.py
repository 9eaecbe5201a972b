"""Parity of a PyTorch network and its ONNX export: the network is exported (`pipeline.nets.onnx_model.export_onnx`),
the same images are embedded through both (`embed --model NAME` and `embed --model FILE.onnx`), and a table
shows the largest difference between their rows, the AUC of each store (the project's `score`: all pairs for
LFWPeople, the listed pairs for LFWPairs) and how many LFWPeople pairs change their decision at FAR 1e-3.

    python -m benchmarks.onnx_parity squeezenet1_0 --weights ../shared/weights/squeezenet1_0-imagenet-dc.pth \\
        --data-root ../shared/data           (same as: cli.py bench onnx-parity ...; --limit N for quick runs)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from cli_options import data_root_option, image_set_option
from pipeline.embedding.embed import EmbedConfig, default_data_root, embed
from pipeline.nets import layers, models
from pipeline.nets.onnx_model import export_onnx
from pipeline.runtime import seed_everything
from pipeline.scoring.stage import score_store
from pipeline.store.layout import open_store

SETS = {"people": "LFWPeople test", "pairs": "LFWPairs test"}


@dataclass(frozen=True)
class ParityConfig:
    """Options of `cli.py bench onnx-parity`."""

    model: str
    """The PyTorch network: a torchvision name or module:function (with `weights`)."""
    data_root: Path = field(default_factory=default_data_root)
    """LFW data root."""
    weights: str | None = None
    """imagenet | none | PATH (a state_dict or a finetune checkpoint); None: embed's default for the model."""
    layer: str = "output"
    """The embedding layer: the export holds the network seen through it (`layers.Embedder`)."""
    image_set: str = "deepfunneled"
    """original | funneled | deepfunneled."""
    protocols: tuple[str, ...] = ("people", "pairs")
    """The test splits to embed: people (LFWPeople, all pairs) and pairs (LFWPairs, the listed pairs)."""
    limit: int | None = None
    """Only the first N images (people) or pairs (pairs)."""
    input_size: int = 224
    """Side of the centre crop; the export fixes it in its graph."""
    batch_size: int = 32
    """Images per forward pass (both stores)."""
    workers: int = 2
    """Image-decoding worker processes."""
    far: float = 1e-3
    """The false accept rate of the decisions compared."""
    out: Path | None = None
    """Folder that keeps the ONNX file and the stores (default: a temporary folder, removed)."""
    seed: int = 0
    """Seed (the random initialisation of weights none)."""

    def __post_init__(self):
        models.check_model_name(self.model)
        if not set(self.protocols) <= set(SETS) or not self.protocols:
            raise ValueError(f"protocols must be among {sorted(SETS)}, got {self.protocols}")
        if not 0 < self.far < 1:
            raise ValueError(f"far must be between 0 and 1, got {self.far}")

    @property
    def resolved_weights(self) -> str:
        return models.embed_network_options(self.model, self.weights, self.layer, self.input_size)["weights"]


def export_network(cfg: ParityConfig, path: Path) -> Path:
    """The PyTorch network of `cfg` (built as `embed` builds it, after the same seeding) exported to `path`."""
    seed_everything(cfg.seed)
    network = models.build_model(cfg.model, cfg.resolved_weights)
    return export_onnx(layers.Embedder(network, cfg.layer), path, cfg.input_size)


def store_config(cfg: ParityConfig, model: str, protocol: str, out: Path) -> EmbedConfig:
    """`embed` of one test split through the PyTorch network (`model` = cfg.model) or the ONNX file."""
    onnx = model != cfg.model
    return EmbedConfig(
        out=out,
        data_root=cfg.data_root,
        image_set=cfg.image_set,
        protocol=protocol,
        split="test",
        model=model,
        weights="none" if onnx else cfg.resolved_weights,
        layer="output" if onnx else cfg.layer,
        input_size=cfg.input_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device="cpu",
        limit=cfg.limit,
        overwrite=True,
        seed=cfg.seed,
    )


def all_pair_scores(rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j: (score = minus the Euclidean distance, float32; same person, bool). The squared
    distances come from float64 products."""
    x = rows.astype(np.float64)
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    i, j = np.triu_indices(len(x), 1)
    scores = -np.sqrt(np.maximum(d2[i, j], 0.0)).astype(np.float32)
    return scores, labels[i] == labels[j]


def far_threshold(negative: np.ndarray, far: float) -> float:
    """The threshold t of the rule `accept when score > t` that accepts k = floor(far x n) of the n
    different-person scores (fewer where scores tie at t): the (k+1)-th largest of them."""
    k = int(np.floor(far * len(negative)))
    return float(np.partition(negative, len(negative) - 1 - k)[len(negative) - 1 - k])


def decision_flips(a: np.ndarray, b: np.ndarray, labels: np.ndarray, far: float) -> tuple[int, int]:
    """(pairs whose decision at `far` differs between the rows `a` and `b`, all pairs); each side's threshold
    comes from its own different-person scores."""
    decisions = []
    for rows in (a, b):
        scores, same = all_pair_scores(rows, labels)
        decisions.append(scores > far_threshold(scores[~same], far))
    return int((decisions[0] != decisions[1]).sum()), len(decisions[0])


def compare(cfg: ParityConfig, protocol: str, torch_store: Path, onnx_store: Path) -> dict:
    """One table row: the two stores' largest row difference, their AUCs and (people) the flipped decisions."""
    with open_store(torch_store) as a, open_store(onnx_store) as b:
        rows_a, rows_b, labels = a.rows(0, a.n), b.rows(0, b.n), a.labels
    all_pairs = protocol == "people"
    auc_a = score_store(torch_store, None, all_pairs=all_pairs, progress=False)["auc"]
    auc_b = score_store(onnx_store, None, all_pairs=all_pairs, progress=False)["auc"]
    flips = decision_flips(rows_a, rows_b, labels, cfg.far) if all_pairs else None
    return dict(
        set=SETS[protocol],
        images=len(rows_a),
        difference=float(np.abs(rows_a - rows_b).max()),
        largest=float(np.abs(rows_a).max()),
        auc_torch=auc_a,
        auc_onnx=auc_b,
        flips=flips,
    )


def run_parity(cfg: ParityConfig) -> list[dict]:
    """Export, embed every split through both networks, compare."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(cfg.out) if cfg.out is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        onnx_file = export_network(cfg, folder / "model.onnx")
        rows = []
        for protocol in cfg.protocols:
            stores = []
            for kind, model in (("torch", cfg.model), ("onnx", str(onnx_file))):
                stores.append(embed(store_config(cfg, model, protocol, folder / f"{protocol}-{kind}.h5")))
            rows.append(compare(cfg, protocol, *stores))
        return rows


def format_table(rows: list[dict], far: float) -> str:
    lines = [
        f"| set | images | largest row difference | largest row value | AUC PyTorch | AUC ONNX | AUC difference | "
        f"decisions flipped at FAR {far:g} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        flips = "-" if r["flips"] is None else f"{r['flips'][0]:,} of {r['flips'][1]:,} pairs"
        lines.append(
            f"| {r['set']} | {r['images']:,} | {r['difference']:.2e} | {r['largest']:.2f} | {r['auc_torch']:.6f} | "
            f"{r['auc_onnx']:.6f} | {abs(r['auc_torch'] - r['auc_onnx']):.1e} | {flips} |"
        )
    return "\n".join(lines)


@click.command("onnx-parity")
@click.argument("model")
@data_root_option
@image_set_option
@click.option("--weights", default=None, help="imagenet | none | PATH [imagenet; module:function: none].")
@click.option("--layer", type=click.Choice(layers.LAYERS), default="output", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images (people) or pairs (pairs).")
@click.option("--protocols", default="people,pairs", show_default=True, help="Comma-separated test splits.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Side of the centre crop.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True, help="Image-decoding worker processes.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Keep the ONNX file and stores here.")
def command(protocols: str, **options) -> None:
    """Export a PyTorch network to ONNX, embed LFW through both, compare rows, AUCs and decisions."""
    cfg = ParityConfig(protocols=tuple(protocols.split(",")), **options)
    click.echo(format_table(run_parity(cfg), cfg.far))


if __name__ == "__main__":
    command()
