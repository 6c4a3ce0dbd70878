"""The annotation app: HTTP checks against the running server, then a real browser (Debian's
chromium driven by Playwright) on the page, with a briefly trained test_tiny
(`tests/tiny_trained.py`) so clicks change the mask meaningfully.

Set SKIPCLICK_APP_SCREENSHOT=docs/app.png to save the README's screenshot.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

pytest.importorskip("starlette", reason="the app needs the 'app' extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the app needs the 'app' extra (starlette, uvicorn)")

import tiny_trained
from tests.helpers import ROOT, stop_process

EXAMPLE = ROOT / "skipclick_jax" / "assets" / "demo.png"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
MAX_SESSIONS, MAX_UPLOAD_MB = 3, 1
START_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request):
    from skipclick_jax.app import PALETTE  # noqa: F401 -- fail early if the module is broken

    ckpt = tiny_trained.trained_checkpoint(str(request.config.cache.mkdir("tiny-trained")))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log = open(request.config.cache.mkdir("app-log") / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "skipclick_jax.app", "--checkpoint", str(ckpt), "--port", str(port),
         "--max-sessions", str(MAX_SESSIONS), "--max-upload-mb", str(MAX_UPLOAD_MB)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/api/info", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not start within {START_TIMEOUT_S} s")
                time.sleep(1)
        yield url
    finally:
        stop_process(proc, log)


def _request(url, data=None, headers=None):
    """-> (status, body bytes, content type)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def _post_json(url, body):
    status, data, _ = _request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


def _upload(server, data: bytes):
    if len(data) > MAX_UPLOAD_MB * 2**20:  # the server answers from the header, before the body
        return _oversized_upload(server, len(data))
    status, body, _ = _request(server + "/api/image", data, {"Content-Type": "application/octet-stream"})
    return status, json.loads(body)


def _oversized_upload(server, length: int):
    """POST headers declaring `length` bytes and read the answer without sending the body (a client
    mid-way through sending a large body may see the connection closed instead of the 413)."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", "/api/image")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_binds_localhost_and_serves(server):
    port = int(server.rsplit(":", 1)[1])
    hostname = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False)
    for ip in [a for a in hostname.stdout.split() if not a.startswith("127.") and ":" not in a]:
        with pytest.raises(OSError):  # not reachable from other machines
            socket.create_connection((ip, port), timeout=2).close()
    status, body, kind = _request(server + "/")
    assert status == 200 and b"<canvas" in body and "html" in kind
    assert b"http" not in body, "the page must not load anything remote"
    info = json.loads(_request(server + "/api/info")[1])
    assert info["random_weights"] is False and info["backend"] == "Predictor" and info["size"] == 112


@pytest.mark.parametrize("payload, status, message", [
    (b"", 400, "empty upload"),
    (b"this is not an image", 400, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, 400, "not an image"),
    (b"x" * (MAX_UPLOAD_MB * 2**20 + 1), 413, "upload too large"),
])
def test_bad_uploads_get_a_clear_4xx(server, payload, status, message):
    got, body = _upload(server, payload)
    assert got == status and message in body["error"]
    assert _request(server + "/api/info")[0] == 200  # still serving


def test_too_many_pixels(server):
    big = io.BytesIO()
    Image.new("L", (8000, 6000)).save(big, format="PNG")  # 48 MP, a small file
    got, body = _upload(server, big.getvalue())
    assert got == 413 and "8000x6000 pixels" in body["error"]


def test_sessions_undo_and_eviction(server):
    png = EXAMPLE.read_bytes()
    first = _upload(server, png)[1]["session"]
    status, one = _post_json(server + "/api/click", dict(session=first, row=120, col=320, positive=True))
    assert status == 200 and one["current_area"] > 0 and len(one["clicks"]) == 1
    status, _ = _post_json(server + "/api/click", dict(session=first, row=5, col=5, positive=False))
    assert status == 200
    status, back = _post_json(server + "/api/undo", dict(session=first))
    assert back["overlay"] == one["overlay"] and back["clicks"] == one["clicks"]  # the stack, no recompute
    status, body = _post_json(server + "/api/click", dict(session=first, row=336, col=0, positive=True))
    assert status == 400 and "outside the 336x448 image" in body["error"]
    status, body = _post_json(server + "/api/click", dict(session=first, row=1))
    assert status == 400 and "col, positive" in body["error"]
    others = [_upload(server, png)[1]["session"] for _ in range(MAX_SESSIONS)]
    status, body = _post_json(server + "/api/undo", dict(session=first))  # least recently used: gone
    assert status == 404 and "expired session" in body["error"]
    status, body = _upload(server, png)  # the others are fresh (not used since uploaded): kept
    assert status == 503 and "the server is full" in body["error"]
    for sid in others:  # used now: they may go when room is needed
        assert _post_json(server + "/api/reset", dict(session=sid))[0] == 200


# ----------------------------------------------------------------------------- the browser
def _objects() -> dict[str, np.ndarray]:
    """The example's objects by colour (it is a synthetic image with flat-coloured shapes)."""
    img = np.asarray(Image.open(EXAMPLE).convert("RGB")).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    found = dict(blue=(b > 150) & (r < 100), red=(r > 150) & (g < 100) & (b < 100))
    return {k: ndimage.binary_opening(v, iterations=2) for k, v in found.items()}


def _deepest(mask: np.ndarray) -> tuple[int, int]:
    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return tuple(int(x) for x in np.unravel_index(np.argmax(d), d.shape))


class Page:
    """The app page in chromium: clicks at image pixels, the overlay's pixels back."""

    def __init__(self, page):
        self.page, self.version = page, 0

    def _wait_overlay(self):
        self.version += 1
        self.page.wait_for_function(f"Number(document.getElementById('overlay').dataset.version) >= {self.version}",
                                    timeout=120_000)

    def open_example(self):
        self.page.click("#example")
        self._wait_overlay()
        self.page.wait_for_function("document.body.dataset.session !== undefined", timeout=120_000)

    def click(self, row, col, positive=True):
        box = self.page.locator("#marks").bounding_box()
        h, w = self.size()
        x = box["x"] + (col + 0.5) * box["width"] / w
        y = box["y"] + (row + 0.5) * box["height"] / h
        self.page.mouse.click(x, y, button="left" if positive else "right")
        self._wait_overlay()

    def button(self, name):
        self.page.click(f"#{name}")
        self._wait_overlay()

    def size(self):
        return tuple(self.page.evaluate("[document.getElementById('overlay').height, "
                                        "document.getElementById('overlay').width]"))

    def overlay(self) -> np.ndarray:
        """uint8 [H, W, 4]: the overlay canvas at the image's resolution."""
        h, w = self.size()
        data = self.page.evaluate(
            "(() => { const c = document.getElementById('overlay');"
            " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); })()")
        return np.asarray(data, np.uint8).reshape(h, w, 4)

    def mask(self, k: int) -> np.ndarray:
        """Pixels painted in object k's colour (k = 0 for the first object)."""
        from skipclick_jax.app import PALETTE

        o = self.overlay()
        return (o[..., 3] == 255) & np.all(o[..., :3] == PALETTE[k], axis=-1)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True, timeout=120_000)
        try:
            yield b
        finally:
            b.close()


def test_annotate_in_the_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800}, accept_downloads=True)
    page.set_default_timeout(120_000)
    remote = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(server) and
            not r.url.startswith("data:") else None)
    page.goto(server + "/")
    ui = Page(page)
    ui.open_example()
    assert ui.size() == (336, 448) and not ui.overlay()[..., 3].any()
    blue = _objects()["blue"]

    # A positive click inside the blue disc: the mask lies mostly over it.
    ui.click(*_deepest(blue))
    m1 = ui.mask(0)
    cover, precision = (m1 & blue).sum() / blue.sum(), (m1 & blue).sum() / max(m1.sum(), 1)
    assert cover > 0.6 and precision > 0.6, (cover, precision)
    assert "click:" in page.inner_text("#latency") and "ms model" in page.inner_text("#latency")

    # A negative click on the deepest false positive removes area there.
    fp = m1 & ~blue
    assert fp.sum() > 50, "the first click left no false positive to remove"
    r, c = _deepest(fp)
    ui.click(r, c, positive=False)
    m2 = ui.mask(0)
    assert m2.sum() < m1.sum() and not m2[r, c] and (m2 & ~blue).sum() < fp.sum()

    # A positive click on the deepest miss grows the mask over the disc.
    r, c = _deepest(blue & ~m2)
    ui.click(r, c)
    m3 = ui.mask(0)
    assert m3[r, c] and (m3 & blue).sum() > (m2 & blue).sum()

    ui.button("undo")
    np.testing.assert_array_equal(ui.mask(0), m2)
    ui.button("reset")
    assert not ui.overlay()[..., 3].any()

    # Object 1: the disc; next object; object 2: the red ellipse. The first mask is kept.
    ui.click(*_deepest(blue))
    np.testing.assert_array_equal(ui.mask(0), m1)
    ui.button("next")
    np.testing.assert_array_equal(ui.mask(0), m1)
    red = _objects()["red"]
    ui.click(*_deepest(red))
    second = ui.mask(1)
    assert (second & red).sum() > 0.5 * red.sum()
    first = ui.mask(0)
    assert first.sum() > 0.5 * m1.sum() and not (first & second).any()

    # The download: a label PNG at the image's resolution, one label per object.
    with page.expect_download() as download:
        page.click("#download")
    path = tmp_path / "mask.png"
    download.value.save_as(path)
    labels = np.asarray(Image.open(path))
    assert labels.shape == (336, 448) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(labels == 1, first)
    np.testing.assert_array_equal(labels == 2, second)

    # The COCO JSON beside it: each object's whole mask as RLE, read back with pycocotools.
    from pycocotools.coco import COCO

    with page.expect_download() as download:
        page.click("#coco")
    path = tmp_path / "annotations.json"
    download.value.save_as(path)
    coco = COCO(str(path))
    assert [im["file_name"] for im in coco.loadImgs(coco.getImgIds())] == ["example.png"]
    whole = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds())]
    assert len(whole) == 2
    np.testing.assert_array_equal(whole[0] & ~whole[1], first)
    np.testing.assert_array_equal(whole[1], second)

    if os.environ.get("SKIPCLICK_APP_SCREENSHOT"):
        ui.click(*_deepest(red & ~second), positive=True)
        page.screenshot(path=os.environ["SKIPCLICK_APP_SCREENSHOT"])

    # A bad upload through the file picker: a clear message on the page, and the app goes on.
    bad = tmp_path / "notes.png"
    bad.write_text("not really a picture")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('message').textContent.includes('Could not open')")
    assert "not an image: the file format is not recognised" in page.inner_text("#message")
    ui.open_example()
    ui.click(*_deepest(blue))
    np.testing.assert_array_equal(ui.mask(0), m1)
    assert not remote, f"the page fetched something remote: {remote}"
    page.close()
