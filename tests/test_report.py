"""Results folders and `report`: files, atomic replacement, the figures (ROC, DET, score distributions, training
curves), the study's table and the self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.errors import PipelineError
from pipeline.metrics.roc import HistogramROC
from pipeline.report import figures, training
from pipeline.report.compare import compare, comparison_cells, read_scored
from pipeline.report.read import read_result
from pipeline.report.results import RESULT_FILES, recognise_results_folder
from pipeline.report.tables import report, study_table
from pipeline.scoring.stage import ScoreConfig, score
from tests.stores import random_store, write_store


def _result(tmp_path, name, signal, variant, protocol="people", metric="l2"):
    path, _, _ = random_store(tmp_path / f"{name}.h5", n=90, d=8, n_ids=30, seed=int(signal * 10), signal=signal)
    with __import__("h5py").File(path, "a") as f:
        f.attrs.update(model="alexnet", protocol=protocol, image_set="deepfunneled")
    out = tmp_path / name
    score(ScoreConfig(store=path, out=out, variant=variant, metric=metric, progress=False))
    return out


def test_results_folder_files(tmp_path):
    out = _result(tmp_path, "pre", 0.5, "pretrained")
    metrics, fpr, tpr = read_result(out)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    with open(out / "roc.csv") as f:
        assert next(csv.reader(f)) == ["fpr", "tpr", "threshold", "threshold_normalised"]
    acc = HistogramROC.load(out / "histogram.npz")
    assert acc.compute()["auc"] == pytest.approx(metrics["auc"], abs=1e-15)
    assert acc.n_positive == metrics["n_positive"]
    assert (out / "roc.png").stat().st_size > 10_000
    assert metrics["variant"] == "pretrained" and metrics["protocol"] == "people"


def test_report_table_and_figure(tmp_path):
    dirs = [
        _result(tmp_path, "pre", 0.3, "pretrained"),
        _result(tmp_path, "fine", 1.0, "finetuned"),
        _result(tmp_path, "pairs_pre", 0.3, "pretrained", protocol="pairs"),
    ]
    table = report(dirs, tmp_path / "rep", log_fpr=True)
    assert (tmp_path / "rep" / "roc.png").is_file() and (tmp_path / "rep" / "table.md").read_text() == table
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | LFWPeople pretrained | LFWPeople fine-tuned | LFWPeople improvement")
    assert "LFWPairs pretrained" in lines[0]
    pre = json.loads((dirs[0] / "metrics.json").read_text())["auc"]
    fine = json.loads((dirs[1] / "metrics.json").read_text())["auc"]
    row = lines[2].split("|")
    assert row[1].strip() == "alexnet (deepfunneled)"
    assert row[2].strip() == f"{pre:.4f}" and row[3].strip() == f"{fine:.4f}" and row[4].strip() == f"{fine - pre:+.4f}"
    assert row[7].strip() == "-"  # no fine-tuned LFWPairs result


def test_study_table_layout():
    t = study_table(
        [
            {"model": "vgg16", "protocol": "pairs", "variant": "pretrained", "auc": 0.7421},
            {"model": "vgg16", "protocol": "pairs", "variant": "finetuned", "auc": 0.8572},
        ]
    )
    assert t.splitlines()[2] == "| vgg16 | 0.7421 | 0.8572 | +0.1151 |"


def test_report_cli_and_errors(tmp_path):
    d = _result(tmp_path, "pre", 0.5, "pretrained", metric="cosine")
    r = CliRunner().invoke(main, ["report", str(d), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "| model |" in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "not a results folder" in r.output
    with pytest.raises(PipelineError):
        report([], tmp_path / "rep")


def test_listed_pairs_folder(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [1, 2]])
    path = write_store(tmp_path / "p.h5", x, np.arange(10) // 2, pairs, np.array([1, 1, 1, 1, 1, 0]), protocol="pairs")
    out = tmp_path / "res"
    score(ScoreConfig(store=path, all_pairs=False, out=out, progress=False))
    metrics, _, _ = read_result(out)
    assert metrics["mode"] == "pairs" and metrics["n_pairs"] == 6 and metrics["protocol"] == "pairs"


# ---------------------------------------------------------------------------------------------------- figures


def test_results_folder_has_det_and_score_figures(tmp_path):
    out = _result(tmp_path, "pre", 0.8, "pretrained")
    for name, kind in (("roc.png", "roc"), ("det.png", "det"), ("scores.png", "scores")):
        assert name in RESULT_FILES
        assert figures.recognise_figure(out / name, kind) is None, name
    assert figures.recognise_figure(out / "det.png", "scores") is not None  # the kind is checked
    (tmp_path / "user.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    assert figures.recognise_figure(tmp_path / "user.png") is not None


def test_a_results_folder_of_an_older_version_is_still_ours(tmp_path):
    out = _result(tmp_path, "pre", 0.5, "pretrained")
    for name in ("det.png", "scores.png"):
        (out / name).unlink()  # as written before these figures existed
    assert recognise_results_folder(out) is None
    r = CliRunner().invoke(main, ["score", str(tmp_path / "pre.h5"), "--all-pairs", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert {"det.png", "scores.png"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    assert "notes.txt" in recognise_results_folder(out)


def test_operating_thresholds_match_the_pairs(tmp_path):
    path, x, labels = random_store(tmp_path / "s.h5", n=150, d=6, n_ids=20, seed=3, signal=1.5)
    out = tmp_path / "res"
    metrics = score(ScoreConfig(store=path, out=out, progress=False))
    acc = HistogramROC.load(out / "histogram.npz")
    thr = figures.operating_thresholds(metrics, acc.compute()["roc"])
    i, j = np.triu_indices(len(x), 1)
    d = np.linalg.norm(x[i].astype(np.float64) - x[j], axis=1)
    same = labels[i] == labels[j]
    n_pos, n_neg = same.sum(), (~same).sum()
    tar = (d[same] <= thr["far"] * (1 + 1e-6)).sum() / n_pos
    far = (d[~same] <= thr["far"] * (1 - 1e-6)).sum() / n_neg
    assert abs(tar - metrics["tar_at_far"]["0.001"]) <= 1 / n_pos and far <= 1e-3
    frr, far_eer = (d[same] > thr["eer"]).mean(), (d[~same] <= thr["eer"]).mean()
    assert abs(frr - metrics["eer"]) < 0.02 and abs(far_eer - metrics["eer"]) < 0.02
    given = figures.operating_thresholds({"eer_threshold": 1.5, "threshold_at_far": {"0.001": 0.5}}, None)
    assert given == {"eer": 1.5, "far": 0.5}
    grid, pos, neg, _ = figures.score_densities(acc)
    width = grid[1] - grid[0]
    assert pos.sum() * width == pytest.approx(1) and neg.sum() * width == pytest.approx(1)


def test_training_figure_marks_the_phases(tmp_path):
    history = [
        {"epoch": 0, "phase": 0, "val_auc": 0.7, "val_tar_at_far_0.001": 0.01},
        {"epoch": 1, "phase": 1, "loss": 0.7, "val_auc": 0.72, "val_tar_at_far_0.001": 0.02},
        {"epoch": 2, "phase": 2, "loss": 0.6, "val_auc": 0.75, "val_tar_at_far_0.001": None},
    ]
    assert training.phase_boundary(history) == 1 and training.phase_boundary(history[:2]) is None
    training.draw_training(history, tmp_path / "t.png", "t", best_epoch=2)
    training.draw_training([], tmp_path / "empty.png", "nothing yet")
    assert figures.recognise_figure(tmp_path / "t.png", "training") is None
    assert figures.recognise_figure(tmp_path / "empty.png", "training") is None


# ---------------------------------------------------------------------------------------------------- HTML


class PageParser(HTMLParser):
    """Collects the tags, the attributes that reference something, and the text of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data", "action", "style")]

    def handle_data(self, data):
        self.text.append(data)


def _check_self_contained(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert not re.search(r"@import|url\(", page)
    assert {"script", "link", "iframe", "object", "embed"}.isdisjoint(parser.tags)
    for tag, attr, value in parser.refs:
        if attr == "src":
            assert tag == "img" and value.startswith("data:image/png;base64,"), value[:60]
            assert base64.b64decode(value.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert attr == "style" or value.startswith("#"), (tag, attr, value[:60])
    return parser


def test_html_report_is_self_contained(tmp_path):
    dirs = [
        _result(tmp_path, "pre", 0.3, "pretrained"),
        _result(tmp_path, "fine", 1.0, "finetuned"),
        _result(tmp_path, "pairs_pre", 0.3, "pretrained", protocol="pairs"),
    ]
    (dirs[2] / "scores.png").unlink()  # an older folder: the page draws it from histogram.npz
    m = json.loads((dirs[1] / "metrics.json").read_text())
    m.update(auc_ci95=[0.81234, 0.85678], tar_at_far_ci95={"0.001": [0.01, 0.02]}, rank1_ci95=[0.4, 0.5])
    (dirs[1] / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["report", *map(str, dirs), "--out", str(out), "--html"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "roc.png", "table.md"]
    page = (out / "report.html").read_text()
    parser = _check_self_contained(page)
    assert parser.tags.count("img") == 1 + 3 * len(dirs)  # all results' ROC, and each result's ROC, DET, scores
    text = " ".join(parser.text)
    assert "LFWPeople pretrained" in text and "LFWPairs improvement" in text  # the study's table
    assert f"{m['auc']:.4f}" in text and "[0.8123, 0.8568]" in text and "[0.0100, 0.0200]" in text
    assert "rank1 [0.4000, 0.5000]" in text  # other intervals are listed too
    assert "drawn by report" in text and str(tmp_path / "fine.h5") in text and "alexnet" in text
    assert "commit" in text and "TAR at FAR 0.001" in text and "EER" in text
    assert "not measurable" in text  # about 3,900 different-person pairs: TAR at FAR 1e-6..1e-4 (tests/test_measurable)
    assert "Comparisons" not in text and "Thresholds and calibration" not in text  # other pairs; neither option


def test_html_report_shows_comparisons_carried_threshold_and_calibration(tmp_path):
    src_store, _, _ = random_store(tmp_path / "src.h5", n=300, d=16, n_ids=60, seed=1)
    path, _, _ = random_store(tmp_path / "s.h5", n=250, d=16, n_ids=50, seed=2)
    src, l2, cos = tmp_path / "src", tmp_path / "l2", tmp_path / "cos"
    score(ScoreConfig(store=src_store, out=src, progress=False))
    m = score(ScoreConfig(store=path, out=l2, variant="pretrained", progress=False, threshold_from=src,
                          at_far=1e-3, calibrate_on=src))  # fmt: skip
    score(ScoreConfig(store=path, out=cos, variant="finetuned", metric="cosine", progress=False))
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["report", str(l2), str(cos), "--out", str(out), "--html"])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    text = " ".join(_check_self_contained(page).text)
    c = compare(read_scored(l2), read_scored(cos))  # what table.md and the page show
    rows = comparison_cells(c)
    assert [row[0] for row in rows][:2] == ["AUC", "EER"] and len(rows) == 2 + len(c["tar_at_far"])
    section = text[text.index("Comparisons") : text.index("ROC of all results")]
    for name, key in (("AUC", "auc"), ("EER", "eer"), ("TAR at FAR 0.001", None)):
        e = c[key] if key else c["tar_at_far"]["0.001"]
        row = next(row for row in rows if row[0] == name)
        assert row[3] == f"{e['difference']:+.4f}" and row[4] == f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"
        assert " ".join(row) in section, name  # one table row: metric, A, B, B - A, interval, p
    assert (
        "jackknife" in section
        and c["method"] in section
        and page.index("Operating points") < page.index("<h2>Comparisons")
    )
    carried, table_md = m["carried_threshold"], (out / "table.md").read_text()
    decisions = text[text.index("Thresholds and calibration") : text.index("Comparisons")]
    assert f"{carried['far']:.4g} (\u2264 {carried['far_upper95']:.4g})" in decisions
    assert f"{carried['threshold']:.6g}" in decisions and str(src.resolve()) in decisions
    assert ("does not hold" if not carried["claim_holds"] else "holds") in decisions
    assert f"{m['cllr']:.4f}" in decisions and f"{m['min_cllr']:.4f}" in decisions
    assert "reliability of the calibration" in text and page.count("<img") == 1 + 3 * 2 + 1
    assert f"{m['cllr']:.4f}" in table_md and f"{carried['far']:.4g}" in table_md
    assert "## Thresholds and calibration" in table_md and "## Paired comparisons" in table_md
    assert f"| AUC | {rows[0][1]} | {rows[0][2]} | {rows[0][3]} |" in table_md
    r = CliRunner().invoke(main, ["report", str(cos), "--out", str(tmp_path / "alone"), "--html"])
    assert r.exit_code == 0, r.output
    alone = (tmp_path / "alone" / "report.html").read_text()
    assert "Comparisons" not in alone and "Thresholds and calibration" not in alone and "Cllr" not in alone
    assert "Thresholds" not in (tmp_path / "alone" / "table.md").read_text()


def test_html_report_replaces_only_its_own_page(tmp_path):
    d = _result(tmp_path, "pre", 0.5, "pretrained")
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.html").write_text("<html>my page</html>")
    for extra in ([], ["--overwrite"]):
        r = CliRunner().invoke(main, ["report", str(d), "--out", str(out), "--html", *extra])
        assert r.exit_code == 2 and "report.html" in r.output, r.output
    assert (out / "report.html").read_text() == "<html>my page</html>" and not (out / "table.md").exists()
    (out / "report.html").unlink()
    assert CliRunner().invoke(main, ["report", str(d), "--out", str(out), "--html"]).exit_code == 0
    r = CliRunner().invoke(main, ["report", str(d), "--out", str(out), "--html"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert CliRunner().invoke(main, ["report", str(d), "--out", str(out), "--html", "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "roc.png", "table.md"]


def _fake_run_folder(tmp_path, with_figure: bool):
    """A run folder's layout (summary.json, results/...) around results folders made by score."""
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    for variant, signal in (("pretrained", 0.3), ("finetuned", 1.0)):
        folder = _result(tmp_path, f"{variant}-people", signal, variant)
        folder.rename(run / "results" / f"{variant}-people")
    history = [{"epoch": 0, "phase": 0, "val_auc": 0.7}, {"epoch": 1, "phase": 1, "loss": 0.6, "val_auc": 0.8}]
    summary = {"pairs": {}, "people": {}, "recipe": "study", "finetune": {"config": {"model": "m"}, "history": history}}
    (run / "summary.json").write_text(json.dumps(summary))
    if with_figure:
        training.draw_training(history, run / "training.png", "a run")
    return run


def test_report_of_a_run_folder_includes_its_training_figure(tmp_path):
    run = _fake_run_folder(tmp_path, with_figure=True)
    out = tmp_path / "rep"
    table = report([run], out, html=True)
    assert "alexnet (deepfunneled) |" in table and table.count("\n") == 3
    assert (out / "training.png").read_bytes() == (run / "training.png").read_bytes()
    parser = _check_self_contained((out / "report.html").read_text())
    assert "Training" in parser.text and parser.tags.count("img") == 1 + 1 + 3 * 2
    (out / "training.png").write_bytes((tmp_path / "run" / "results" / "pretrained-people" / "roc.png").read_bytes())
    with pytest.raises(PipelineError, match="training.png"):  # a figure, but not a training figure of ours
        report([run], out, overwrite=True)


def test_report_draws_the_history_of_an_older_run(tmp_path):
    run = _fake_run_folder(tmp_path, with_figure=False)
    report([run], tmp_path / "rep")
    assert figures.recognise_figure(tmp_path / "rep" / "training.png", "training") is None
    (tmp_path / "lone").mkdir()
    with pytest.raises(PipelineError, match="not a results folder"):
        report([tmp_path / "lone"], tmp_path / "rep2")


def _chromium() -> str:
    """The headless browser; .ci/run installs it and sets LFW_REQUIRE_BROWSER, so CI fails rather than skips."""
    path = shutil.which("chromium")
    if path is None and os.environ.get("LFW_REQUIRE_BROWSER"):
        pytest.fail("LFW_REQUIRE_BROWSER is set but there is no chromium binary (.ci/run installs it)")
    if path is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    return path


def _widest_metrics(folder, protocol: str) -> None:
    """Every interval the operating-point table can show, as real runs record them (the widest table)."""
    m = json.loads((folder / "metrics.json").read_text())
    m["tar_at_far_ci95"] = {f: [0.12345, 0.98765] for f in m["tar_at_far"]}
    m.update(auc_ci95=[0.81234, 0.85678], eer_ci95=[0.1, 0.2], rank1_ci95=[0.4, 0.5], protocol=protocol)
    m.update(best_balanced_accuracy_ci95=[0.9, 0.95], best_unbalanced_accuracy_ci95=[0.91, 0.96])
    m.update(
        accuracy_10fold_mean=0.9731, accuracy_10fold_mean_ci95=[0.97, 0.976], label="squeezenet1_0 fine-tuned (best)"
    )
    (folder / "metrics.json").write_text(json.dumps(m))


# A probe added to a copy of the page (the page itself has no scripts): once laid out, the page's widths.
WIDTH_PROBE = """<script>window.addEventListener("load", () => {
  const root = document.documentElement, tables = [...document.querySelectorAll("table")];
  document.body.dataset.scrollWidth = root.scrollWidth;
  document.body.dataset.clientWidth = root.clientWidth;
  document.body.dataset.tableRight = Math.max(...tables.map((t) => t.getBoundingClientRect().right));
});</script>"""


def test_html_report_renders_in_a_headless_browser(tmp_path):
    from PIL import Image

    chromium = _chromium()
    dirs = [_result(tmp_path, "pre", 0.3, "pretrained"), _result(tmp_path, "fine", 1.0, "finetuned")]
    deep = tmp_path / "a-results-folder-with-a-long-name" / "deeper"  # a long path in the result column
    deep.mkdir(parents=True)
    dirs.append(_result(deep, "fine-tuned-10fold", 1.0, "finetuned"))
    for folder, protocol in zip(dirs, ("people", "pairs", "10fold"), strict=True):
        _widest_metrics(folder, protocol)
    out = tmp_path / "rep"
    report(dirs, out, html=True)
    url = (out / "report.html").resolve().as_uri()
    base = [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") >= 2 + len(dirs) and dom.stdout.count("<img") == 1 + 3 * len(dirs)
    assert dom.stdout.count("not measurable") == 3 * len(dirs)  # TAR at FAR 1e-6..1e-4 of each, in the table too
    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [*base, "--window-size=1200,2400", f"--screenshot={shot}", url], capture_output=True, timeout=180
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    image = Image.open(shot).convert("L")
    lo, hi = image.getextrema()
    assert hi - lo > 100 and len(image.getcolors(1 << 16) or range(1 << 16)) > 50  # text and figures, not blank

    probed = tmp_path / "probed.html"
    probed.write_text((out / "report.html").read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    dom = subprocess.run(
        [*base, "--window-size=1280,1000", "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    widths = dict(re.findall(r'data-(scroll-width|client-width|table-right)="([\d.]+)"', body))
    assert len(widths) == 3, body
    scroll, client = float(widths["scroll-width"]), float(widths["client-width"])
    assert 1000 < client <= 1280 and scroll <= client, widths  # no horizontal scroll bar in a 1,280-pixel window
    assert float(widths["table-right"]) <= client, widths
