"""What `score` and `merge` print: the AUC line, what the pairs cannot measure, calibration and the carried
threshold (the CLI's words; the figures come from metrics.json)."""

from __future__ import annotations

from pathlib import Path

import click


def auc_line(m: dict, rest: str) -> str:
    """`AUC ... (binning bound ...)` and `rest` (what was scored, where it went)."""
    return f"AUC {m['auc']:.6f} (binning bound {m['auc_error_bound']:.1e}) {rest}"


def echo_scored(m: dict, out: Path) -> None:
    """The lines `score` prints for a results folder written to `out`."""
    click.echo(auc_line(m, f"over {m['n_pairs']} pairs ({m['n_positive']} same), EER {m['eer']:.4f}, "
                           f"{m['seconds']:.3f} s -> {out}"))  # fmt: skip
    echo_not_measurable(m)
    if "calibration" in m:
        c = m["calibration"]
        click.echo(f"Cllr {c['cllr']:.4f}, minCllr {c['min_cllr']:.4f} (llr = {c['slope']:.4g} s {c['offset']:+.4g} "
                   f"fitted on {c['source']}: Cllr {c['source_cllr']:.4f} there)")  # fmt: skip
    if "carried_threshold" in m:
        echo_carried(m["carried_threshold"])


def echo_carried(c: dict) -> None:
    """The carried threshold (`--threshold-from`) and what it gives here."""

    def rate(name: str) -> str:
        r, b = c[name], c.get(f"{name}_bounds")
        value = f"{r:.4g}" if r is not None else f"in [{b[0]:.6g}, {b[1]:.6g}] (bins)"
        return f"{name.upper()} {value} (95% upper bound {c[f'{name}_upper95']:.4g})"

    click.echo(f"Threshold {c['threshold']:.6g} ({c['score']}) from FAR {c['target_far']:g} on {c['source']} "
               f"(FAR {c['source_far']:.4g} there): {rate('far')}, {rate('frr')} here; FAR <= {c['target_far']:g} "
               f"{'holds' if c['claim_holds'] else 'does not hold'}")  # fmt: skip


def echo_not_measurable(m: dict) -> None:
    """The levels of TAR at FAR that the different-person pairs cannot show (null in metrics.json), and why."""
    if m.get("not_measurable"):
        click.echo(m["not_measurable"])
