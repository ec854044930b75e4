"""`somad serve` end to end: a real uvicorn server (a subprocess, or a thread for the in-process app) on a free
loopback port, a tiny model, httpx over HTTP. Every endpoint, every refused input (with its status code and
JSON reason, and the server alive after it), served scores equal to the library's, concurrency, overload (503),
and SIGTERM with a request in flight."""

import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from somad import SOMAD, load  # noqa: E402
from somad.features.extractor import to_original_resolution  # noqa: E402
from somad.service.model_info import read_metadata  # noqa: E402

TINY = dict(weights="none", image_size=64, som_size=4, k=2, rough_epochs=1, fine_epochs=1, device="cpu")
TIMEOUT = 30.0  # seconds, for every HTTP call
START_TIMEOUT = 300.0  # seconds for a server subprocess to answer /health (importing torch on a busy machine)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(seed: int, height: int = 72, width: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``somad serve`` in a subprocess on a free loopback port; its log goes to a file."""

    def __init__(self, model_file, log_path, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "SOMAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "somad.cli", "serve", str(model_file), "--port", str(self.port), *flags]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not answer /health within {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        r = httpx.get(f"{self.url}/health", timeout=TIMEOUT)
        return self.proc.poll() is None and r.status_code == 200 and r.json()["status"] == "ok"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    images = np.stack([_noise(100 + i, 64, 64) for i in range(12)])
    path = tmp_path_factory.mktemp("serve_model") / "tiny.safetensors"
    SOMAD(**TINY, val_fraction=0.25).fit(images).save(path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    return load(model_file)


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    s = Server(model_file, tmp_path_factory.mktemp("log") / "server.log", "--max-body-mb", "0.25",
               "--max-megapixels", "0.3")  # fmt: skip
    yield s
    s.stop()


def _reference(model, array: np.ndarray) -> float:
    scores, _ = model.predict_maps([Image.fromarray(array)])
    return float(scores[0])


def _post_png(server, array, query: str = "", headers=None, **kwargs):
    """POST ``array`` as a PNG to ``server`` (a :class:`Server`, or the base URL of an in-process one)."""
    url = server if isinstance(server, str) else server.url
    headers = {"Content-Type": "image/png", **(headers or {})}
    return httpx.post(f"{url}/v1/predict{query}", content=_png(array), headers=headers, timeout=TIMEOUT, **kwargs)


def _refused(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail, detail


# ----------------------------------------------------------------------------------------- endpoints
def test_health(server):
    r = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "queue": 0, "max_queue": 32}


def test_model_endpoint_describes_the_file(server, model_file, model):
    r = httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT)
    assert r.status_code == 200
    info = r.json()
    header = read_metadata(model_file)
    assert info["method"] == "somad" and info["backbone"] == "efficientnet_lite0"
    assert info["params"]["som_size"] == 4 and info["params"]["k"] == 2
    assert info["geometry"]["image_size"] == 64 and info["geometry"]["crop_size"] is None
    assert info["image_threshold"] == model.image_threshold_ and info["pixel_threshold"] == model.pixel_threshold_
    # 12 good images: fewer than 30, so fit cross-fits (every image trained on, all 12 scored out of fold)
    assert info["threshold_info"]["source"] == "fit" and info["threshold_info"]["n_images"] == 12
    assert info["threshold_info"]["rule"] == "cross_fit"
    assert info["n_train_images"] == 12 == model.n_train_images_
    assert info["train_set_sha256"] == model.train_set_sha256_ and len(info["train_set_sha256"]) == 64
    assert info["content_sha256"] == header["sha256"]
    assert info["file_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert info["format_version"] == int(header["format_version"])
    assert info["service"]["max_body_bytes"] == 256 * 1024 and info["service"]["max_pixels"] == 300_000


def test_predict_raw_bytes_scores_as_the_library(server, model):
    array = _noise(1)
    r = _post_png(server, array)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score"] == pytest.approx(_reference(model, array), rel=1e-5)
    assert body["is_anomalous"] == (body["score"] > model.image_threshold_)
    assert body["threshold"] == model.image_threshold_ and body["status"] == "ok"
    assert body["normalized_score"] == pytest.approx(float(model.normalized_scores([body["score"]])[0]), abs=1e-6)
    assert (body["width"], body["height"]) == (96, 72)
    assert set(body["timings_ms"]) >= {"decode", "inference", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] > 0
    assert "heatmap_png" not in body and "mask_png" not in body


@pytest.mark.parametrize("content_type", ["application/octet-stream", "image/jpeg", "image/bmp", "image/tiff"])
def test_predict_each_accepted_content_type(server, model, content_type):
    array = _noise(2)
    fmt = {"image/jpeg": "JPEG", "image/bmp": "BMP", "image/tiff": "TIFF"}.get(content_type, "PNG")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    headers = {"Content-Type": content_type}
    r = httpx.post(f"{server.url}/v1/predict", content=buffer.getvalue(), headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))  # JPEG: the decoded pixels
    assert r.json()["score"] == pytest.approx(_reference(model, decoded), rel=1e-5)


def test_predict_multipart_file_field(server, model):
    array = _noise(3)
    files = {"file": ("part.png", _png(array), "image/png")}
    r = httpx.post(f"{server.url}/v1/predict", files=files, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(_reference(model, array), rel=1e-5)


def test_predict_heatmap_mask_and_regions(server, model):
    array = _noise(4)
    r = _post_png(server, array, "?heatmap=png&mask=png&regions=1")
    assert r.status_code == 200, r.text
    body = r.json()
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heatmap.format == "PNG" and heatmap.mode == "RGB" and heatmap.size == (96, 72)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert mask.shape == (72, 96) and set(np.unique(mask)) <= {0, 255}
    assert bool(mask.any()) == body["is_anomalous"]  # non-empty exactly when flagged
    # the same mask as the library's, at the original resolution
    (pred,) = list(model.predict_iter([Image.fromarray(array)]))
    full = to_original_resolution(pred.map[None], model.extractor_.geometry, [pred.original_size])[0]
    expected = model.mask(pred, full)
    assert (mask > 0).sum() == pytest.approx(expected.sum(), abs=2)
    assert sum(region["area"] for region in body["regions"]) == (mask > 0).sum()


def test_predict_flags_a_blank_frame_with_the_gate_status(server):
    r = _post_png(server, np.zeros((64, 64, 3), np.uint8), "?mask=png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"].startswith("invalid_input: blank frame") and body["is_anomalous"] is True
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))).all()  # the whole frame


def test_batch_reports_per_item_errors_in_order(server, model):
    good = [_noise(10), _noise(11, 64, 80)]
    files = [
        ("files", ("a.png", _png(good[0]), "image/png")),
        ("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("b.png", _png(good[1]), "image/png")),
        ("files", ("huge.png", _png(np.full((700, 700, 3), 128, np.uint8)), "image/png")),
    ]
    r = httpx.post(f"{server.url}/v1/predict/batch?mask=png", files=files, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["filename"] for x in results] == ["a.png", "broken.png", "empty.png", "b.png", "huge.png"]
    assert [x["index"] for x in results] == [0, 1, 2, 3, 4]
    assert body["n_images"] == 5 and body["n_failed"] == 3
    for i, array in ((0, good[0]), (3, good[1])):
        assert results[i]["score"] == pytest.approx(_reference(model, array), rel=1e-5)
        assert "mask_png" in results[i] and "error" not in results[i]
    assert results[1]["status_code"] == 400 and "broken.png" in results[1]["error"]
    assert results[2]["status_code"] == 400 and "empty" in results[2]["error"]
    assert results[4]["status_code"] == 413 and "megapixels" in results[4]["error"]
    assert "score" not in results[1]


# ----------------------------------------------------------------------------------------- refused inputs
def test_refused_inputs_get_4xx_with_a_reason_and_the_server_lives(server):
    url = f"{server.url}/v1/predict"
    png = _png(_noise(20))

    def post(content, content_type="image/png", path=url, **kwargs):
        headers = {"Content-Type": content_type} if content_type else {}
        return httpx.post(path, content=content, headers=headers, timeout=TIMEOUT, **kwargs)

    _refused(post(png[: len(png) // 2]), 400, "truncated or corrupt")  # a cut PNG
    _refused(post(b"this is no image at all"), 400, "not a readable image")
    _refused(post(b""), 400, "empty body")
    _refused(post(png, "text/plain"), 415, "'text/plain' is not accepted")
    _refused(post(png, None), 415, "no content type")
    _refused(post(png, path=f"{url}/batch"), 415, "multipart/form-data")
    big = np.random.default_rng(0).integers(0, 256, 300 * 1024, dtype=np.uint8).tobytes()
    _refused(post(big), 413, "over the limit of 0.25 MB")  # declared length

    def chunks():  # no declared length: counted while it arrives
        for i in range(0, len(big), 16 * 1024):
            yield big[i : i + 16 * 1024]

    _refused(post(chunks()), 413, "over the limit of 0.25 MB")
    _refused(post(_png(np.full((1000, 1000, 3), 90, np.uint8))), 413, "exceeds the limit of 0.3 megapixels")
    _refused(httpx.post(url, files={"other": ("x.png", png, "image/png")}, timeout=TIMEOUT), 400, "'file'")
    bad_multipart = b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'
    _refused(post(bad_multipart, "multipart/form-data; boundary=other"), 400, "")
    _refused(post(png, path=f"{url}?heatmap=jpeg"), 422, "heatmap")
    assert server.alive()
    assert post(png).status_code == 200
    log = server.log()
    assert "POST /v1/predict 413" in log and "POST /v1/predict 200" in log and " ms" in log  # one line per request
    assert "Traceback" not in log


def test_concurrent_requests_all_succeed_with_correct_scores(server, model):
    arrays = [_noise(30 + i, 64 + 8 * i, 96) for i in range(8)]
    expected = [_reference(model, a) for a in arrays]
    results = [None] * len(arrays)
    barrier = threading.Barrier(len(arrays))

    def client(i):
        barrier.wait(timeout=TIMEOUT)
        results[i] = _post_png(server, arrays[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(arrays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * TIMEOUT)
    for r, score in zip(results, expected):
        assert r is not None and r.status_code == 200, r and r.text
        assert r.json()["score"] == pytest.approx(score, rel=1e-5)


# ----------------------------------------------------------------------------------------- in process, overload
@contextlib.contextmanager
def in_process(app, **config):
    """``app`` served by a ``uvicorn.Server`` on a thread of this process, on a free loopback port."""
    import uvicorn

    port = _free_port()
    config = {"host": "127.0.0.1", "port": port, "log_config": None, "access_log": False, **config}
    srv = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert srv.started
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_create_app_runs_in_process(model_file, model):
    from somad.service.app import create_app

    with in_process(create_app(model_file, max_body_bytes=1 << 20, max_queue=2)) as url:
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["max_queue"] == 2
        array = _noise(40)
        r = httpx.post(f"{url}/v1/predict", content=_png(array), headers={"Content-Type": "image/png"}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(_reference(model, array), rel=1e-5)
        r = httpx.get(f"{url}/v1/model", timeout=TIMEOUT)
        assert r.json()["service"]["max_body_bytes"] == 1 << 20


def test_overload_gives_503_and_the_rest_succeed(model_file, model):
    from somad.service.app import create_app

    array = _noise(50, 256, 256)
    expected = _reference(model, array)
    content = _png(array)
    with in_process(create_app(model_file, max_queue=1)) as url:
        statuses = []
        for _ in range(4):  # bursts until one overflows the queue (the first nearly always does)
            n = 24
            results = [None] * n
            barrier = threading.Barrier(n)

            def client(i, barrier=barrier, results=results):
                barrier.wait(timeout=TIMEOUT)
                headers = {"Content-Type": "image/png"}
                results[i] = httpx.post(f"{url}/v1/predict", content=content, headers=headers, timeout=TIMEOUT)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=2 * TIMEOUT)
            assert all(r is not None for r in results)
            for r in results:
                assert r.status_code in (200, 503), r.text
                if r.status_code == 200:
                    assert r.json()["score"] == pytest.approx(expected, rel=1e-5)
                else:
                    _refused(r, 503, "overloaded")
            statuses += [r.status_code for r in results]
            if 503 in statuses:
                break
        assert 503 in statuses and 200 in statuses
        health = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
        assert health == {"status": "ok", "queue": 0, "max_queue": 1}


def test_sigterm_finishes_the_request_in_flight_and_exits_0(model_file, model, tmp_path):
    server = Server(model_file, tmp_path / "server.log")
    array = _noise(60)
    content = _png(array)
    sent = {}

    def body():  # the request is on the server (headers and half the body) when SIGTERM arrives
        yield content[: len(content) // 2]
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        sent["at"] = time.monotonic()
        time.sleep(0.5)
        yield content[len(content) // 2 :]

    try:
        r = httpx.post(
            f"{server.url}/v1/predict", content=body(), headers={"Content-Type": "image/png"}, timeout=TIMEOUT
        )
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(_reference(model, array), rel=1e-5)
        assert server.proc.wait(timeout=30) == 0, server.log()
        assert time.monotonic() - sent["at"] < 30
        with pytest.raises(httpx.TransportError):  # no longer listening
            httpx.get(f"{server.url}/health", timeout=5.0)
    finally:
        server.stop()


def test_serve_without_the_extra_is_one_line(model_file, monkeypatch, capsys):
    from somad.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    assert main(["serve", str(model_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "somad[serve]"' in err


def test_two_workers_serve_and_stop_on_sigterm(model_file, model, tmp_path):
    server = Server(model_file, tmp_path / "server.log", "--workers", "2")
    try:
        array = _noise(70)
        expected = _reference(model, array)
        for _ in range(4):
            r = _post_png(server, array)
            assert r.status_code == 200, r.text
            assert r.json()["score"] == pytest.approx(expected, rel=1e-5)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log()
        assert "POST /v1/predict 200" in server.log()  # the workers log one line per request too
    finally:
        server.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_a_missing_or_foreign_model_is_one_line(tmp_path, capsys, workers):
    from somad.cli import main

    foreign = tmp_path / "picture.png"
    foreign.write_bytes(_png(_noise(0)))
    for path, fragment in ((tmp_path / "none.safetensors", "not found"), (foreign, "not a readable somad model")):
        assert main(["serve", str(path), "--workers", workers, "--port", str(_free_port())]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {path}") and fragment in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_a_verify_key_refuses_unsigned_and_serves_signed(model_file, model, tmp_path, capsys, workers):
    """``--verify-key``: an unsigned or wrongly signed model is one line and exit 2 before the port opens; a signed
    one is served, and ``/v1/model`` says its signature was verified."""
    from somad.cli import main
    from somad.service.app import create_app

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "key").write_bytes(b"s" * 32)
    (keys / "other").write_bytes(b"t" * 32)
    signed = model.save(tmp_path / "signed.safetensors", sign_key=keys / "key")
    for path, key, fragment in ((model_file, "key", "is not signed"), (signed, "other", "signature does not match")):
        capsys.readouterr()
        argv = ["serve", str(path), "--workers", workers, "--port", str(_free_port()), "--verify-key"]
        assert main([*argv, str(keys / key)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {path}") and fragment in err
    if workers == "1":
        with in_process(create_app(signed, verify_key=keys / "key")) as url:
            info = httpx.get(f"{url}/v1/model", timeout=TIMEOUT).json()
            assert info["signature"] == "verified" and info["path"] == "signed.safetensors"  # no server path


def test_a_corrupt_model_is_one_line_before_the_port_opens_with_several_workers(model_file, tmp_path, capsys):
    """Issue 26: with --workers 2 a hash mismatch was never reported (each worker failed and was respawned)."""
    from somad.cli import main

    corrupt = tmp_path / "corrupt.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF  # one byte of the last array
    corrupt.write_bytes(bytes(data))
    for workers in ("1", "2"):
        capsys.readouterr()
        assert main(["serve", str(corrupt), "--workers", workers, "--port", str(_free_port())]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {corrupt}") and "content hash mismatch" in err


def test_binding_beyond_loopback_is_warned_about(tmp_path, capsys):
    from somad.cli import main
    from somad.cli.serve import exposure_warning

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert exposure_warning(host, 8000) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "inspection.local"):
        assert "listens beyond this machine" in exposure_warning(host, 8000)
    missing = tmp_path / "none.safetensors"
    assert main(["serve", str(missing), "--host", "0.0.0.0", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: --host 0.0.0.0 listens beyond this machine") and f"error: {missing}" in err


# ----------------------------------------------------------------------------------------- slow and silent clients
def _raw(port: int, data: bytes) -> socket.socket:
    """A loopback socket that has sent ``data`` and waits (every read bounded by TIMEOUT)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (bounded by the socket's timeout)."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_bodies_that_stop_arriving_get_408_and_free_their_slots(model_file, model):
    """Issue 26: clients that declare a 1 MB body and send one byte held every slot for good (503 for everyone).
    Now each gets 408 after --read-timeout, and the service takes requests again."""
    from somad.service.app import ACTIVE_MARGIN, create_app

    array = _noise(41)
    expected = _reference(model, array)
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
    with in_process(create_app(model_file, max_queue=1, read_timeout=1.0, body_timeout=30.0)) as url:
        slow = [_raw(_port(url), head + b"x") for _ in range(1 + ACTIVE_MARGIN)]
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:  # until every slow upload holds a slot
                r = _post_png(url, array)
                if r.status_code == 503:
                    break
            _refused(r, 503, "requests in progress")
            answers = [_read_all(sock) for sock in slow]
        finally:
            for sock in slow:
                sock.close()
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"no part of the request body arrived within 1 s (--read-timeout)" in answer
        r = _post_png(url, array)
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(expected, rel=1e-5)


def test_a_body_trickling_past_the_body_timeout_gets_408(model_file):
    from somad.service.app import create_app

    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    with in_process(create_app(model_file, read_timeout=1.0, body_timeout=2.0)) as url:
        sock = _raw(_port(url), head)
        try:
            t0 = time.monotonic()
            with contextlib.suppress(OSError):  # the server may answer and close while we still send
                while time.monotonic() - t0 < 10:  # a byte every 0.3 s: never idle for 1 s
                    sock.sendall(b"x")
                    time.sleep(0.3)
            answer = _read_all(sock)
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive whole within 2 s (--body-timeout)" in answer


def test_connections_that_never_finish_their_head_are_closed(model_file, model, monkeypatch):
    """Issue 26: half-open requests (headers never finished) were never dropped and exhausted the descriptors."""
    from somad.service.app import create_app
    from somad.service.guard import GuardedH11Protocol

    monkeypatch.setattr(GuardedH11Protocol, "header_timeout", 1.0)
    array = _noise(42)
    expected = _reference(model, array)
    with in_process(create_app(model_file), http=GuardedH11Protocol) as url:
        t0 = time.monotonic()
        silent = [_raw(_port(url), b"") for _ in range(10)]
        partial = [_raw(_port(url), b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n") for _ in range(10)]
        try:
            r = _post_png(url, array)  # served meanwhile
            assert r.status_code == 200 and r.json()["score"] == pytest.approx(expected, rel=1e-5)
            answers = [_read_all(sock) for sock in silent + partial]
            waited = time.monotonic() - t0
        finally:
            for sock in silent + partial:
                sock.close()
        assert answers == [b""] * 20  # closed by the server, without an answer
        assert waited < TIMEOUT  # by the head deadline, not by the client's own timeout
        # a complete request on a fresh connection is not affected by the deadline of the others
        r = _post_png(url, array)
        assert r.status_code == 200


def test_a_client_hanging_up_mid_upload_is_one_log_line(model_file, caplog):
    """Issue 26: each client that hung up mid-upload was logged as HTTP 500 with two tracebacks."""
    import logging

    from somad.service.app import create_app

    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="somad.service"):
        with in_process(create_app(model_file)) as url:
            for _ in range(3):
                sock = _raw(_port(url), head + b"x" * 100)
                time.sleep(0.2)
                sock.close()
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and caplog.text.count("POST /v1/predict 499") < 3:
                time.sleep(0.1)
            assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    assert caplog.text.count("client closed the connection during POST /v1/predict") == 3
    assert caplog.text.count("POST /v1/predict 499") == 3
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)


def test_an_api_key_guards_everything_but_health(model_file, model, tmp_path, capsys):
    from somad.cli import main
    from somad.service.app import create_app

    key = b"0123456789abcdef0123456789abcdef"
    array = _noise(43)
    expected = _reference(model, array)
    with in_process(create_app(model_file, api_key=key)) as url:
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
        r = httpx.get(f"{url}/v1/model", timeout=TIMEOUT)
        _refused(r, 401, "no API key")
        assert r.headers["www-authenticate"].startswith("Bearer")
        headers = {"Content-Type": "image/png"}
        for auth, status, fragment in (
            ({}, 401, "no API key"),
            ({"Authorization": "Bearer wrong"}, 401, "wrong API key"),
            ({"X-API-Key": key.decode()[:-1]}, 401, "wrong API key"),
            ({"Authorization": f"Bearer {key.decode()}"}, 200, None),
            ({"X-API-Key": key.decode()}, 200, None),
        ):
            r = httpx.post(f"{url}/v1/predict", content=_png(array), headers={**headers, **auth}, timeout=TIMEOUT)
            if status == 200:
                assert r.status_code == 200 and r.json()["score"] == pytest.approx(expected, rel=1e-5)
            else:
                _refused(r, status, fragment)
        r = httpx.get(f"{url}/v1/model", headers={"X-API-Key": key.decode()}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["path"] == model_file.name
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"a key with spaces in it, long enough")
    assert main(["serve", str(model_file), "--api-key-file", str(bad), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {bad}") and "visible ASCII without spaces" in err


def test_an_api_key_over_the_command_line_with_two_workers(model_file, model, tmp_path):
    key_file = tmp_path / "api.key"
    key_file.write_bytes(b"fedcba9876543210fedcba9876543210\n")
    server = Server(model_file, tmp_path / "server.log", "--workers", "2", "--api-key-file", str(key_file))
    try:
        array = _noise(44)
        assert _post_png(server, array).status_code == 401
        r = _post_png(server, array, headers={"X-API-Key": "fedcba9876543210fedcba9876543210"})
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(_reference(model, array), rel=1e-5)
    finally:
        server.stop()


def test_the_command_line_defaults_are_the_services():
    from somad.cli import serve
    from somad.service import guard

    assert (serve.HEADER_TIMEOUT, serve.READ_TIMEOUT, serve.BODY_TIMEOUT) == (
        guard.HEADER_TIMEOUT,
        guard.READ_TIMEOUT,
        guard.BODY_TIMEOUT,
    )
    assert "pass --api-key-file" in serve.exposure_warning("0.0.0.0", 8000)
    assert "travel unencrypted" in serve.exposure_warning("0.0.0.0", 8000, api_key=True)


# ----------------------------------------------------------------------------------------- a self-describing service
@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_heatmap_in_each_format(server, fmt, pil_format):
    array = _noise(5)
    r = _post_png(server, array, f"?heatmap={fmt}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [k for k in body if k.startswith("heatmap")] == [f"heatmap_{fmt}"]
    heatmap = Image.open(io.BytesIO(base64.b64decode(body[f"heatmap_{fmt}"])))
    assert heatmap.format == pil_format and heatmap.size == (96, 72)
    png = _post_png(server, array, "?heatmap=png").json()["heatmap_png"]
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=float)
    got = np.asarray(heatmap.convert("RGB"), dtype=float)

    def blocks(a):  # 8x8 block means: the colours a lossy format keeps (the noise image's pixels it may not)
        return a.reshape(9, 8, 12, 8, 3).mean(axis=(1, 3))

    assert np.abs(blocks(got) - blocks(png)).max() < 12  # the same overlay, compressed
    _refused(_post_png(server, array, "?heatmap=gif"), 422, "heatmap")


def test_ready_names_the_loaded_model_by_its_hashes(server, model_file):
    r = httpx.get(f"{server.url}/ready", timeout=TIMEOUT)
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["model"] == model_file.name and body["method"] == "somad"
    assert body["file_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert body["content_sha256"] == read_metadata(model_file)["sha256"]  # as `somad info` shows it


def test_openapi_describes_every_field_and_both_request_bodies(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"image/png", "multipart/form-data"} <= set(predict["requestBody"]["content"])
    assert {"200", "400", "413", "503"} <= set(predict["responses"])
    answer = spec["components"]["schemas"]["PredictAnswer"]["properties"]
    assert {"score", "is_anomalous", "normalized_score", "heatmap_jpg", "mask_png", "regions", "timings_ms"} <= set(
        answer
    )
    assert all(answer[name].get("description") for name in ("score", "is_anomalous", "normalized_score", "status"))
    batch = spec["paths"]["/v1/predict/batch"]["post"]
    assert "multipart/form-data" in batch["requestBody"]["content"]
    assert "/ready" in spec["paths"] and "/docs" not in spec["paths"]


def test_docs_page_needs_no_internet(server):
    import re

    r = httpx.get(f"{server.url}/docs", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loaded from elsewhere
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/model", "/health", "/ready"):
        assert f"<code>{path}</code>" in page
    assert "normalized_score" in page and "the score on a [0, 1] scale" in page and 'id="try-form"' in page


def test_docs_page_scores_an_upload_in_a_real_browser(model_file, model, tmp_path):
    """The /docs form in headless chromium (Debian's, driven by playwright): an upload scored as the library
    scores it, the heatmap shown, and no request leaving the loopback address."""
    sync_api = pytest.importorskip("playwright.sync_api")
    import shutil

    from somad.service.app import create_app

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH")
    array = _noise(45)
    picture = tmp_path / "part.png"
    picture.write_bytes(_png(array))
    key = "0123456789abcdef0123456789abcdef"
    with in_process(create_app(model_file, api_key=key.encode())) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            requested = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{url}/docs", timeout=60_000)
            page.set_input_files("#try-file", str(picture))
            page.fill("#try-key", key)
            page.click("button[type=submit]")
            page.wait_for_selector("#try-json", timeout=60_000)
            status, text = page.inner_text("#try-json").split("\n", 1)
            shown = page.eval_on_selector("img[alt=heatmap_jpg]", "img => img.naturalWidth")
        finally:
            browser.close()
    assert status == "200"
    assert json.loads(text)["score"] == pytest.approx(_reference(model, array), rel=1e-5)
    assert shown == 96  # the heatmap decoded, at the image's width
    assert requested and all(u.startswith(url) for u in requested)


def test_regions_carry_their_normal_reference(server, model):
    """Issue 28: the service returns each region's normal reference (SOMAD), as regions.csv names it."""
    array = _noise(6)
    body = _post_png(server, array, "?regions=1").json()
    assert body["is_anomalous"] and body["regions"], body  # noise on a noise-trained tiny model: flagged
    (pred,) = list(model.predict_iter([Image.fromarray(array)]))
    full = model.original_map(pred)
    mask = model.mask(pred, full)
    from somad.io.outputs import peak_pixel
    from somad.verdicts import regions

    peaks = [peak_pixel(mask, full, r) for r in regions(mask, full)]
    expected = model.region_references(pred, peaks)
    got = [r["reference"] for r in body["regions"]]
    assert [(g["image"], g["x"], g["y"]) for g in got] == [(name, x, y) for name, x, y, _ in expected]
    assert [g["distance"] for g in got] == pytest.approx([d for *_, d in expected], rel=1e-4)
    assert all(name in model.reference_images_ for name, *_ in expected)


def test_explain_returns_each_regions_explanation_image(server, model):
    """``?explain=1``: the regions, each with the image ``somad predict --explain`` writes for it (base64 PNG), pixel
    for pixel (this model was fitted on frames in memory: its reference panel says it cannot read them)."""
    import base64
    import io

    from somad.io.outputs import explanation_image, explanation_title, peak_pixel, reference_image
    from somad.verdicts import regions

    array = _noise(6)
    body = _post_png(server, array, "?explain=1").json()
    assert body["regions"] and all(r["explanation_png"] for r in body["regions"]), body
    (pred,) = list(model.predict_iter([Image.fromarray(array)]))
    full = model.original_map(pred)
    mask = model.mask(pred, full)
    found = regions(mask, full)
    peaks = [peak_pixel(mask, full, r) for r in found]
    refs = model.region_references(pred, peaks)
    for i, (served, region, peak, ref) in enumerate(zip(body["regions"], found, peaks, refs), 1):
        reference, _ = reference_image(model, ref[0])
        want = explanation_image(pred, mask, region, peak, ref, reference, explanation_title(pred, i, region))
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(served["explanation_png"]))).convert("RGB"))
        want = np.asarray(want.convert("RGB"))
        differ = np.nonzero((got != want).any(-1))[0]
        assert got.shape == want.shape and (differ.size == 0 or differ.max() < 20), differ  # the title's name only
    plain = _post_png(server, array, "?regions=1").json()
    assert all("explanation_png" not in r or r["explanation_png"] is None for r in plain["regions"])
