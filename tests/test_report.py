"""Tests of somad.evaluation.report: the static HTML page of ``somad evaluate`` (no backbone needed)."""

from __future__ import annotations

import html
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from somad.evaluation.report import THUMB_SIZE, write_report
from somad.io.outputs import output_relpath

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


def _fake_run(tmp_path: Path, *, threshold: bool = True):
    """A tiny evaluation: source images, GT masks, and the heatmaps/masks that write_predictions makes."""
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

    # names are escaped, never raw markup
    assert "<01>" not in page and html.escape(WEIRD_NAME, quote=True) in page

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
