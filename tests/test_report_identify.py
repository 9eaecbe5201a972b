"""`report` of results folders of `identify` (alone and beside verification results): the identification table in
table.md and on the page, the CMC and identification error tradeoff figures (the folder's own or drawn from its
metrics.json), the distractor curve, and the figure functions draw_cmc / draw_iet."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.errors import PipelineError
from pipeline.report import figures
from pipeline.report.markup import data_uri
from pipeline.report.tables import report, study_table
from tests.test_report import WIDTH_PROBE, _check_self_contained, _chromium, _result

IDENT_HEADER = (
    "| identification | trials | rank 1 | rank 5 | rank 10 | FNIR at FPIR 0.001 | FNIR at FPIR 0.01 "
    "| FNIR at FPIR 0.1 | DIR at FAR 0.01 | distractors |"
)


def _identification(tmp_path, name, label="resnet-id", rank1=0.8, distractors=1000, curve=True):
    """A results folder of `identify` as its spec describes it (metrics.json only: no cmc.png / iet.png)."""
    cmc = np.minimum(1.0, rank1 + 0.01 * np.arange(20)).round(6).tolist()  # rank 5: rank1 + 0.04, rank 10: + 0.09
    fpir = [0.0, *np.logspace(-4, 0, 17).tolist()]
    fnir = np.linspace(0.6, 0.0, len(fpir)).tolist()  # FNIR reaches 0: drawn on the bottom edge
    trials = [{"n_mated": 400, "n_nonmated": 600, "cmc": cmc, "fpir_thresholds": [0.5, 0.4, 0.3]} for _ in range(3)]
    metrics = {
        "mode": "identify",
        "label": label,
        "metric": "cosine",
        "template": "best",
        "max_rank": 20,
        "n_distractors": distractors,
        "store": str(tmp_path / "lfw.h5"),
        "seconds": 12.5,
        "cmc": cmc,
        "cmc_ci95": [rank1 - 0.02, rank1 + 0.02],
        "fnir_at_fpir": {"0.001": 0.4, "0.01": 0.3, "0.1": 0.2},
        "fnir_at_fpir_ci95": {"0.001": [0.35, 0.45], "0.01": [0.25, 0.35], "0.1": [0.15, 0.25]},
        "dir_at_far": {"0.01": 0.7},
        "dir_at_far_ci95": {"0.01": [0.65, 0.75]},
        "iet": {"fpir": fpir, "fnir": fnir},
        "trials": trials,
        "ci_method": "two-level percentile bootstrap",
    }
    if curve:
        metrics["distractor_curve"] = [
            {"distractors": 0, "rank1": rank1 + 0.05, "fnir_at_fpir_0.01": 0.25},
            {"distractors": distractors, "rank1": rank1, "fnir_at_fpir_0.01": 0.3},
        ]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


# ---------------------------------------------------------------------------------------------------- figures


def test_draw_cmc_and_iet_write_marked_pngs(tmp_path):
    ranks = np.arange(1, 11)
    cmc = [(ranks, np.linspace(0.9, 0.99, 10), "a"), (ranks, np.array([0.6, None, *[0.7] * 8], float), "b")]
    figures.draw_cmc(cmc, tmp_path / "cmc.png", "CMC")
    fpir = np.array([0.0, 1e-5, 1e-3, 0.01, 0.1, 1.0])
    fnir = np.array([0.9, 0.5, 0.3, 0.1, 0.0, np.nan])
    figures.draw_iet([(fpir, fnir, "a"), (fpir[:0], fnir[:0], "empty")], tmp_path / "iet.png", "IET")
    for kind in ("cmc", "iet"):
        assert figures.recognise_figure(tmp_path / f"{kind}.png", kind) is None
        assert (tmp_path / f"{kind}.png").stat().st_size > 10_000
    assert figures.recognise_figure(tmp_path / "cmc.png", "iet") is not None  # the kind is checked
    assert figures.recognise_figure(tmp_path / "iet.png", "roc") is not None
    buf = io.BytesIO()  # a binary file object, as the page draws them
    figures.draw_iet([(np.zeros(3), np.zeros(3), "nothing on a log axis")], buf, "IET")
    figures.draw_cmc([], io.BytesIO(), "no curve")
    (tmp_path / "mem.png").write_bytes(buf.getvalue())
    assert figures.recognise_figure(tmp_path / "mem.png", "iet") is None


# ---------------------------------------------------------------------------------------------------- report


def test_report_of_identification_results_only(tmp_path):
    a = _identification(tmp_path, "ident-a")
    b = _identification(tmp_path, "ident-b", label="vgg | id", rank1=0.6, distractors=0, curve=False)
    m = json.loads((b / "metrics.json").read_text())
    del m["cmc_ci95"], m["iet"]  # no interval, and no IET to draw
    m["cmc"] = m["cmc"][:3]  # --max-rank 3: no rank 5 and 10
    (b / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "rep"
    table = report([a, b], out, html=True)
    assert sorted(p.name for p in out.iterdir()) == ["cmc.png", "iet.png", "report.html", "table.md"]  # no ROC
    assert (out / "table.md").read_text() == table
    lines = table.splitlines()
    assert lines[0] == IDENT_HEADER and len(lines) == 4
    assert lines[2] == (
        "| resnet-id | 3 | 0.8000 [0.7800, 0.8200] | 0.8400 | 0.8900 | 0.4000 | 0.3000 | 0.2000 | 0.7000 | 1,000 |"
    )
    assert lines[3] == r"| vgg \| id | 3 | 0.6000 | - | - | 0.4000 | 0.3000 | 0.2000 | 0.7000 | 0 |"
    for name in ("cmc", "iet"):
        assert figures.recognise_figure(out / f"{name}.png", name) is None

    page = (out / "report.html").read_text()
    parser = _check_self_contained(page)
    text = " ".join(parser.text)
    # the figures of both results together, then a's CMC and IET and b's CMC, drawn now from metrics.json
    assert parser.tags.count("img") == 2 + 2 + 1
    assert page.count(data_uri((out / "cmc.png").read_bytes())) == 1
    assert "Face-identification report" in text and "2 identification results" in text
    assert "AUC" not in text and "ROC" not in text and "Operating points" not in text
    assert "FNIR at FPIR 0.001" in text and "DIR at FAR 0.01" in text and "rank 10" in text
    assert "[0.7800, 0.8200]" in text and "[0.3500, 0.4500]" in text and "[0.6500, 0.7500]" in text
    assert text.count("drawn by report") == 3 and "Distractor curve" in text and "FNIR at FPIR 0.01" in text
    assert "1,200 mated, 1,800 non-mated over 3 trials" in text and str(a) in text and "ci_method" in text
    assert all(figures.recognise_figure(_as_file(tmp_path, png), None) is None for png in _pngs(page))

    with pytest.raises(PipelineError, match="--overwrite"):
        report([a], out)
    report([a], out, html=True, overwrite=True)  # table.md, cmc.png, iet.png, report.html: all recognised as ours
    assert (out / "table.md").read_text().splitlines()[0] == IDENT_HEADER


def _as_file(tmp_path, png: bytes):
    path = tmp_path / "decoded.png"
    path.write_bytes(png)
    return path


def test_report_cli_of_verification_and_identification_results(tmp_path):
    verification = _result(tmp_path, "pre", 0.5, "pretrained")
    ident = _identification(tmp_path, "ident")
    m = json.loads((ident / "metrics.json").read_text())
    own = [(np.arange(1, 21), np.asarray(m["cmc"]), "its own")]
    figures.draw_cmc(own, ident / "cmc.png", "drawn by identify")  # the folder's own CMC: the page shows it
    (ident / "iet.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)  # not ours: the page draws one
    alone = tmp_path / "alone"
    assert CliRunner().invoke(main, ["report", str(verification), "--out", str(alone)]).exit_code == 0
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["report", str(ident), str(verification), "--out", str(out), "--html"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["cmc.png", "iet.png", "report.html", "roc.png", "table.md"]
    table = (out / "table.md").read_text()
    verified = json.loads((verification / "metrics.json").read_text())
    assert (alone / "table.md").read_text() == study_table([verified])  # verification alone: as before
    assert table == study_table([verified]) + "\n" + IDENT_HEADER + "\n" + "|" + " --- |" * 10 + "\n" + (
        "| resnet-id | 3 | 0.8000 [0.7800, 0.8200] | 0.8400 | 0.8900 | 0.4000 | 0.3000 | 0.2000 | 0.7000 | 1,000 |\n"
    )
    assert r.output == table

    page = (out / "report.html").read_text()
    parser = _check_self_contained(page)
    text = " ".join(parser.text)
    assert parser.tags.count("img") == 1 + 3 + 2 + 2  # ROC of all, the result's ROC, DET, scores; CMC and IET twice
    assert data_uri((ident / "cmc.png").read_bytes()) in page  # its own CMC, as it is
    assert text.count("drawn by report") == 1  # its IET
    assert "Face-verification and identification report" in text
    assert "1 verification and 1 identification results" in text
    assert "LFWPeople pretrained" in text and f"{verified['auc']:.4f}" in text and "TAR at FAR 0.001" in text
    assert "Identification results" in text and "rank 1 0.8000" in text and "Distractor curve" in text
    assert text.index("Operating points") < text.index("Identification") < text.index("Results")


def test_an_identification_folder_without_its_figures_data_is_refused(tmp_path):
    folder = _identification(tmp_path, "ident")
    m = json.loads((folder / "metrics.json").read_text())
    del m["cmc"]
    (folder / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(PipelineError, match="not a results folder of `identify`"):
        report([folder], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_identification_page_fits_a_browser_window(tmp_path):
    chromium = _chromium()
    deep = tmp_path / "an-identification-results-folder-with-a-long-name" / "deeper"
    deep.mkdir(parents=True)
    dirs = [_result(tmp_path, "pre", 0.5, "pretrained"), _identification(deep, "ident-with-distractors")]
    m = json.loads((dirs[1] / "metrics.json").read_text())
    m["fnir_at_fpir_ci95"] = {f: [0.12345, 0.98765] for f in m["fnir_at_fpir"]}
    (dirs[1] / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "rep"
    report(dirs, out, html=True)
    probed = tmp_path / "probed.html"
    probed.write_text((out / "report.html").read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    base = [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*base, "--window-size=1280,1000", "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == 1 + 3 + 2 + 2
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    widths = dict(re.findall(r'data-(scroll-width|client-width|table-right)="([\d.]+)"', body))
    assert len(widths) == 3, body
    client = float(widths["client-width"])
    assert float(widths["scroll-width"]) <= client and float(widths["table-right"]) <= client, widths
