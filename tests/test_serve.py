"""The web demo (``bicm serve``): HTTP behaviour with a tiny model, then the real command in a
headless browser with the shipped shapes model (skipped without chromium + chromedriver)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("python_multipart")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

import bicm.encoder  # noqa: E402
from bicm.api import Grounder  # noqa: E402
from bicm.jsonl import finite  # noqa: E402
from bicm.serve import create_app  # noqa: E402
from bicm.cache import CacheKey, MemoryFeatureCache  # noqa: E402
from bicm.service import DemoService, Example, ServeLimits  # noqa: E402
from bicm.shapes.examples import example_image, example_queries  # noqa: E402

from .helpers import BICM, make_service  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def service(tiny_backbone):
    svc = make_service(tiny_backbone)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def png_bytes(size=(120, 90), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def ground(client, queries="the red square", **fields):
    data = {"queries": queries, "proposals": "selective-search", "components": "qam,com,sf", **fields}
    files = data.pop("files", None)
    if files is None and "example" not in data:
        data["example"] = "shapes"
    return client.post("/api/ground", data=data, files=files)


# ---------------------------------------------------------------------------------- pages
def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="image-file"' in page.text and "Content-Security-Policy" in page.headers
    info = client.get("/api/info").json()
    assert info["model"] == "tiny"
    assert info["components"] == ["qam", "com", "sf"] and info["proposal_sources"] == ["selective-search", "none"]
    assert [e["name"] for e in info["examples"]] == ["shapes"]
    assert info["examples"][0]["queries"] == example_queries()
    assert info["limits"]["max_upload_bytes"] == 20 * 1024 * 1024
    picture = client.get(info["examples"][0]["url"])
    assert picture.status_code == 200 and picture.content == example_image().read_bytes()


def test_unknown_routes_answer_json(client):
    missing = client.get("/etc/passwd")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = client.get("/api/ground")
    assert wrong.status_code == 405 and "error" in wrong.json()


# ------------------------------------------------------------------------- the result
def test_result_shape(client, tiny_backbone):
    queries = ["the red square", "the blue circle on the left"]
    response = ground(client, "\n".join(queries) + "\n\n")
    assert response.status_code == 200, response.text
    data = response.json()
    size = __import__("PIL.Image").Image.open(example_image()).size
    assert data["image"]["name"] == "example:shapes" and (data["image"]["width"], data["image"]["height"]) == size
    assert set(data["timing"]) == {"wait_s", "ground_s", "render_s", "total_s"}
    assert [item["result"]["query"] for item in data["results"]] == queries
    expected = Grounder(tiny_backbone).ground_many(example_image(), queries, _source())
    for item, want in zip(data["results"], expected):
        result = item["result"]  # GroundingResult.to_dict
        want_dict = want.to_dict()
        assert set(result) == set(want_dict)
        assert result["box"] == want_dict["box"] and result["selected"] == want_dict["selected"]
        assert result["score"] == pytest.approx(want_dict["score"], abs=1e-5)
        assert len(result["candidates"]) == len(want_dict["candidates"])
        assert {"box", "score", "selected", "candidates", "components", "notes"} <= set(result)
        top = item["top"]
        assert 0 < len(top) <= 8 and top[0] in result["selected"]
        scores = [result["candidates"][i]["score"] for i in top]
        assert scores[1:] == sorted(scores[1:], reverse=True)
        assert item["picture"].startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(item["picture"].split(",", 1)[1])))
        assert picture.width > 300 and picture.height > 200


def _source():
    from bicm.proposals.selective import SelectiveSearch

    return SelectiveSearch(top_n=30)


def test_components_and_proposals_choices(client):
    data = ground(client, components="com", proposals="selective-search").json()
    result = data["results"][0]["result"]
    assert result["components"] == ["com"] and result["qam_box"] is None
    qam_only = ground(client, components="qam", proposals="none").json()["results"][0]["result"]
    assert qam_only["components"] == ["qam"] and len(qam_only["candidates"]) <= 1


def test_second_request_reuses_the_image_features(tiny_backbone, monkeypatch):
    service = make_service(tiny_backbone)
    encoded: list[int] = []
    proposed: list[int] = []
    real_encode = bicm.encoder.encode_crops
    real_propose = type(service.sources["selective-search"]).propose

    def counting_encode(backbone, image, boxes, *args, **kwargs):
        encoded.append(int(boxes.shape[0]))
        return real_encode(backbone, image, boxes, *args, **kwargs)

    def counting_propose(self, image, key=None):
        proposed.append(1)
        return real_propose(self, image, key)

    monkeypatch.setattr(bicm.encoder, "encode_crops", counting_encode)
    monkeypatch.setattr(type(service.sources["selective-search"]), "propose", counting_propose)
    with TestClient(create_app(service)) as client:
        upload = {"image": ("scene.png", example_image().read_bytes(), "image/png")}
        first = ground(client, "the red square", files=upload).json()
        crops_first, proposals_first = sum(encoded), len(proposed)
        second = ground(client, "the large star", files=upload).json()
    assert first["cache"]["image_seen_before"] is False
    assert second["cache"]["image_seen_before"] is True and second["cache"]["hits"] > 0
    assert proposals_first == 1 and len(proposed) == 1  # selective search ran once
    n_props = len(first["results"][0]["result"]["candidates"])
    assert crops_first >= n_props - 1
    assert sum(encoded) - crops_first <= 1  # the second request encoded at most its QAM box
    # the cached features give the answer computed from scratch
    fresh = Grounder(tiny_backbone).ground(example_image(), "the large star", _source())
    assert second["results"][0]["result"]["box"] == json.loads(json.dumps(fresh.to_dict()))["box"]
    service.close()


def test_kam_is_offered_only_with_a_kam_model(tiny_backbone, client):
    from bicm.kam import KamConfig, KamMLP, KamModel

    refused = ground(client, components="qam,com,sf,kam")
    assert refused.status_code == 400 and "--kam" in refused.json()["error"]
    assert "kam" not in client.get("/api/info").json()["components"]

    torch.manual_seed(0)
    kam = KamModel(KamMLP(tiny_backbone.embed_dim, 16).eval(), KamConfig(hidden=16), tiny_backbone.fingerprint(), tiny_backbone.name)
    example = Example("shapes", example_image(), tuple(example_queries()))
    service = DemoService(Grounder(tiny_backbone, kam=kam), limits=ServeLimits(), top_n=30, examples={"shapes": example})
    with TestClient(create_app(service)) as kam_client:
        info = kam_client.get("/api/info").json()
        assert info["components"] == ["qam", "com", "sf", "kam"] and "kam" in info["default_components"]
        first = ground(kam_client, components="qam,com,sf,kam")
        assert first.status_code == 200, first.text
        result = first.json()["results"][0]["result"]
        assert result["components"] == ["qam", "com", "sf", "kam"]
        assert all(c["s_kam"] is not None for c in result["candidates"])
        expected = Grounder(tiny_backbone, kam=kam).ground(example_image(), "the red square", _source())
        assert result["box"] == expected.to_dict()["box"]
        again = ground(kam_client, "the large star", components="qam,com,sf,kam").json()
        assert again["cache"]["image_seen_before"] and again["cache"]["hits"] > 0
        without = ground(kam_client, components="qam,com,sf").json()["results"][0]["result"]
        assert all(c["s_kam"] is None for c in without["candidates"])
    service.close()


def test_memory_cache_keeps_the_last_images():
    cache = MemoryFeatureCache(images=2, texts=2)
    entry = ({"f": torch.zeros(2)}, {})
    crop = "m 224x224,shortest"
    for digest in ("aaa", "bbb", "ccc"):
        cache.put_many({CacheKey("props", "selective-search", digest): entry, CacheKey("crop", crop, digest, "1.00,2.00,3.00,4.00"): entry})
    assert not cache.has_image("aaa") and cache.has_image("bbb") and cache.has_image("ccc")
    assert cache.get_many([CacheKey("crop", crop, "bbb", "1.00,2.00,3.00,4.00")])  # touches bbb
    cache.put_many({CacheKey("props", "selective-search", "ddd"): entry})
    assert cache.has_image("bbb") and not cache.has_image("ccc")
    cache.put_many({CacheKey("text", "m", None, t): entry for t in ("a", "b", "c")})
    assert set(cache.get_many([CacheKey("text", "m", None, t) for t in ("a", "b", "c")])) == {CacheKey("text", "m", None, "b"), CacheKey("text", "m", None, "c")}
    assert CacheKey("text", "m", None, "a|b").image is None
    assert CacheKey("image", crop, "eee").image == "eee"


def test_finite_turns_nan_into_null():
    assert finite({"a": [float("nan"), 1.5, float("inf")], "b": (2, "x")}) == {"a": [None, 1.5, None], "b": [2, "x"]}


# ------------------------------------------------------------------------------ refusals
def test_bad_files_get_a_readable_4xx(client):
    not_image = ground(client, files={"image": ("holiday.jpg", b"this is not a picture", "image/jpeg")})
    assert not_image.status_code == 400
    message = not_image.json()["error"]
    assert "holiday.jpg" in message and "bicm-serve-" not in message and "/tmp" not in message
    truncated = ground(client, files={"image": ("cut.png", png_bytes((300, 300))[:400], "image/png")})
    assert truncated.status_code == 400 and "cut.png" in truncated.json()["error"]
    empty = ground(client, files={"image": ("empty.png", b"", "image/png")})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]


def test_upload_limits(tiny_backbone):
    service = make_service(tiny_backbone, max_upload_bytes=50_000, max_pixels=100 * 100)
    with TestClient(create_app(service)) as client:
        big = os.urandom(60_000)
        too_big = ground(client, files={"image": ("big.png", big, "image/png")})
        assert too_big.status_code == 413 and "MB" in too_big.json()["error"]
        huge = ground(client, files={"image": ("wide.png", png_bytes((200, 150)), "image/png")})
        assert huge.status_code == 413 and "pixels" in huge.json()["error"] and "--max-image-pixels" not in huge.json()["error"]
        fine = ground(client, files={"image": ("small.png", png_bytes((100, 80)), "image/png")}, proposals="none", components="qam")
        assert fine.status_code == 200, fine.text
        # a body sent without Content-Length (chunked) is cut off while it streams in
        boundary = "bicmtestboundary"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"queries\"\r\n\r\nthe square\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode() + b"\0" * 400_000 + f"\r\n--{boundary}--\r\n".encode()
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        streamed = client.post("/api/ground", content=chunks, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413 and "error" in streamed.json()
    service.close()


def test_examples_by_name_only(client):
    for name in ("../../../etc/passwd", str(example_image()), "shapes/../shapes", ""):
        response = ground(client, example=name)
        assert response.status_code in (400, 404) and "error" in response.json()
        assert "root:" not in response.text
    assert client.get("/api/examples/..%2F..%2Fetc%2Fpasswd.png").status_code == 404
    assert client.get("/api/examples/nope.png").json()["error"].startswith("unknown example")
    # a path in the image field is text, not a file: refused
    as_text = client.post("/api/ground", data={"image": str(example_image()), "queries": "the square"})
    assert as_text.status_code == 400 and "choose an image" in as_text.json()["error"]


def test_method_refusals_are_readable(client):
    cases = {
        "detections file": dict(proposals="dets.json"),
        "SF without QAM": dict(components="com,sf"),
        "unknown component": dict(components="qam,xyz"),
        "KAM without a model": dict(components="qam,com,kam"),
        "no component": dict(components=" , "),
        "COM without proposals": dict(components="com", proposals="none"),
        "no phrase": dict(queries=" \n \n"),
        "too many phrases": dict(queries="\n".join(f"thing {i}" for i in range(17))),
        "long phrase": dict(queries="x" * 301),
    }
    for what, fields in cases.items():
        response = ground(client, **fields)
        assert response.status_code == 400, what
        assert response.json()["error"], what


def test_busy_server_answers_503_and_slow_work_504(tiny_backbone, monkeypatch):
    service = make_service(tiny_backbone, timeout_s=0.3)
    with TestClient(create_app(service)) as client:
        with service.cpu_lock:  # another request is computing
            busy = ground(client, proposals="none", components="qam")
        assert busy.status_code == 503 and "busy" in busy.json()["error"]

        def slow(*args, **kwargs):
            time.sleep(1.5)
            return {}

        monkeypatch.setattr(service, "ground", slow)
        late = ground(client, proposals="none", components="qam")
        assert late.status_code == 504 and "no answer within 0.3 s" in late.json()["error"]
    service.close()


def test_cli_serve_refuses_a_taken_port():
    from typer.testing import CliRunner

    from bicm.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2
    assert "cannot listen on 127.0.0.1" in result.output


# ------------------------------------------------------------------ the real command, a browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server():
    """``bicm serve`` (shipped shapes model, CPU) in a subprocess on a free port."""
    port = free_port()
    log = ARTIFACTS / "serve-e2e.log"
    ARTIFACTS.mkdir(exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*BICM, "serve", "--port", str(port), "--device", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(url + "/api/info", timeout=2) as response:
                        info = json.loads(response.read())
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"bicm serve did not start (exit {process.poll()}):\n{log.read_text()[-2000:]}")
                    time.sleep(0.3)
            yield url, info
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_cli_serve_over_http(live_server):
    url, info = live_server
    assert info["model"] == "shapes" and info["naming"] == "shapes"
    assert info["proposal_sources"][0] == "shapes-detector"  # the shapes world's own detector first, as bicm demo
    with urllib.request.urlopen(url + "/") as response:
        assert b"<title>bicm" in response.read()


def _browser():
    """Headless Debian chromium through the system chromedriver, or a skip reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed"
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return None, "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium manager must not try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(executable_path=driver), options=options), ""
    except Exception as exc:  # a browser that cannot start here is a skip, not a failure
        return None, f"chromium did not start: {str(exc).splitlines()[0][:200]}"


@pytest.mark.slow
def test_browser_end_to_end(live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, reason = _browser()
    if browser is None:
        pytest.skip(reason)
    url, _ = live_server
    phrase = example_queries()[0]
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state") == "ready")
        browser.find_element(By.ID, "image-file").send_keys(str(example_image()))
        assert browser.find_element(By.ID, "use-upload").is_selected()
        queries = browser.find_element(By.ID, "queries")
        queries.clear()
        queries.send_keys(phrase)
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
        assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done", browser.find_element(By.ID, "error").text
        sections = browser.find_elements(By.CSS_SELECTOR, "#results section.result")
        assert len(sections) == 1
        box = json.loads(sections[0].get_attribute("data-box"))
        picture = sections[0].find_element(By.CSS_SELECTOR, "img.result-picture")
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture))
        assert browser.execute_script("return arguments[0].naturalWidth", picture) > 0
        assert len(sections[0].find_elements(By.CSS_SELECTOR, "table tr")) > 1
        assert browser.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
        timing = browser.find_element(By.ID, "timing").text

        ARTIFACTS.mkdir(exist_ok=True)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(int(height) + 160, 4000))  # the window's frame takes some
        shot = ARTIFACTS / "serve-page.png"
        browser.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}\n{timing}")

        # a mistake comes back as a readable message on the page
        queries = browser.find_element(By.ID, "queries")
        queries.clear()
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state") == "error")
        assert "phrase" in browser.find_element(By.ID, "error").text
    finally:
        browser.quit()

    # the page shows what the library computes in-process on the same inputs (the default source: the shapes detector)
    from bicm.shapes.examples import EXAMPLE_SELECTION

    grounder = Grounder.from_pretrained(
        "shapes", device="cpu", proposals="shapes-detector", name_with="shapes", selection=EXAMPLE_SELECTION
    )
    expected = grounder.ground(example_image(), phrase)
    assert box == pytest.approx([round(v, 2) for v in expected.box], abs=0.01)

