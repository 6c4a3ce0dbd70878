"""The Label Studio ML backend against a real Label Studio server (label-studio 1.23.2 from PyPI,
in its own venv built by scripts/setup_label_studio.sh, cached across runs) on 127.0.0.1.

The server starts once per session from a copy of the venv's migrated data-dir template (a few
seconds instead of ~45 s of migrations) and is stopped by its PID at the end. The tests skip only
when the venv cannot be built (no network to PyPI on a fresh machine), saying why.
"""

import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.helpers import stop_process

pytest.importorskip("starlette", reason="the app needs the 'app' extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the app needs the 'app' extra (starlette, uvicorn)")

from annotation_server import free_port, png, sample_image, serve, trained_model  # noqa: E402

pytestmark = pytest.mark.label_studio

ROOT = pathlib.Path(__file__).parents[1]
LS_VERSION = "1.23.2"
BUILD_TIMEOUT_S, START_TIMEOUT_S = 1200, 240
USER, PASSWORD, TOKEN = "ci@example.com", "skipclick-ci-pass", "skipclick0ci0token0123456789"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Disc" smart="true"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="Disc"/></BrushLabels>
</View>"""


@pytest.fixture(scope="session")
def ls_venv() -> pathlib.Path:
    """The Label Studio venv (built on first use; skip with the reason if it cannot be)."""
    try:
        out = subprocess.run(["bash", str(ROOT / "scripts/setup_label_studio.sh")], capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the label-studio venv could not be built within {BUILD_TIMEOUT_S} s")
    if out.returncode != 0:
        pytest.skip("the label-studio venv cannot be built (scripts/setup_label_studio.sh): "
                    + out.stderr.strip()[-800:])
    return pathlib.Path(out.stdout.strip().splitlines()[-1])


def decode_with_sdk(venv: pathlib.Path, rles: list[list[int]], tmp: pathlib.Path) -> list[np.ndarray]:
    """Label Studio's own decoder (label_studio_sdk.converter.brush.decode_rle, run in the
    label-studio venv) on each RLE -> flat uint8 arrays."""
    (tmp / "rles.json").write_text(json.dumps(rles))
    script = ("import json, sys, numpy as np\n"
              "from label_studio_sdk.converter.brush import decode_rle\n"
              "rles = json.load(open(sys.argv[1] + '/rles.json'))\n"
              "np.savez(sys.argv[1] + '/decoded.npz', *[decode_rle(r) for r in rles])\n")
    subprocess.run([str(venv / "bin/python"), "-c", script, str(tmp)], check=True, timeout=300)
    with np.load(tmp / "decoded.npz") as decoded:
        return [decoded[f"arr_{i}"] for i in range(len(rles))]


def test_brush_rle_round_trip_through_label_studio_sdk(ls_venv, tmp_path):
    from skipclick_jax.annotation.brush_rle import mask_to_rle

    rng = np.random.default_rng(0)
    masks = [np.ones((1, 1), bool), np.zeros((1, 1), bool), rng.random((37, 41)) > 0.5,
             np.zeros((300, 400), bool), np.ones((300, 400), bool),  # runs longer than 2**16 values
             rng.random((64, 64)) > 0.9]
    band = np.zeros((333, 517), bool)
    band[100:250, 17:400] = True
    masks.append(band)
    decoded = decode_with_sdk(ls_venv, [mask_to_rle(m) for m in masks], tmp_path)
    for mask, flat in zip(masks, decoded):
        expected = np.repeat(np.where(mask, 255, 0).astype(np.uint8).ravel(), 4)
        np.testing.assert_array_equal(flat, expected)


@pytest.fixture(scope="session")
def label_studio(ls_venv, tmp_path_factory):
    """A Label Studio server on a free 127.0.0.1 port -> (base URL, API token)."""
    data_dir = tmp_path_factory.mktemp("label-studio") / "data"
    shutil.copytree(ls_venv / "data-template", data_dir)
    port = free_port()
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LATEST_VERSION_CHECK="false",
               COLLECT_ANALYTICS="false", SENTRY_DSN="", FRONTEND_SENTRY_DSN="",
               USE_DEFAULT_BANNED_SUBNETS="false")  # test machine only: lets it call a backend on 127.0.0.1
    for key in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE"):
        env.pop(key, None)
    log = open(data_dir.parent / "label-studio.log", "w+")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(ls_venv / "bin/label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
         "--port", str(port), "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
         "--enable-legacy-api-token"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"label-studio exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if json.loads(response.read()).get("status") == "UP":
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() - t0 > START_TIMEOUT_S:
                log.seek(0)
                pytest.fail(f"label-studio not UP within {START_TIMEOUT_S} s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        # label-studio moves to another port silently when its port is taken: make sure this is it.
        status, version = ls_api(url, "GET", "/api/version")
        assert status == 200 and version["release"] == LS_VERSION, version
        yield url
    finally:
        stop_process(proc, log)


def ls_api(url, method, path, body=None, raw=None, content_type="application/json"):
    """One Label Studio API call with the token -> (status, JSON)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Authorization": f"Token {TOKEN}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:2000]


def keypoint(row, col, positive, height, width):
    """A smart keypoint on the centre of pixel (row, col), as Label Studio's editor sends it."""
    return dict(type="keypointlabels", from_name="kp", to_name="image", origin="manual", is_positive=positive,
                original_width=width, original_height=height, image_rotation=0,
                value=dict(x=100 * (col + 0.5) / width, y=100 * (row + 0.5) / height, width=0.5,
                           keypointlabels=["Disc"]))


def test_interactive_annotating_through_label_studio(label_studio, ls_venv, request, tmp_path):
    from skipclick_jax.app import Annotator, build_app
    from skipclick_jax.predictor import Predictor

    model, _ = trained_model(str(request.config.cache.mkdir("tiny-trained")))
    image = sample_image(4)
    height, width = image.shape[:2]
    clicks = [(48, 42, True), (20, 100, False), (60, 30, True)]
    reference = Predictor(model)
    reference.set_image(image)
    for row, col, positive in clicks:
        reference.add_click(row, col, positive)
    expected = reference.probability > 0.5
    assert 0 < expected.sum() < expected.size

    annotator = Annotator(Predictor(model), "tiny trained")
    app = build_app(annotator)
    with serve(app) as backend:
        status, project = ls_api(label_studio, "POST", "/api/projects",
                                 dict(title="SkipClick test", label_config=CONFIG))
        assert status == 201, project
        boundary = "skipclick-boundary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"shapes.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + png(image) + f"\r\n--{boundary}--\r\n".encode()
        status, imported = ls_api(label_studio, "POST", f"/api/projects/{project['id']}/import", raw=form,
                                  content_type=f"multipart/form-data; boundary={boundary}")
        assert status == 201 and imported["task_count"] == 1, imported
        status, tasks = ls_api(label_studio, "GET", f"/api/tasks?project={project['id']}")
        (task,) = tasks["tasks"] if isinstance(tasks, dict) else tasks
        assert task["data"]["image"].startswith("/data/upload/")

        # Registering: Label Studio checks /health and sends /setup (its host and token).
        status, ml = ls_api(label_studio, "POST", "/api/ml", dict(
            url=backend + "/label-studio", project=project["id"], title="SkipClick", is_interactive=True))
        assert status == 201 and ml["readable_state"] == "Connected", ml

        context = dict(result=[keypoint(r, c, p, height, width) for r, c, p in clicks])
        t0 = time.monotonic()
        status, out = ls_api(label_studio, "POST", f"/api/ml/{ml['id']}/interactive-annotating",
                             dict(task=task["id"], context=context))
        print(f"interactive-annotating round trip: {time.monotonic() - t0:.2f} s")
        assert status == 200 and "errors" not in out, out
        (region,) = out["data"]["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Disc"]
        assert (region["original_width"], region["original_height"]) == (width, height)
        (decoded,) = decode_with_sdk(ls_venv, [region["value"]["rle"]], tmp_path)
        rgba = decoded.reshape(height, width, 4)
        np.testing.assert_array_equal(rgba, np.repeat(np.where(expected, 255, 0).astype(np.uint8)[..., None], 4, -1))

        # Bad input through the server: Label Studio's own error form (HTTP 200, "errors").
        status, out = ls_api(label_studio, "POST", f"/api/ml/{ml['id']}/interactive-annotating",
                             dict(task=task["id"], context=dict(result=[])))
        assert status == 200 and "400" in out["errors"][0] and "/label-studio/predict" in out["errors"][0], out
        # ... and the backend keeps serving: the same clicks again, the same mask.
        status, again = ls_api(label_studio, "POST", f"/api/ml/{ml['id']}/interactive-annotating",
                               dict(task=task["id"], context=context))
        assert status == 200 and again["data"]["result"][0]["value"]["rle"] == region["value"]["rle"]
        # The image was fetched from Label Studio each time but encoded once; the repeat ran no click.
        engine = app.state.label_studio.engine
        assert (engine.encodes, engine.clicks_run) == (1, len(clicks))
