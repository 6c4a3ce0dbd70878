"""Annotation-tool integrations without the tools: the click engine (encoding cached per image
content, clicks replayed from the cached prefix), the Label Studio ML backend protocol under
/label-studio of the app (HTTP on 127.0.0.1: responses, bad input, many concurrent clients with
bounded caches), the COCO export, and the CVAT interactor through nuclio-sdk's test platform.

The real Label Studio server: tests/test_label_studio_server.py.
"""

import base64
import concurrent.futures
import importlib.util
import json
import pathlib
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the app needs the 'app' extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the app needs the 'app' extra (starlette, uvicorn)")

from annotation_server import free_port, png, sample_image, serve, trained_model  # noqa: E402

from skipclick_jax.annotation.engine import AnnotationError, ClickEngine, order_clicks  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Disc" smart="true"/><Label value="Square" smart="true"/><Label value="Other"/>
  </KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="Disc"/><Label value="Square"/></BrushLabels>
</View>"""
MAX_SESSIONS, MAX_IMAGES = 3, 4


@pytest.fixture(scope="module")
def model(request):
    return trained_model(str(request.config.cache.mkdir("tiny-trained")))


@pytest.fixture(scope="module")
def predictor(model):
    from skipclick_jax.predictor import Predictor

    return Predictor(model[0])


def reference_probability(predictor, image, clicks):
    """A fresh Predictor session: set_image, then the clicks in order."""
    predictor.set_image(image)
    for row, col, positive in clicks:
        prob = predictor.add_click(row, col, positive)
    return prob


# ----------------------------------------------------------------------------- click engine

def test_engine_encodes_once_and_runs_only_new_clicks(predictor):
    image = sample_image(1)
    data = png(image)
    engine = ClickEngine(predictor, max_images=2)
    clicks = [(48, 42, True), (20, 100, False), (60, 50, True)]
    for n in range(1, len(clicks) + 1):
        prob = engine.probability(data, clicks[:n])
        assert engine.encodes == 1 and engine.clicks_run == n
        np.testing.assert_array_equal(prob, reference_probability(predictor, image, clicks[:n]))
    # Removing the last click costs nothing; a changed last click one click run.
    np.testing.assert_array_equal(engine.probability(data, clicks[:2]),
                                  reference_probability(predictor, image, clicks[:2]))
    assert engine.clicks_run == 3
    changed = clicks[:2] + [(70, 30, True)]
    np.testing.assert_array_equal(engine.probability(data, changed),
                                  reference_probability(predictor, image, changed))
    assert engine.encodes == 1 and engine.clicks_run == 4
    # A click different from the first one: everything again, still no new encode.
    engine.probability(data, [(10, 10, True)])
    assert engine.encodes == 1 and engine.clicks_run == 5


def test_engine_cache_is_bounded_lru(predictor):
    engine = ClickEngine(predictor, max_images=2)
    images = [png(sample_image(s)) for s in range(3)]
    for data in images:
        engine.probability(data, [(40, 40, True)])
    assert len(engine) == 2 and engine.encodes == 3
    engine.probability(images[2], [(40, 40, True)])  # cached
    assert engine.encodes == 3
    engine.probability(images[0], [(40, 40, True)])  # evicted before: encoded again
    assert engine.encodes == 4 and len(engine) == 2


@pytest.mark.parametrize("data, clicks, status, words", [
    (b"", [(1, 1, True)], 422, "empty"),
    (b"not an image at all", [(1, 1, True)], 422, "not an image"),
    (None, [], 400, "no clicks"),
    (None, [(96, 5, True)], 400, "outside"),
    (None, [(5, -1, True)], 400, "outside"),
])
def test_engine_bad_input(predictor, data, clicks, status, words):
    engine = ClickEngine(predictor, max_images=2)
    with pytest.raises(AnnotationError, match=words) as e:
        engine.probability(png(sample_image(0)) if data is None else data, clicks)
    assert e.value.status == status


def test_engine_refuses_oversized_images(predictor):
    engine = ClickEngine(predictor, max_pixels=96 * 128 - 1)
    with pytest.raises(AnnotationError, match="too large: 128x96") as e:
        engine.probability(png(sample_image(0)), [(1, 1, True)])
    assert e.value.status == 413 and engine.encodes == 0


def test_order_clicks_keeps_the_previous_order():
    previous = [(5, 5, True), (9, 9, False), (7, 7, True)]
    # The same sets plus a new negative: the old order, the new click last.
    assert order_clicks(previous, [(7, 7), (5, 5)], [(9, 9), (1, 2)]) == previous + [(1, 2, False)]
    # A removed click drops out, the rest keeps its order.
    assert order_clicks(previous, [(7, 7), (5, 5)], []) == [(5, 5, True), (7, 7, True)]
    # No history: positives first.
    assert order_clicks([], [(3, 3)], [(4, 4)]) == [(3, 3, True), (4, 4, False)]


# ----------------------------------------------------------------------------- brush RLE

def test_brush_rle_header_and_runs():
    """The format's fields by hand (the round trip through Label Studio's own decoder:
    test_label_studio_server.py)."""
    from skipclick_jax.annotation.brush_rle import mask_to_rle

    mask = np.zeros((2, 3), bool)
    mask[1, 1:] = True  # pixels 0 0 0 0 1 1 -> values 0 x16, 255 x8
    bits = "".join(f"{b:08b}" for b in mask_to_rle(mask))
    assert int(bits[:32], 2) == 24 and int(bits[32:37], 2) == 7
    assert [int(bits[37 + 4 * i: 41 + 4 * i], 2) for i in range(4)] == [2, 3, 7, 15]
    records = bits[53:]
    # run of 16 zeros: 1, field 01 (4 bits), 15, value 0; run of 8 x 255: 1, field 00 (3 bits), 7, 255
    assert records.startswith("1" + "01" + "1111" + "00000000" + "1" + "00" + "111" + "11111111")
    assert set(records[30:]) <= {"0"} and len(bits) % 8 == 0


# ----------------------------------------------------------------------------- the app over HTTP

@pytest.fixture(scope="module")
def app_server(model):
    from skipclick_jax.app import Annotator, build_app

    from skipclick_jax.predictor import Predictor

    annotator = Annotator(Predictor(model[0]), "tiny trained", max_sessions=MAX_SESSIONS)
    app = build_app(annotator, max_pixels=200_000)
    app.state.label_studio.engine.max_images = MAX_IMAGES
    with serve(app) as url:
        yield url, annotator, app.state.label_studio


def http(url, body=None, method=None, raw=None, headers=None):
    """-> (status, parsed JSON or bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, payload, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(payload) if "json" in kind else payload)


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def keypoint(x, y, positive=True, label="Disc"):
    return dict(type="keypointlabels", from_name="kp", to_name="image", is_positive=positive,
                original_width=128, original_height=96, value=dict(x=x, y=y, width=1, keypointlabels=[label]))


def predict_body(image_url, results, config=CONFIG, project="7.1700000000"):
    return dict(tasks=[dict(id=1, data=dict(image=image_url))], project=project, label_config=config,
                params=dict(login=None, password=None, context=dict(result=results)))


def test_label_studio_protocol(app_server, predictor):
    url, _, backend = app_server
    ls = url + "/label-studio"
    status, health = http(ls + "/health")
    assert status == 200 and health["status"] == "UP" and health["model_class"] == "SkipClick"
    status, setup = http(ls + "/setup", dict(project="7.1700000000", schema=CONFIG,
                                             hostname="http://127.0.0.1:1", access_token="t"))
    assert status == 200 and setup == {"model_version": "skipclick-jax"}
    status, hook = http(ls + "/webhook", dict(action="ANNOTATION_CREATED", project={"id": 7}))
    assert status == 200 and hook["status"] == "ok"
    # No context (batch pre-annotation): no results.
    body = predict_body(data_url(sample_image(2)), [])
    body["params"]["context"] = None
    assert http(ls + "/predict", body) == (200, {"results": []})

    image = sample_image(2)
    points = [keypoint(33.2, 50.5), keypoint(80.0, 25.0, positive=False)]
    status, out = http(ls + "/predict", predict_body(data_url(image), points))
    assert status == 200, out
    (prediction,) = out["results"]
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Disc"]
    assert (region["from_name"], region["to_name"]) == ("mask", "image")
    assert (region["original_width"], region["original_height"]) == (128, 96)
    assert region["value"]["format"] == "rle" and all(0 <= v < 256 for v in region["value"]["rle"])
    # x% of the width, y% of the height -> the pixel the point falls in.
    expected = reference_probability(predictor, image, [(48, 42, True), (24, 102, False)]) > 0.5
    from skipclick_jax.annotation.brush_rle import mask_to_rle

    assert region["value"]["rle"] == mask_to_rle(expected)
    assert 0.0 < prediction["score"] <= 1.0


def test_label_studio_rectangle_clips_the_mask(app_server, predictor):
    url, _, _ = app_server
    image = sample_image(2)
    box = dict(type="rectanglelabels", from_name="box", to_name="image",
               value=dict(x=25.0, y=25.0, width=25.0, height=50.0, rectanglelabels=["Disc"]))
    status, out = http(url + "/label-studio/predict", predict_body(data_url(image), [keypoint(33.2, 50.5), box]))
    assert status == 200, out
    expected = reference_probability(predictor, image, [(48, 42, True)]) > 0.5
    expected[:24] = expected[73:] = False
    expected[:, :32] = expected[:, 65:] = False
    from skipclick_jax.annotation.brush_rle import mask_to_rle

    assert out["results"][0]["result"][0]["value"]["rle"] == mask_to_rle(expected)


def test_label_studio_fetches_from_the_host_given_at_setup(app_server):
    """A relative task URL is fetched from the setup's hostname with its token."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    seen = []

    async def upload(request):
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != "Token secret":
            return Response("no", status_code=401)
        return Response(png(sample_image(3)), media_type="image/png")

    url, _, _ = app_server
    with serve(Starlette(routes=[Route("/data/upload/1/a.png", upload)])) as fake_ls:
        for token, status in (("wrong", 502), ("secret", 200)):
            http(url + "/label-studio/setup", dict(project="9.1", schema=CONFIG, hostname=fake_ls,
                                                   access_token=token))
            code, out = http(url + "/label-studio/predict",
                             predict_body("/data/upload/1/a.png", [keypoint(30, 50)], project="9.1"))
            assert code == status, out
            if status == 502:
                assert "HTTP 401" in out["detail"] and "token" in out["detail"]
    assert seen[:2] == ["Token wrong", "Token secret"]


def test_label_studio_environment_and_personal_access_token(app_server, monkeypatch):
    """Without /setup: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; a personal access token (JWT)
    is exchanged once at /api/token/refresh/ for a Bearer access token."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    refreshes = []

    async def refresh(request):
        refreshes.append((await request.json())["refresh"])
        return JSONResponse({"access": "short-lived"})

    async def upload(request):
        if request.headers.get("authorization") != "Bearer short-lived":
            return Response("no", status_code=401)
        return Response(png(sample_image(3)), media_type="image/png")

    url, _, _ = app_server
    app = Starlette(routes=[Route("/api/token/refresh/", refresh, methods=["POST"]),
                            Route("/data/upload/2/b.png", upload)])
    with serve(app) as fake_ls:
        monkeypatch.setenv("LABEL_STUDIO_URL", fake_ls)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "header.payload.signature")
        for x in (30, 31):
            code, out = http(url + "/label-studio/predict",
                             predict_body("/data/upload/2/b.png", [keypoint(x, 50)], project="11.1"))
            assert code == 200, out
    assert refreshes == ["header.payload.signature"]


BIG = sample_image(0, 500, 500)  # 250,000 pixels > the server's 200,000


@pytest.mark.parametrize("body, status, words", [
    (predict_body(data_url(sample_image(0)), []), 400, "no keypointlabels"),
    (predict_body(data_url(sample_image(0)), [dict(type="rectanglelabels", value=dict(
        x=1, y=1, width=5, height=5, rectanglelabels=["Disc"]))]), 400, "no keypointlabels"),
    (predict_body(data_url(sample_image(0)), [keypoint(30, 50, label="Other")]), 400,
     "'Other' is not one of the BrushLabels labels"),
    (predict_body(data_url(sample_image(0)), [keypoint(130, 50)]), 400, "outside the image"),
    (predict_body(data_url(sample_image(0)), [keypoint(30, -0.5)]), 400, "outside the image"),
    (predict_body(data_url(sample_image(0)), [keypoint(30, 50)], config="<View><Image name='i' value='$image'/>"
                                                                       "</View>"), 400, "no <BrushLabels>"),
    (predict_body(data_url(sample_image(0)), [keypoint(30, 50)], config="<View"), 400, "not valid XML"),
    (dict(predict_body(data_url(sample_image(0)), [keypoint(30, 50)]), tasks=[]), 400, "non-empty list"),
    (dict(predict_body("", [keypoint(30, 50)]), tasks=[dict(id=4, data=dict(img="x"))]), 400,
     "task 4 has no image URL under data.image"),
    (predict_body("data:image/png;base64," + base64.b64encode(b"garbage").decode(), [keypoint(30, 50)]), 422,
     "not an image"),
    (predict_body("data:image/png;base64,@@@", [keypoint(30, 50)]), 422, "not valid base64"),
    (predict_body("s3://bucket/a.png", [keypoint(30, 50)]), 422, "only Label Studio paths"),
    (predict_body("/data/upload/1/a.png", [keypoint(30, 50)], project="404.1"), 502, "no Label Studio host"),
    (predict_body(data_url(BIG), [keypoint(30, 50)]), 413, "too large: 500x500"),
])
def test_label_studio_bad_input(app_server, body, status, words):
    url, _, _ = app_server
    code, out = http(url + "/label-studio/predict", body)
    assert code == status and out["status"] == status and words in out["detail"], out
    assert out["errors"] == [out["detail"]]
    assert http(url + "/label-studio/health")[0] == 200  # still serving


def test_label_studio_unreachable_image_and_not_json(app_server):
    url, _, _ = app_server
    dead = f"http://127.0.0.1:{free_port()}/a.png"
    code, out = http(url + "/label-studio/predict", predict_body(dead, [keypoint(30, 50)]))
    assert code == 502 and f"cannot fetch image {dead}" in out["detail"]
    code, out = http(url + "/label-studio/predict", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert code == 400 and "not JSON" in out["detail"]
    code, out = http(url + "/label-studio/setup", dict(schema=CONFIG))
    assert code == 400 and "no 'project'" in out["detail"]


def test_many_concurrent_clients_are_bounded(app_server):
    """24 clients at once on 127.0.0.1 (Label Studio predictions on distinct images and app
    sessions): every request answered within the time bound, caches within their bounds."""
    url, annotator, backend = app_server
    images = [sample_image(10 + i) for i in range(12)]

    def ls_client(i):
        return http(url + "/label-studio/predict", predict_body(data_url(images[i]), [keypoint(30 + i, 50)]))

    def app_client(i):
        """Opens an image and clicks. With more clients than --max-sessions, an upload that finds
        every slot taken by images opened moments ago is refused: a 503 saying the server is full
        (docs/app.md) is the answer; a session evicted (LRU) after its first use answers 404."""
        code, view = http(url + "/api/image", raw=png(images[i]), headers={"Content-Type": "image/png"})
        if code == 503 and "the server is full" in view["error"]:
            return 200, view
        if code == 200:
            code, view = http(url + "/api/click", dict(session=view["session"], row=40, col=40, positive=True))
        return (200, view) if code == 404 and "expired session" in view["error"] else (code, view)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(ls_client, i) for i in range(12)] + [pool.submit(app_client, i) for i in range(12)]
        results = [f.result(timeout=300) for f in futures]
    elapsed = time.monotonic() - t0
    assert [code for code, _ in results] == [200] * 24, [r for r in results if r[0] != 200][:2]
    assert elapsed < 240, f"24 concurrent requests took {elapsed:.0f} s"
    assert len(backend.engine) <= MAX_IMAGES and len(annotator.sessions) <= MAX_SESSIONS
    assert http(url + "/label-studio/health")[1]["cached_images"] <= MAX_IMAGES


# ----------------------------------------------------------------------------- COCO export

def test_coco_export_round_trip(app_server, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    url, annotator, _ = app_server
    image = sample_image(5)
    code, view = http(url + "/api/image", raw=png(image), headers={"Content-Type": "image/png"})
    assert code == 200
    sid = view["session"]
    assert http(url + f"/api/coco?session={sid}")[0] == 400  # no objects yet
    for action, body in (("click", dict(row=48, col=42, positive=True)), ("next", {}),
                         ("click", dict(row=24, col=100, positive=True))):
        assert http(url + f"/api/{action}", dict(session=sid, **body))[0] == 200
    code, coco = http(url + f"/api/coco?session={sid}&file_name=../dir/shapes.png")
    assert code == 200
    masks, _ = annotator.masks(sid)
    assert len(masks) == 2 and all(m.any() for m in masks)
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    dataset = COCO(str(path))
    (img,) = dataset.loadImgs(dataset.getImgIds())
    assert (img["file_name"], img["width"], img["height"]) == ("shapes.png", 128, 96)
    anns = dataset.loadAnns(dataset.getAnnIds(imgIds=[img["id"]]))
    assert len(anns) == 2
    for ann, mask in zip(anns, masks):
        np.testing.assert_array_equal(dataset.annToMask(ann).astype(bool), mask)
        assert ann["area"] == int(mask.sum()) and ann["iscrowd"] == 0
        rows, cols = np.nonzero(mask)
        assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        assert mask_utils.decode(ann["segmentation"]).shape == (96, 128)
    assert http(url + "/api/coco?session=nope")[0] == 404


# ----------------------------------------------------------------------------- CVAT interactor

@pytest.fixture(scope="module")
def cvat(model, monkeypatch_module):
    nuclio_test = pytest.importorskip("nuclio_sdk.test", reason="the CVAT test needs nuclio-sdk (test extra)")
    monkeypatch_module.setenv("SKIPCLICK_CHECKPOINT", str(model[1]))
    monkeypatch_module.setenv("SKIPCLICK_MAX_IMAGES", "2")
    spec = importlib.util.spec_from_file_location("skipclick_cvat_main", ROOT / "integrations/cvat/main.py")
    main = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = main  # the platform finds init_context through the handler's module
    spec.loader.exec_module(main)
    platform = nuclio_test.Platform()
    return platform, main


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def cvat_call(cvat, body):
    import nuclio_sdk

    platform, main = cvat
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    event = nuclio_sdk.Event(body=raw, content_type="application/json", method="POST", path="/")
    response = platform.call_handler(main.handler, event)
    assert response.content_type == "application/json"
    return response.status_code, json.loads(response.body)


def test_cvat_interactor(cvat, predictor):
    image = sample_image(6)
    b64 = base64.b64encode(png(image)).decode()
    code, out = cvat_call(cvat, dict(image=b64, pos_points=[[42.7, 48.2]], neg_points=[[100, 24]]))
    assert code == 200, out
    mask = np.asarray(out["mask"], np.uint8)
    expected = reference_probability(predictor, image, [(48, 42, True), (24, 100, False)]) > 0.5
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    assert out["points"] and all(expected[y, x] for x, y in out["points"])
    engine = cvat[0]._get_handler_context(cvat[1].handler).user_data.engine
    assert engine.encodes == 1 and engine.clicks_run == 2
    # The next click on the same frame: no encode, one click run, the order clicked in kept.
    code, out = cvat_call(cvat, dict(image=b64, pos_points=[[42.7, 48.2], [60, 70]], neg_points=[[100, 24]],
                                     threshold=0.3))
    assert code == 200 and engine.encodes == 1 and engine.clicks_run == 3
    expected = reference_probability(predictor, image, [(48, 42, True), (24, 100, False), (70, 60, True)])
    np.testing.assert_array_equal(np.asarray(out["mask"], np.uint8), (expected > 0.3).astype(np.uint8))
    # obj_bbox clips the mask, in either of its forms.
    for box in ([10, 20, 50, 60], [[10, 20], [50, 60]]):
        code, out = cvat_call(cvat, dict(image=b64, pos_points=[[42.7, 48.2]], neg_points=[], obj_bbox=box))
        mask = np.asarray(out["mask"], bool)
        assert code == 200 and not mask[:20].any() and not mask[61:].any() and not mask[:, 51:].any()


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not JSON"),
    (dict(pos_points=[[1, 1]]), 400, "no 'image'"),
    (dict(image="@@", pos_points=[[1, 1]]), 422, "not valid base64"),
    (dict(image=base64.b64encode(b"junk").decode(), pos_points=[[1, 1]]), 422, "not an image"),
    (dict(image="IMAGE", pos_points=[], neg_points=[[3, 3]]), 400, "no pos_points"),
    (dict(image="IMAGE", pos_points=[[128, 5]]), 400, "outside the 128x96 image"),
    (dict(image="IMAGE", pos_points=[[5, "a"]]), 400, "list of [x, y] pairs"),
    (dict(image="IMAGE", pos_points=[[5, 5]], threshold=2), 400, "threshold must be in"),
    (dict(image="IMAGE", pos_points=[[5, 5]], obj_bbox=[1, 2, 3]), 400, "obj_bbox must hold 4"),
])
def test_cvat_bad_input(cvat, body, status, words):
    if isinstance(body, dict) and body.get("image") == "IMAGE":
        body = dict(body, image=base64.b64encode(png(sample_image(6))).decode())
    code, out = cvat_call(cvat, body)
    assert code == status and words in out["error"], out


def test_cvat_function_specs():
    """function.yaml (CPU) and function-gpu.yaml: an interactor whose handler is main.py's,
    reading the checkpoint from SKIPCLICK_CHECKPOINT; the GPU variant asks for a GPU."""
    yaml = pytest.importorskip("yaml")
    specs = {name: yaml.safe_load((ROOT / "integrations/cvat" / name).read_text())
             for name in ("function.yaml", "function-gpu.yaml")}
    for name, spec in specs.items():
        assert spec["metadata"]["annotations"]["type"] == "interactor", name
        assert spec["metadata"]["annotations"]["min_pos_points"] == 1, name
        assert spec["spec"]["handler"] == "main:handler", name
        env = {e["name"]: e["value"] for e in spec["spec"]["env"]}
        assert env["SKIPCLICK_CHECKPOINT"].startswith(spec["spec"]["volumes"][0]["volumeMount"]["mountPath"])
        assert "integrations/cvat/main.py /opt/nuclio/main.py" in spec["spec"]["build"]["directives"]["postCopy"][-1]["value"]
    assert specs["function-gpu.yaml"]["spec"]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert "nvidia.com/gpu" not in specs["function.yaml"]["spec"]["resources"]["limits"]
    assert specs["function.yaml"]["metadata"]["name"] != specs["function-gpu.yaml"]["metadata"]["name"]
