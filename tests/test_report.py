"""Tests of somad.evaluation.report: the static HTML page of ``somad evaluate`` (no backbone needed)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path, PurePath
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import markupsafe
import numpy as np
import pytest
from PIL import Image

from somad.evaluation.report import (
    FRAME,
    PRO_LIMIT,
    SHOWN_REFERENCES,
    THUMB_SIZE,
    Thumbnails,
    page_view,
    pro_plot,
    render_page,
    roc_plot,
    row_view,
    scores_plot,
    write_report,
    write_thumbnails,
)
from somad.io.outputs import explanation_image, output_relpath, peak_pixel, save_png
from somad.verdicts import regions

# Distinctive metric values, so that their presence in the page can be checked.
OVERALL = {
    "image_auroc": 0.9123,
    "pixel_auroc": 0.9456,
    "au_pro": 0.8012,
    "image_f1_max": {"f1": 0.8877, "threshold": 1.5},
    "pixel_f1_max": 0.5566,
    "balanced_accuracy": 0.7333,
    "best_balanced_accuracy": 0.9167,
    "pixel_f1": 0.4411,
    "region_overlap": 0.3921,
    "good_fp_rate": 0.0012,
    "n_images": 6,
}
CRACK = {
    "image_auroc": 0.8641,
    "pixel_auroc": 0.9302,
    "au_pro": 0.7719,
    "image_f1_max": 0.8421,
    "pixel_f1_max": 0.5012,
    "balanced_accuracy": 0.7001,
    "pixel_f1": 0.4102,
    "n_images": 4,
}
ODD = {"image_auroc": 0.9555, "pixel_auroc": None, "n_images": 3}  # some metrics missing or None

WEIRD_TYPE = "cut & 'tear'"
WEIRD_NAME = f'test/{WEIRD_TYPE}/<01> "x".png'


# ------------------------------------------------------------------------------------------ fixtures
def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


#: The normal reference of every region of :func:`_fake_run` with ``explained``, and its training image (teal).
REFERENCE = ("train/good/031.png", 30, 33, 4.25)
TEAL = (0, 160, 160)


def _explain(out: Path, rec: dict, training: Image.Image) -> list[dict]:
    """Each region of a flagged record's predicted mask beside ``training``, as ``somad evaluate`` explains it
    (``somad.io.outputs.explanation_image``, the file where ``write_predictions`` puts it), and the record's
    ``explanations`` entries."""
    rel = output_relpath(rec["name"], "")
    mask = np.asarray(Image.open(out / "masks" / output_relpath(rec["name"], ".png"))) > 0
    full = np.where(mask, 2.0 + np.linspace(0, 1, mask.shape[1])[None, :], 0.0)  # peaks at each region's right edge
    entries = []
    for i, region in enumerate(regions(mask, full), 1):
        peak = peak_pixel(mask, full, region)
        image = explanation_image(
            SimpleNamespace(image=Image.open(rec["path"])), mask, region, peak, REFERENCE, training, rec["name"]
        )
        path = PurePath("explanations", rel.with_name(f"{rel.name}_region{i}.png"))
        save_png(image, out / path)
        entries.append(
            {"region": i, "path": path.as_posix(), "peak": region.peak, "reference": list(REFERENCE), "readable": True}
        )
    return entries


def _fake_run(tmp_path: Path, *, threshold: bool = True, explained: bool = False):
    """A tiny evaluation: source images, GT masks, and the heatmaps/masks that write_predictions makes; with
    ``explained``, each flagged image's explanations (:func:`_explain`) as ``evaluate_model(explain=True)`` gives."""
    rng = np.random.default_rng(0)
    src, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    specs = [  # name, label, defect type, score
        ("test/good/000.png", 0, "good", 0.40),
        ("test/good/001.jpg", 0, "good", 2.10),  # a JPEG source: outputs are .png
        ("test/crack/000.png", 1, "crack", 3.50),
        ("test/crack/001.png", 1, "crack", 0.90),
        ("test/crack/002.png", 1, "crack", 1.70),
        (WEIRD_NAME, 1, WEIRD_TYPE, 2.80),
    ]
    records = []
    for name, label, dtype, score in specs:
        h, w = (300, 400) if "crack/000" in name else (64, 64)  # one non-square image larger than a thumbnail
        image = rng.integers(60, 190, (h, w, 3), dtype=np.uint8)  # no pixel near the outline's magenta
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        mask_path = ""
        if label == 1:
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4 : h // 2, w // 4 : w // 4 + 1] = 255  # a one-pixel-wide defect must survive the thumbnail
            mask_path = str(_png(src / "ground_truth" / output_relpath(name, ".png"), mask))
        rel = output_relpath(name, ".png")
        _png(out / "heatmaps" / rel, rng.integers(60, 190, (h, w, 3), dtype=np.uint8))
        if threshold:  # a flagged image's predicted mask: one block
            predicted = np.zeros((h, w), np.uint8)
            if score > 1.5:
                predicted[h // 8 : h // 2, w // 8 : w // 2] = 255
            _png(out / "masks" / rel, predicted)
        records.append(
            {
                "name": name,
                "path": str(path),
                "mask_path": mask_path,
                "label": label,
                "defect_type": dtype,
                "score": score,
                "is_anomalous": (score > 1.5) if threshold else None,
            }
        )
    fpr = np.linspace(0, 1, 11)
    result = {
        "overall": dict(OVERALL),
        "per_defect_type": {"crack": dict(CRACK), WEIRD_TYPE: dict(ODD)},
        "records": records,
        "curves": {
            "image_roc": {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()},
            "pixel_roc": {"fpr": fpr.tolist(), "tpr": (fpr**0.3).tolist()},
            "pro": {"fpr": fpr.tolist(), "pro": np.minimum(1, 2 * fpr).tolist()},
        },
        "threshold": {
            "image": 1.5 if threshold else None,
            "pixel": 1.5 if threshold else None,
            "quantile": 0.99,
            "n_val_images": 12 if threshold else 0,
        },
        "eval_resolution": "original",
        "n_images": {"total": 6, "good": 2, "defective": 4, "skipped": 1},
        "skipped": ["/data/test/crack/broken <&>.png: cannot decode (truncated); remove it"],
        "timing": {"predict_seconds": 1.2, "predict_ms_per_image": 200.0},
    }
    if explained:
        training = Image.fromarray(np.full((120, 160, 3), TEAL, np.uint8))
        for rec in records:
            rec["explanations"] = _explain(out, rec, training) if rec["is_anomalous"] else []
        result["explanations"] = {"method_keeps": True, "no_references": False, "unreadable": None}
    model = SimpleNamespace(
        method="somad",
        backbone="efficientnet_lite0",
        get_params=lambda: {"som_size": 8, "k": 4, "threshold_quantile": 0.99},
        display_range_=(0.5, 2.5) if threshold else None,
    )
    return out, result, model


class _PageParser(HTMLParser):
    """Collects links, grid rows and text; checks that every element is closed in order."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links, self.rows, self.text, self.stack, self.errors = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])
        if "row" in (a.get("class") or "").split() and "data-name" in a:
            self.rows.append((a["data-name"], float(a["data-score"])))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


# ------------------------------------------------------------------------------------------ tests
def test_report_structure_links_and_order(tmp_path):
    out, result, model = _fake_run(tmp_path)
    path = write_report(out, result, model=model)
    assert path == out / "report.html" and path.is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.errors == [] and parsed.stack == []

    # every record appears, once, in the grid, highest score first
    names = [r["name"] for r in result["records"]]
    assert sorted(n for n, _ in parsed.rows) == sorted(names)
    scores = [s for _, s in parsed.rows]
    assert scores == sorted(scores, reverse=True)
    assert parsed.rows[0][0] == "test/crack/000.png"
    text = " ".join(parsed.text)
    for name in names:
        assert name in text

    # names are escaped, never raw markup (quotes included: they could end an attribute)
    assert "<01>" not in page and '"x"' not in page and str(markupsafe.escape(WEIRD_NAME)) in page

    # every link is relative and resolves to a file inside the output folder
    assert parsed.links
    for link in parsed.links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        target = (out / unquote(parts.path)).resolve()
        assert target.is_file(), link
        assert out.resolve() in target.parents
    srcs = {unquote(x) for x in parsed.links}
    for name in names:
        rel = output_relpath(name, ".png").as_posix()
        assert f"report_files/originals/{rel}" in srcs
        assert f"report_files/heatmaps/{rel}" in srcs and f"heatmaps/{rel}" in srcs
        assert f"report_files/outlines/{rel}" in srcs and f"masks/{rel}" in srcs

    # metric values, thresholds, settings, skipped files
    for metrics in (OVERALL, CRACK):
        for key, value in metrics.items():
            if key != "n_images":
                v = value["f1"] if isinstance(value, dict) else value
                assert f"{v:.4f}" in text, key
    assert "0.9555" in text and "–" in text  # the partial row: present values shown, missing ones as a dash
    assert "AU-PRO@0.3" in text and "0.99-quantile" in text and "held out" in text
    assert "efficientnet_lite0" in text and "som_size" in text
    assert "broken <&>.png" in text and "broken <&>" not in page
    assert text.count("✗ incorrect") == 2 and "false positive" in text and "false negative" in text
    assert page.count("<svg") == 4 and "FPR limit 0.3" in text
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_thumbnails(tmp_path):
    out, result, model = _fake_run(tmp_path)
    write_report(out, result, model=model)
    files = out / "report_files"
    big = Image.open(files / "originals/test/crack/000.png")
    assert max(big.size) == THUMB_SIZE and big.size == (256, 192)
    gt = np.asarray(Image.open(files / "ground_truth/test/crack/000.png"))
    assert gt.shape == (192, 256) and set(np.unique(gt)) == {0, 255}  # white on black, thin defect kept
    assert (gt == 255).sum() > 0
    small = Image.open(files / "originals/test/good/000.png")
    assert small.size == (64, 64)  # never enlarged
    assert not (files / "ground_truth/test/good/000.png").exists()  # good image: placeholder, no file
    assert (files / "originals" / output_relpath("test/good/001.jpg", ".png")).is_file()


def test_no_threshold_no_curves(tmp_path):
    out, result, model = _fake_run(tmp_path, threshold=False)
    result["curves"] = {}
    result["overall"] = {"n_images": 6}
    result["per_defect_type"] = {}
    result["skipped"] = []
    del result["timing"]
    page = write_report(out, result, model=model).read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.errors == [] and len(parsed.rows) == 6
    text = " ".join(parsed.text)
    assert "no decision threshold" in text and "no decision" in text
    assert "anomalous" not in [t.strip() for t in parsed.text]
    assert not any("masks/" in link for link in parsed.links)
    for link in parsed.links:
        assert (out / unquote(link)).is_file()
    assert "needs good and defective images" in text and "No file was skipped" in text


def test_unreadable_source_gets_placeholder(tmp_path):
    out, result, model = _fake_run(tmp_path)
    Path(result["records"][0]["path"]).write_bytes(b"not an image")
    result["records"][2]["mask_path"] = str(tmp_path / "missing_mask.png")
    page = write_report(out, result, model=model).read_text(encoding="utf-8")
    parsed = _parse(page)
    for link in parsed.links:
        assert (out / unquote(link)).is_file()
    text = " ".join(parsed.text)
    assert "image not readable" in text and "unreadable mask" in text


def _find_chromium():
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_renders_in_headless_chromium(tmp_path):
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary on PATH")
    out, result, model = _fake_run(tmp_path)
    page = write_report(out, result, model=model)
    # The thumbnails load lazily, and a headless screenshot may be taken before some have loaded (an
    # image-less shot fails the dark-pixel check by chance). An eager copy beside the page delays the
    # load event, and so the shot, until every image is in.
    eager = page.with_name("eager.html")
    eager.write_text(page.read_text().replace(' loading="lazy"', ""))
    shot = tmp_path / "shot.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,3200",
        eager.resolve().as_uri(),
    ]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 120 s")
    assert shot.is_file(), "chromium wrote no screenshot"
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (3200, 1200)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, plots and thumbnails, not a blank or error page
    dark = (image.mean(axis=2) < 60).mean()
    assert dark > 0.01  # the black ground-truth cells and text are drawn
    # The predicted masks are drawn as magenta outlines on the images (no source pixel is near that colour).
    r, g, b = (image[..., i].astype(int) for i in range(3))
    outline = (r > 200) & (g < 80) & (b > 200)
    assert outline.sum() > 200, "no predicted-mask outline is drawn"
    rows, cols = np.nonzero(outline)
    assert cols.max() > 0.6 * image.shape[1]  # in the last column of the image grid


def test_flagged_images_in_a_real_browser_show_their_normal_reference(tmp_path):
    """Issue 28: in headless chromium (Debian's, driven by playwright), each flagged image's explanation (its region
    beside the normal reference crop) is loaded and laid out, and its caption is visible; a screenshot is kept."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary on PATH")
    out, result, model = _fake_run(tmp_path, explained=True)
    path = write_report(out, result, model=model)
    flagged = sum(bool(r["is_anomalous"]) for r in result["records"])
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(path.resolve().as_uri(), timeout=60_000)
            figures = page.locator("figure.ref")
            assert figures.count() == flagged
            shown = []
            for i in range(figures.count()):
                figure = figures.nth(i)
                figure.scroll_into_view_if_needed()  # the pictures load lazily
                picture, caption = figure.locator("img"), figure.locator("figcaption")
                picture.evaluate("img => img.decode()")  # resolves once the image is loaded and decoded
                shown.append(
                    (
                        picture.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]"),
                        picture.bounding_box(),
                        caption.is_visible(),
                        caption.bounding_box(),
                        caption.inner_text(),
                    )
                )
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert all(u.startswith("file://") for u in requested)  # nothing from the network
    for (complete, width, height), box, visible, caption_box, text in shown:
        assert complete and width > 256 + 8 and height > 256  # the region (at least 256 px) and its reference
        assert box["width"] > 100 and box["height"] > 50  # laid out, not collapsed
        assert visible and caption_box["width"] > 0 and caption_box["height"] > 0
        assert "normal reference: train/good/031.png at (30, 33), distance 4.25" in text
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("RGB")).astype(int)
    assert (np.abs(shot - TEAL).sum(axis=2) < 30).sum() > 1000  # the reference crop's pixels are on the screen


def test_report_page_names_each_flagged_images_normal_reference(tmp_path):
    out, result, model = _fake_run(tmp_path, explained=True)
    page = write_report(out, result, model=model).read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.errors == [] and parsed.stack == []
    for link in parsed.links:
        assert (out / unquote(link)).is_file(), link
    text = " ".join(parsed.text)
    flagged = [r for r in result["records"] if r["is_anomalous"]]
    assert text.count("normal reference: train/good/031.png at (30, 33), distance 4.25") == len(flagged)
    links = [unquote(x) for x in parsed.links]
    for rec in flagged:  # a thumbnail (report_files/explanations/...) opening the explanation image
        (entry,) = rec["explanations"]
        at = links.index(entry["path"])
        assert links[at + 1] == f"report_files/{entry['path']}"
        with Image.open(out / links[at + 1]) as thumb, Image.open(out / entry["path"]) as full:
            assert max(thumb.size) == min(2 * THUMB_SIZE, max(full.size))
    assert "the same area, at the same scale" in " ".join(text.split()) and "cannot be read" not in text
    # without explanations (evaluate --no-report's result, or an older one): no legend, no reference
    (tmp_path / "plain").mkdir()
    out, result, model = _fake_run(tmp_path / "plain")
    assert "normal reference" not in write_report(out, result, model=model).read_text(encoding="utf-8")


def test_row_view_references_main_regions_first():
    entries = [
        {"region": i, "path": f"explanations/x_region{i}.png", "peak": peak, "reference": [f"t{i}.png", i, 2 * i, 0.5]}
        for i, peak in enumerate([1.0, 3.0, 2.0, 5.0, 4.0], 1)
    ]
    entries[3]["readable"] = False
    row = row_view(1, _rec(is_anomalous=True, explanations=entries), Thumbnails())
    assert len(row.references) == SHOWN_REFERENCES == 3 and row.more_references == 2
    shown = [PurePath(f"explanations/x_region{i}.png") for i in (4, 5, 2)]
    assert [r.link for r in row.references] == [r.picture for r in row.references] == shown  # no thumbnails
    thumbs = Thumbnails(explanations=((shown[1], PurePath("report_files", shown[1])), (shown[0], None)))
    with_thumbs = row_view(1, _rec(is_anomalous=True, explanations=entries), thumbs).references
    assert [r.picture for r in with_thumbs] == [shown[0], PurePath("report_files", shown[1]), shown[2]]
    first, second = row.references[:2]
    assert first.caption == (
        "Region 4 (peak 5): normal reference: t4.png at (4, 8), distance 0.5 (training image not readable: grey)"
    )
    assert not first.readable and second.readable and second.caption.endswith("distance 0.5")
    assert first.alt == "test/crack/001.jpg region 4 beside its normal reference t4.png"
    assert "same scale" in first.tip
    assert row_view(1, _rec(is_anomalous=True), Thumbnails()).references == ()


def test_page_view_says_why_references_are_missing(tmp_path):
    _, result, model = _fake_run(tmp_path)
    note = lambda **kw: page_view({**result, "explanations": kw}, model, [], []).reference_note  # noqa: E731
    assert page_view(result, model, [], []).reference_note is None  # no explanations asked for
    assert note(method_keeps=True, no_references=False, unreadable=None) is None
    model.method = "padim"
    assert note(method_keeps=False).startswith("No normal references: a padim model keeps none")
    assert "refit it" in note(method_keeps=True, no_references=True)
    moved = note(method_keeps=True, no_references=False, unreadable="/old/train/000.png")
    assert "/old/train/000.png" in moved and "moved" in moved
    result["explanations"] = {"method_keeps": True, "no_references": False, "unreadable": "/old/<train>"}
    page = render_page(page_view(result, model, [], []))
    assert page.count('class="warn">The training images cannot be read') == 1 and "/old/&lt;train&gt;" in page


# ------------------------------------------------------------------------------------------ thumbnails alone
def test_write_thumbnails_returns_the_relative_paths_it_wrote(tmp_path, caplog):
    out, result, _ = _fake_run(tmp_path)
    by_name = {r["name"]: r for r in result["records"]}
    thumbs = write_thumbnails(out, by_name["test/crack/000.png"])
    for folder, rel in zip(("originals", "ground_truth", "heatmaps", "outlines"), vars(thumbs).values()):
        assert rel == PurePath("report_files", folder, "test/crack/000.png")
        assert (out / rel).is_file()
    good = write_thumbnails(out, by_name["test/good/000.png"])
    assert good.ground_truth is None and good.original is not None  # a good image has no ground-truth mask
    assert not (out / "report_files/ground_truth/test/good/000.png").exists()

    broken = dict(by_name["test/crack/001.png"], path=str(tmp_path / "data/nothing.png"))
    with caplog.at_level("WARNING", logger="somad.evaluation.report"):
        thumbs = write_thumbnails(out, broken)
    assert thumbs.original is None and thumbs.outline is None  # both need the unreadable image
    assert thumbs.ground_truth is not None and thumbs.heatmap is not None
    assert "nothing.png" in caplog.text
    assert not list((out / "report_files").rglob("*.tmp"))  # atomic writes left nothing behind


# ------------------------------------------------------------------------------------------ view data, no page
def _rec(**kw):
    return {"name": "test/crack/001.jpg", "label": 1, "defect_type": "crack", "score": 1.23456789, **kw}


@pytest.mark.parametrize(
    ("label", "flagged", "state", "outcome", "decision"),
    [
        (1, True, "correct", "true positive", "anomalous"),
        (0, True, "incorrect", "false positive", "anomalous"),
        (1, False, "incorrect", "false negative", "good"),
        (0, False, "correct", "true negative", "good"),
        (None, True, "incorrect", "false positive", "anomalous"),  # no label: never "correct"
        (1, None, "none", None, None),  # no threshold: no decision
    ],
)
def test_row_view_decision(label, flagged, state, outcome, decision):
    row = row_view(3, _rec(label=label, is_anomalous=flagged), Thumbnails())
    assert (row.state, row.outcome, row.decision) == (state, outcome, decision)
    assert row.label == {1: "defective", 0: "good", None: "unknown"}[label]
    assert row.cells[3].placeholder == ("no threshold: no mask" if flagged is None else "mask not readable")


def test_row_view_texts_cells_and_links():
    thumbs = Thumbnails(*(PurePath("report_files", f, "test/crack/001.png") for f in ("a", "b", "c", "d")))
    row = row_view(2, _rec(is_anomalous=True, status="refused: blank frame"), thumbs)
    assert (row.rank, row.name, row.defect_type) == (2, "test/crack/001.jpg", "crack")
    assert row.score == "1.23457" and row.score_value == 1.23456789 and row.status == "refused: blank frame"
    assert [c.thumb for c in row.cells] == list(vars(thumbs).values())[:4]
    # the heatmap and outline thumbnails open the full-size files of write_predictions (the extension made .png)
    assert [c.link for c in row.cells] == [
        None,
        None,
        PurePath("heatmaps/test/crack/001.png"),
        PurePath("masks/test/crack/001.png"),
    ]
    assert row.cells[0].alt == "test/crack/001.jpg: image"
    assert row_view(1, _rec(status="ok"), thumbs).status is None

    # without thumbnails: no links, and each placeholder says why
    bare = row_view(1, _rec(mask_path="/x/mask.png", score=None), Thumbnails())
    assert [c.link for c in bare.cells] == [None] * 4 and bare.score == "–" and bare.score_value is None
    assert [c.placeholder for c in bare.cells[:3]] == ["image not readable", "unreadable mask", "no heatmap"]
    assert row_view(1, _rec(label=0), Thumbnails()).cells[1].placeholder == "no defect"
    assert row_view(1, _rec(label=1), Thumbnails()).cells[1].placeholder == "no ground-truth mask"


def test_roc_and_pro_plot_coordinates():
    bottom, right = FRAME.top + FRAME.plot_height, FRAME.left + FRAME.plot_width
    curve = {"fpr": [0.0, 0.5, float("nan"), 1.5], "tpr": [0.0, 0.8, 0.3, -1.0]}
    plot = roc_plot(curve, "Image-level ROC", 0.9, "why")
    assert plot.missing is None and plot.legend == "AUROC 0.9000"
    assert plot.curve[0] == (FRAME.left, bottom)
    assert plot.curve[1] == pytest.approx((FRAME.left + 0.5 * FRAME.plot_width, FRAME.top + 0.2 * FRAME.plot_height))
    assert plot.curve[2] == (right, bottom) and len(plot.curve) == 3  # clipped to the square; the NaN point dropped
    assert plot.chance == (FRAME.left, bottom, right, FRAME.top)
    assert [label for _, label in plot.xticks] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert [y for y, _ in plot.yticks] == pytest.approx(np.linspace(bottom, FRAME.top, 6))
    for empty in (None, {}, {"fpr": [], "tpr": []}):
        missing = roc_plot(empty, "t", None, "needs good and defective images")
        assert missing.missing == "needs good and defective images" and not missing.curve

    pro = pro_plot({"fpr": [0, 1], "pro": [0, 1]}, 0.5)
    assert pro.zone == pytest.approx((FRAME.left, PRO_LIMIT * FRAME.plot_width))
    (limit,) = pro.markers
    assert (
        limit.x == pytest.approx(FRAME.left + PRO_LIMIT * FRAME.plot_width) and limit.text == f"FPR limit {PRO_LIMIT}"
    )
    assert pro.legend == f"AU-PRO@{PRO_LIMIT} 0.5000"
    assert pro_plot({"fpr": [0, 1]}, None).missing == "no ground-truth defect regions"


def test_scores_plot_dots_lanes_and_threshold():
    records = [
        {"name": "g", "label": 0, "score": 1.0},
        {"name": "d", "label": 1, "score": 3.0},
        {"name": "u", "label": None, "score": 2.0},
        {"name": "nan", "label": 1, "score": float("nan")},
        {"name": "none", "label": 1},
    ]
    plot = scores_plot(records, 2.5)
    assert [d.title for d in plot.dots] == ["g: 1", "d: 3", "u: 2"]  # unscored images are left out
    assert [d.css for d in plot.dots] == ["dgood", "dbad", "dunknown"]
    xs = {d.title[0]: d.x for d in plot.dots}
    assert FRAME.left < xs["g"] < xs["u"] < xs["d"] < FRAME.left + FRAME.plot_width
    lane_width = 0.11 * FRAME.plot_height  # the jitter's half-width
    assert abs(plot.dots[0].y - FRAME.y(0.72)) <= lane_width and abs(plot.dots[1].y - FRAME.y(0.28)) <= lane_width
    assert [text for _, _, text in plot.lanes] == ["good", "defective"]
    (marker,) = plot.markers
    assert xs["u"] < marker.x < xs["d"] and marker.text == "threshold 2.5"
    assert marker.anchor == "end" and marker.label_x < marker.x  # right half: the label goes left
    assert scores_plot(records, 0.5).markers[0].anchor == "start"
    assert scores_plot(records, None).markers == ()
    assert scores_plot(records[3:], 1.0).missing == "no scores"
    (single,) = scores_plot(records[:1], None).dots  # one score: a range around it, the dot in the middle
    assert single.x == pytest.approx(FRAME.left + FRAME.plot_width / 2)


def test_page_view_values(tmp_path):
    out, result, model = _fake_run(tmp_path)
    records = result["records"]
    page = page_view(result, model, records, [Thumbnails()] * len(records), created="today")
    assert (page.method, page.backbone, page.created, page.n_records) == ("somad", "efficientnet_lite0", "today", 6)
    assert [r.name for r in page.rows] == [r["name"] for r in records]  # in the order given
    assert [r.rank for r in page.rows] == list(range(1, 7))

    counts = dict(page.counts)
    decided = [(r["label"], r["is_anomalous"]) for r in records]
    tp, fp = decided.count((1, True)), decided.count((0, True))
    tn, fn = decided.count((0, False)), decided.count((1, False))
    assert min(tp, fp, tn, fn) > 0  # the fixture has every outcome
    assert (
        counts["at the threshold"]
        == f"{tp} true positive, {fp} false positive, {tn} true negative, {fn} false negative"
    )
    assert counts["test images"] == "6" and counts["skipped (unreadable)"] == "1"
    assert counts["prediction time"] == "1.2 s, 200.0 ms per image"
    assert counts["mask comparison"].startswith("at each mask's original resolution")

    t = page.threshold
    assert (t.image, t.pixel, t.origin, t.quantile, t.n_val) == ("1.5", "1.5", "held out", "0.99", "12")
    assert t.false_alarm_rate == "0.010" and t.few is None  # 1 - quantile, without an estimate in info
    assert page.colour_range == ("0.5", "2.5") and dict(page.settings)["som_size"] == "8"

    assert [m.name for m in page.metrics] == ["overall", "crack", WEIRD_TYPE]
    assert [m.overall for m in page.metrics] == [True, False, False]
    columns = [label for label, _ in page.metric_columns]
    overall = dict(zip(columns, page.metrics[0].cells))
    assert overall["Image AUROC"] == (f"{OVERALL['image_auroc']:.4f}", None)
    assert overall["F1-max image"] == ("0.8877", "at threshold 1.5")
    odd = dict(zip(columns, page.metrics[2].cells))
    assert odd["Image AUROC"][0] == "0.9555" and odd["Pixel AUROC"][0] == "–"
    assert odd["Pixel AUROC"][1].startswith("not available") and page.metrics[2].n_images == "3"
    assert page.skipped == tuple(result["skipped"]) and page.notes == ()
    assert [p.title for p in page.plots] == [
        "Image-level ROC",
        "Pixel-level ROC",
        "PRO curve (per-region overlap)",
        "Image scores",
    ]

    # a threshold set by few good images, on the command line, or none at all
    result["threshold"].update(
        n_val_images=7, info={"rule": "cross_fit", "folds": 5, "false_alarm_rate_interval": [0.01, 0.2]}
    )
    t = page_view(result, model, [], []).threshold
    assert (t.origin, t.folds, t.few, t.interval) == ("cross_fit", "5", 7, ("0.010", "0.200"))
    result["threshold"]["info"] = {"source": "command line"}
    t = page_view(result, model, [], []).threshold
    assert t.origin == "command line" and t.few is None
    result["threshold"]["image"] = None
    assert page_view(result, model, [], []).threshold is None
    with pytest.raises(ValueError, match="one per record"):
        page_view(result, model, records, [])


# ------------------------------------------------------------------------------------------ the page from view data
def test_page_renders_view_data_escaped(tmp_path):
    out, result, model = _fake_run(tmp_path)
    hostile = "<script>alert(\"x\")</script> & 'q'"
    model.method, model.backbone = hostile, "<b>bold</b>"
    model.get_params = lambda: {"k": "<i>v</i>"}
    result["overall"]["note"] = "only <good> images"
    records = sorted(result["records"], key=lambda r: -r["score"])
    thumbs = [Thumbnails(original=PurePath("report_files/originals", f"{i} a#b?.png")) for i in range(len(records))]
    page = render_page(page_view(result, model, records, thumbs, created="<now>"))
    parsed = _parse(page)
    assert parsed.errors == [] and parsed.stack == []
    assert "<script" not in page and "<b>bold" not in page and "<i>v" not in page and "<good>" not in page
    text = " ".join(parsed.text)
    for raw in (hostile, "<b>bold</b>", "<i>v</i>", "only <good> images", "<now>", WEIRD_NAME):
        assert raw in text

    # every row, in the given order, with its score; each thumbnail's path percent-encoded
    assert parsed.rows == [(r["name"], r["score"]) for r in records]
    assert [unquote(x) for x in parsed.links] == [f"report_files/originals/{i} a#b?.png" for i in range(len(records))]
    assert all("#" not in x and "?" not in x for x in parsed.links)
    assert text.count("image not readable") == 0 and text.count("no heatmap") == len(records)

    # the plots: three curves with their legends, one dot per scored image, the threshold
    assert page.count("<svg") == 4 and page.count("<polyline") == 3 and page.count("<circle") == len(records)
    assert "AUROC 0.9123" in text and "AU-PRO@0.3 0.8012" in text and "threshold 1.5" in text

    # no rows: the grid says so
    empty = render_page(page_view(result, model, [], []))
    assert "No test image was scored." in empty and 'class="row' not in empty
