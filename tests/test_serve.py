"""``tipr serve`` as a user and an attacker use it: real servers on 127.0.0.1, real HTTP, a real browser.

Each server is ``tipr serve --port 0`` in a subprocess (the command a user runs),
over a gallery of random crops indexed by a tiny random model; the address is
read from its first line. Searches are checked against ``tipr search`` and
``search_features``; every refused input against its status and message, with
a normal query answered afterwards.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from tiny import Tiny

from tipr.commands import main
from tipr.pretrained import save_pretrained
from tipr.processing import TIPRProcessor
from tipr.search import build_index, search_features
from tipr.serve.loadtest import Job, image_job, run_load, send, text_job

QUERIES = ["a woman in a red coat with a black backpack", "a man in a grey suit", "a child in yellow shorts",
           "a person carrying a blue umbrella"]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = Tiny.network(init_seed=5).eval()
    processor = TIPRProcessor.for_model(model)
    save_pretrained(model, processor, root / "model")
    photos = root / "photos"
    for i in range(12):
        path = photos / f"cam{i % 3}" / f"p{i:02d}.{'png' if i == 5 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path)
    outside = root / "secret.jpg"  # a file outside the gallery folder, reached by a symlink inside it
    Image.new("RGB", (32, 64), (200, 0, 0)).save(outside)
    (photos / "cam0" / "escape.jpg").symlink_to(outside)
    gallery, _ = build_index(model, processor, photos, root / "gallery", num_workers=0, progress=False)
    return {"root": root, "model": model, "processor": processor, "photos": photos, "gallery": gallery}


class Server:
    """``tipr serve ... --port 0`` in a subprocess; ``url`` from its first line."""

    def __init__(self, setup, *options: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tipr.serve.command", "--model", str(setup["root"] / "model"),
             "--gallery", str(setup["root"] / "gallery"), "--port", "0", *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            raise AssertionError(f"tipr serve did not start: {line}{self.process.stderr.read()[-3000:]}")
        self.url = re.search(r"http://\S+", line).group(0).rstrip("/")
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            raw = response.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw
            return response.status, payload, dict(response.getheaders())
        finally:
            connection.close()

    def job(self, job: Job, token: str | None = None):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            return send(connection, job, token)
        finally:
            connection.close()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def server(setup):
    served = Server(setup)
    yield served
    served.close()


def expected_hits(setup, features, top_k, prefix=None):
    return [[(h.row, h.path) for h in row] for row in search_features(setup["gallery"], features, top_k, prefix=prefix)]


def text_features(setup, queries):
    from tipr.search.query import encode_queries

    return encode_queries(setup["model"], setup["processor"], queries)


def same_ranking(got: list[dict], expected: list[tuple[int, str]], scores=None, tie: float = 1e-5) -> bool:
    """Hits in the expected order, allowing swaps between scores closer than ``tie``."""
    if [h["row"] for h in got] == [r for r, _ in expected]:
        return True
    return sorted(h["row"] for h in got) == sorted(r for r, _ in expected) and all(
        abs(a["score"] - b["score"]) < tie for a, b in zip(got, got[1:]))


def test_text_search_answers_what_tipr_search_prints(setup, server, capsys):
    status, body, headers = server.request("POST", "/api/search/text", json.dumps(
        {"queries": QUERIES[:2], "top_k": 5}).encode(), {"content-type": "application/json"})
    assert status == 200, body
    assert headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in headers["content-security-policy"]
    code = main(["search", "--model", str(setup["root"] / "model"), "--gallery", str(setup["root"] / "gallery"),
                 "--query", QUERIES[0], "--query", QUERIES[1], "--top_k", "5", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    for q, result in enumerate(body["results"], start=1):
        assert result["query"] == QUERIES[q - 1]
        block = printed.split(f"query {q}: {QUERIES[q - 1]}\n")[1].strip().split("\n\n")[0].splitlines()
        cli = [(int(r), float(s), p) for r, s, p in (line.split(maxsplit=2) for line in block)]
        assert [(h["rank"], h["path"]) for h in result["hits"]] == [(r, p) for r, _, p in cli]
        assert np.allclose([h["score"] for h in result["hits"]], [s for _, s, _ in cli], atol=6e-5)
        assert all(h["thumbnail"] == f"/api/thumbnail/{h['row']}" for h in result["hits"])
    features = text_features(setup, QUERIES[:2])
    for result, row in zip(body["results"], search_features(setup["gallery"], features, 5)):
        assert np.allclose([h["score"] for h in result["hits"]], [h.score for h in row], atol=1e-5)
    status, body, _ = server.request("POST", "/api/search/text", json.dumps(
        {"queries": QUERIES[:1], "top_k": 50, "prefix": "cam1/"}).encode(), {"content-type": "application/json"})
    assert status == 200 and {h["path"][:5] for h in body["results"][0]["hits"]} == {"cam1/"}
    assert len(body["results"][0]["hits"]) == 4  # the 4 images under cam1/


def test_search_by_photo_and_more_like_this(setup, server):
    photo = setup["photos"] / "cam1" / "p04.jpg"
    status, body = server.job(image_job(photo.read_bytes(), "p04.jpg", top_k=3))
    assert status == 200, body
    first = body["hits"][0]
    assert first["path"] == "cam1/p04.jpg" and first["score"] == pytest.approx(1.0, abs=1e-5)
    status, similar, _ = server.request("GET", f"/api/search/similar/{first['row']}?top_k=4")
    assert status == 200
    gallery = setup["gallery"]
    assert [(h["row"], h["path"]) for h in similar["hits"]] == expected_hits(setup, gallery.gather([first["row"]]), 4)[0]
    status, thumb, headers = server.request("GET", f"/api/thumbnail/{first['row']}?height=64")
    assert status == 200 and headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb)).height == 64
    status, original, headers = server.request("GET", f"/api/image/{first['row']}")
    assert status == 200 and original == photo.read_bytes() and headers["content-type"] == "image/jpeg"


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real PNG of width x height black pixels, compressed to a few hundred kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height // 100):
        parts.append(packer.compress(row * 100))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def bad_requests(setup) -> list[tuple[str, tuple, int, str]]:
    jpeg = (setup["photos"] / "cam0" / "p00.jpg").read_bytes()
    gallery = setup["gallery"]
    escape = next(i for i, p in zip(gallery.live, gallery.paths) if p == "cam0/escape.jpg")
    plain = next(i for i, p in zip(gallery.live, gallery.paths) if p == "cam0/p00.jpg")
    json_post = lambda body: ("POST", "/api/search/text", body, {"content-type": "application/json"})  # noqa: E731
    upload = lambda job: (job.method, job.path, job.body, dict(job.headers))  # noqa: E731
    return [
        ("malformed JSON", json_post(b'{"queries": ["a man'), 400, "the body is not valid JSON"),
        ("not an object", json_post(b'"a man"'), 422, "Input should be a valid dictionary"),
        ("an empty query", json_post(b'{"queries": [""]}'), 422, "query 1 is empty"),
        ("a blank query", json_post(b'{"queries": ["a man", "   "]}'), 422, "query 2 is empty"),
        ("no query", json_post(b'{"queries": []}'), 422, "queries must hold 1 to 32 queries, got 0"),
        ("a 100 kB query", json_post(json.dumps({"queries": ["a" * 100_000]}).encode()), 422,
         "query 1 is 100,000 characters; the limit is 1,000"),
        ("33 queries", json_post(json.dumps({"queries": ["a man"] * 33}).encode()), 422, "got 33"),
        ("top_k 0", json_post(b'{"queries": ["a man"], "top_k": 0}'), 422, "top_k must be between 1 and 1000, got 0"),
        ("top_k 10**9", json_post(b'{"queries": ["a man"], "top_k": 1000000000}'), 422,
         "top_k must be between 1 and 1000, got 1000000000"),
        ("top_k not a number", json_post(b'{"queries": ["a man"], "top_k": "ten"}'), 422, "top_k"),
        ("a prefix with nothing under it", json_post(b'{"queries": ["a man"], "prefix": "cam9/"}'), 404,
         "holds no image under 'cam9/'"),
        ("a non-image upload", upload(image_job(b"hello, I am a text file", "notes.txt")), 415,
         "not a JPEG, PNG or WebP image"),
        ("a truncated JPEG", upload(image_job(jpeg[: len(jpeg) // 2], "half.jpg")), 400,
         "cannot be decoded (truncated or damaged)"),
        ("a 20,000 x 20,000 PNG bomb", upload(image_job(png_bomb(), "bomb.png", content_type="image/png")), 413,
         "400,000,000 pixels; the limit is 40,000,000 pixels (refused before decoding)"),
        ("a 7,000 x 7,000 PNG", upload(image_job(png_bomb(7000, 7000), "big.png", content_type="image/png")), 413,
         "7,000 x 7,000 = 49,000,000 pixels; the limit is 40,000,000 pixels (refused before decoding)"),
        ("an empty upload", upload(image_job(b"", "empty.jpg")), 400, "the upload is empty"),
        ("a body over the limit", ("POST", "/api/search/image", b"", {"content-length": str(11 * 2**20 + 1)}), 413,
         "the limit is 11,534,336 bytes"),
        ("../../etc/passwd", ("GET", "/api/image/../../etc/passwd", None, {}), 404, "Not Found"),
        ("%2e%2e/", ("GET", "/api/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", None, {}), 404, "Not Found"),
        ("%2e%2e as a row", ("GET", "/api/image/%2e%2e", None, {}), 422, "valid integer"),
        ("%2e%2e/ thumbnail", ("GET", "/api/thumbnail/%2e%2e/secret.jpg", None, {}), 404, "Not Found"),
        ("an absolute path", ("GET", "/api/image//etc/passwd", None, {}), 404, "Not Found"),
        ("a path as a query parameter", ("GET", f"/api/image/{plain}?path=/etc/passwd", None, {}), 200, ""),
        ("a symlink out of the gallery", ("GET", f"/api/image/{escape}", None, {}), 403,
         f"the file of row {escape} resolves outside the gallery folder"),
        ("a symlink's thumbnail", ("GET", f"/api/thumbnail/{escape}", None, {}), 403, "resolves outside"),
        ("a row that does not exist", ("GET", "/api/thumbnail/1000000", None, {}), 404, "no image with row id 1000000"),
        ("a negative row", ("GET", "/api/search/similar/-1", None, {}), 404, "no image with row id -1"),
        ("an unknown static file", ("GET", "/static/pyproject.toml", None, {}), 404, "no static file"),
        ("a static file by traversal", ("GET", "/static/..%2f..%2fpyproject.toml", None, {}), 404, ""),
    ]


def test_every_bad_input_gets_its_4xx_and_the_server_still_answers(setup, server):
    normal = text_job(QUERIES[:1], top_k=3)
    expected = expected_hits(setup, text_features(setup, QUERIES[:1]), 3)
    for name, (method, path, body, headers), status, message in bad_requests(setup):
        got, payload, _ = server.request(method, path, body, headers)
        assert got == status, (name, got, payload)
        if message:
            text = payload.get("error", payload.get("detail", "")) if isinstance(payload, dict) else ""
            assert message in text, (name, payload)
        ok, answer = server.job(normal)  # and then a normal query is answered as before
        assert ok == 200 and [(h["row"], h["path"]) for h in answer["results"][0]["hits"]] == expected[0], name
    assert server.process.poll() is None  # the server is still up


def test_a_token_guards_every_route_and_requests_in_flight_are_bounded(setup):
    served = Server(setup, "--token", TOKEN, "--max_in_flight", "2")
    try:
        for path in ("/", "/api/health", "/api/thumbnail/1", "/openapi.json", "/docs", "/static/app.js"):
            assert served.request("GET", path)[0] == 401, path
            status, body, headers = served.request("GET", path, headers={"authorization": "Bearer wrong"})
            assert status == 401 and "a wrong access token" in body["error"] and headers["www-authenticate"] == "Bearer"
        status, body, _ = served.request("POST", "/api/search/text", text_job(QUERIES[:1]).body,
                                         {"content-type": "application/json"})
        assert status == 401 and "no access token" in body["error"]
        assert served.job(text_job(QUERIES[:1]), token=TOKEN)[0] == 200
        status, page, headers = served.request("GET", f"/?token={TOKEN}")
        assert status == 200 and b"tipr search" in page and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert served.request("GET", "/api/thumbnail/1", headers={"cookie": cookie})[0] == 200
        assert served.request("GET", "/api/health", headers={"cookie": "tipr_token=nope"})[0] == 401

        # Two requests held in flight (bodies announced, never sent): a third is refused at once with 503.
        held = []
        for _ in range(2):
            held.append(socket.create_connection((served.host, served.port)))
            held[-1].sendall(f"POST /api/search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
        deadline, status = time.monotonic() + 30, None
        while status != 503 and time.monotonic() < deadline:  # until the server has read both requests' headers
            status, body, headers = served.request("GET", "/api/health", headers={"authorization": f"Bearer {TOKEN}"})
            time.sleep(0.05)
        assert status == 503 and "the limit is 2" in body["error"] and headers["retry-after"] == "1"
        for connection in held:
            connection.close()
        deadline = time.monotonic() + 30
        while served.request("GET", "/api/health", headers={"x-tipr-token": TOKEN})[0] != 200:
            assert time.monotonic() < deadline, "the server did not recover from the held requests"
            time.sleep(0.05)
    finally:
        served.close()


def test_another_host_needs_a_token(setup, capsys, monkeypatch):
    monkeypatch.delenv("TIPR_SERVE_TOKEN", raising=False)
    code = main(["serve", "--model", str(setup["root"] / "model"), "--gallery", str(setup["root"] / "gallery"),
                 "--host", "0.0.0.0", "--port", "0"])
    assert code == 1 and "--host 0.0.0.0 lets other machines connect: give an access token" in capsys.readouterr().err


def test_under_load_every_answer_is_the_sequential_one(setup, server):
    """32 clients for up to 8 s (at most 40 requests each), mixed text and photo queries, on loopback."""
    photos = [setup["photos"] / f"cam{i % 3}" / f"p{i:02d}.jpg" for i in (0, 1, 2, 3, 4, 6)]
    jobs = [text_job([q], top_k=5) for q in QUERIES] + [text_job(QUERIES[:3], top_k=4)]
    jobs += [image_job(p.read_bytes(), p.name, top_k=5) for p in photos]
    sequential = [server.job(job)[1] for job in jobs]
    result = run_load(server.url, jobs, clients=32, seconds=8.0, max_requests=40)
    print(result.summary())
    assert result.statuses.keys() == {200} and len(result.answers) >= 64
    for index, _, _, body in result.answers:
        expected = sequential[index]
        rows = body["results"] if "results" in body else [body]
        for got, want in zip(rows, expected["results"] if "results" in expected else [expected]):
            assert same_ranking(got["hits"], [(h["row"], h["path"]) for h in want["hits"]])
            assert np.allclose([h["score"] for h in got["hits"]], [h["score"] for h in want["hits"]], atol=1e-5)
    _, health, _ = server.request("GET", "/api/health")
    batches = health["text_batches"]
    assert batches["items"] > batches["calls"]  # concurrent queries were encoded together


def test_the_page_in_a_real_browser(setup, server, tmp_path, capsys):
    """Headless Chromium: type a query and press Enter, see the hits 'tipr search' prints; the address holds
    the query; upload a photo; 'more like this'; the JSON download."""
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver_path, browser = Path("/usr/bin/chromedriver"), Path("/usr/bin/chromium")
    assert driver_path.exists() and browser.exists(), "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.binary_location = str(browser)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    # The page replaces its grid on every search: an element found a moment ago may be gone, so waits retry.
    wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))

    def texts(selector: str) -> list[str]:  # read in one script: no element can go stale in between
        return driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)
    try:
        driver.get(server.url + "/")
        wait.until(lambda d: "images under" in d.find_element(By.ID, "gallery-info").text)
        top_k = driver.find_element(By.ID, "top-k")
        top_k.clear()
        top_k.send_keys("4")
        driver.find_element(By.ID, "query").send_keys(QUERIES[2], Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "status").text == f'4 hits for "{QUERIES[2]}"')
        shown = list(zip(texts(".hit .path"), texts(".hit .score")))
        code = main(["search", "--model", str(setup["root"] / "model"), "--gallery", str(setup["root"] / "gallery"),
                     "--query", QUERIES[2], "--top_k", "4", "--device", "cpu"])
        printed = [line.split(maxsplit=2) for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()]
        assert code == 0 and [p for p, _ in shown] == [p for _, _, p in printed]
        assert np.allclose([float(s) for _, s in shown], [float(s) for _, s, _ in printed], atol=2e-4)
        assert "q=" in driver.current_url and "k=4" in driver.current_url
        wait.until(lambda d: all(img.get_property("complete") for img in d.find_elements(By.CSS_SELECTOR, ".hit img")))
        for hit in driver.find_elements(By.CSS_SELECTOR, ".hit"):  # thumbnails drawn; the symlink's refused (403)
            drawn = hit.find_element(By.CSS_SELECTOR, "img").get_property("naturalWidth") > 0
            assert drawn == (hit.find_element(By.CSS_SELECTOR, ".path").text != "cam0/escape.jpg")
        driver.find_element(By.ID, "download-json").click()  # the browser saves tipr-hits.json
        saved = tmp_path / "downloads" / "tipr-hits.json"
        wait.until(lambda d: saved.is_file() and saved.stat().st_size > 0)
        saved = json.loads(saved.read_text())
        assert [h["path"] for h in saved["hits"]] == [p for p, _ in shown] and saved["query"] == QUERIES[2]
        driver.save_screenshot(str(tmp_path / "text.png"))

        shared = driver.current_url  # the address reproduces the search
        driver.get("about:blank")
        driver.get(shared)
        wait.until(lambda d: texts(".hit .path") == [p for p, _ in shown])

        photo = setup["photos"] / "cam2" / "p08.jpg"
        driver.find_element(By.ID, "photo").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.ID, "status").text == f"{len(shown)} hits like p08.jpg")
        assert texts(".hit .path")[0] == "cam2/p08.jpg" and texts(".hit .score")[0] == "1.0000"

        second = driver.find_elements(By.CSS_SELECTOR, ".hit")[1]
        path, row = second.find_element(By.CSS_SELECTOR, ".path").text, second.get_attribute("data-row")
        second.find_element(By.CSS_SELECTOR, ".more").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == f"{len(shown)} hits like row {row}")
        assert texts(".hit .path")[0] == path
        assert "similar=" in driver.current_url
        driver.find_elements(By.CSS_SELECTOR, ".hit img")[0].click()
        wait.until(lambda d: d.find_element(By.ID, "viewer").is_displayed())
        assert path in driver.find_element(By.ID, "viewer-caption").text
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert all("/api/thumbnail/" in e and "403" in e for e in errors), errors  # only the symlink's
    finally:
        driver.quit()
