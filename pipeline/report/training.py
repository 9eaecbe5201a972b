"""The training curves `finetune` writes beside its checkpoint and `report` draws for a run (`training.png`): loss,
validation AUC and TAR at FAR 1e-3 per epoch, a PNG marked as this tool's (`pipeline.report.figures.save`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.report.figures import VAL_FAR, pyplot, save


def phase_boundary(history: Sequence[dict]) -> float | None:
    """The epoch at which phase 2 starts (the last phase-1 epoch), when the history has epochs of both."""
    p1 = [r["epoch"] for r in history if r.get("phase") == 1]
    p2 = [r["epoch"] for r in history if r.get("phase") == 2]
    if p2:
        return float(max(p1)) if p1 else float(min(p2) - 1)
    return None


def draw_training(history: Sequence[dict], target, title: str, best_epoch: int | None = None) -> None:
    """Training curves per epoch: the training loss (top), validation AUC and validation TAR at FAR 1e-3
    (bottom; epoch 0 is the network before training), the start of phase 2 and the kept epoch marked."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    # an ensemble's history (finetune --members): each member's records tagged with its number, then the ensemble's
    members = sorted({r["member"] for r in history if isinstance(r.get("member"), int)})
    series = [(f"member {k}", [r for r in history if r.get("member") == k]) for k in members] or [("", history)]
    joined = [r for r in history if r.get("member") == "ensemble"]
    styles = ("o-", "s--", "^:", "d-.")
    trained = [r for r in history if r.get("loss") is not None]
    for n, (name, records) in enumerate(series):
        done = [r for r in records if r.get("loss") is not None]
        style = styles[n % len(styles)]
        top.plot([r["epoch"] for r in done], [r["loss"] for r in done], style, color="tab:purple", ms=3, label=name)
    top.set_ylabel("training loss")
    validated = False
    for key, label, colour in (
        ("val_auc", "validation AUC", "tab:blue"),
        (f"val_tar_at_far_{VAL_FAR:g}", f"validation TAR at FAR {VAL_FAR:g}", "tab:green"),
    ):
        for n, (name, records) in enumerate(series):
            pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                style = styles[n % len(styles)]
                bottom.plot(*zip(*pts, strict=True), style, ms=3, color=colour, label=f"{label} {name}".strip())
                validated = True
        pts = [(r["epoch"], r[key]) for r in joined if r.get(key) is not None]
        if pts:
            bottom.plot(*zip(*pts, strict=True), "*", ms=12, color=colour, label=f"{label}, ensemble")
    if members:
        top.legend(fontsize=8, loc="best")
    bottom.set_ylabel("validation")
    bottom.set_xlabel("epoch (0: before training)")
    boundary = phase_boundary(history)
    last = max((r["epoch"] for r in history), default=1)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.3, max(last, 1) + 0.3)
        if boundary is not None:
            ax.axvline(boundary, color="grey", ls="--", lw=1, label="end of phase 1" if ax is bottom else None)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:orange", ls=":", lw=1.2, label="kept epoch" if ax is bottom else None)
    if not trained:
        top.text(0.5, 0.5, "no epoch trained yet", ha="center", va="center", transform=top.transAxes)
    if not validated:
        bottom.text(
            0.5, 0.5, "not validated (no validation images)", ha="center", va="center", transform=bottom.transAxes
        )
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8, loc="best")
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    save(fig, target, "training")


def training_figure_path(checkpoint: Path | str) -> Path:
    """The training figure `finetune` writes beside its checkpoint: NAME.pt -> NAME.training.png."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".training.png")


def training_title(config: dict) -> str:
    """The title of a training figure from a checkpoint's config dict."""
    title = f"{config.get('model', 'model')}, {config.get('recipe', '?')} recipe"
    if config.get("phase1_epochs") is not None:
        title += f", {config['phase1_epochs']} + {config.get('phase2_epochs', 0)} epochs"
    if (config.get("members") or 1) > 1:
        title += f", ensemble of {config['members']}"
    if config.get("image_set"):
        title += f" [{config['image_set']}]"
    return title
