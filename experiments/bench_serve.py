"""``tipr serve`` under load, on loopback: throughput and latency of mixed text and photo queries.

Starts ``tipr serve --port 0`` on a model and its gallery (default: the synthetic
main job's model and a gallery of its test images, as the README builds them),
asks every query once in turn to record the sequential answers, then runs
``--clients`` clients for ``--seconds`` (at most ``--requests`` each) on a mix of
text queries (the synthetic benchmark's test captions) and photo uploads (gallery
images). Prints throughput, latency p50 / p99, the status counts, how many answers
differ from the sequential ones (ranking, or a score by more than 1e-5) and the
mean batch the server encoded. ``--screenshot FILE`` also saves the page showing
the first query in headless Chromium (the README's picture).

    python experiments/bench_serve.py [--model outputs/synthetic/lightning_logs/version_0/pretrained]
        [--gallery outputs/synthetic-test.gallery] [--clients 32] [--seconds 20] [--screenshot docs/serve_example.png]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np

from tipr.search import GalleryIndex
from tipr.serve.loadtest import image_job, run_load, send, text_job

RUN = Path("outputs/synthetic/lightning_logs/version_0/pretrained")
QUERIES = [
    "a woman in a blue ankle-length skirt and a red tee with a blue cap",
    "a person in an orange tank top and green shorts carrying a purple shoulder bag",
    "a man in a black jacket and grey trousers",
    "a woman with a white top, a yellow skirt and a red backpack",
]


def start(model: str, gallery: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "tipr.serve.command", "--model", model, "--gallery", gallery,
                                "--port", "0"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = process.stdout.readline()
    found = re.search(r"http://\S+", line)
    if not found:
        process.kill()
        raise SystemExit(f"tipr serve did not start: {line}")
    return process, found.group(0).rstrip("/")


def same(got: dict, want: dict) -> bool:
    rows = lambda body: body["results"] if "results" in body else [body]  # noqa: E731
    for a, b in zip(rows(got), rows(want)):
        if [h["row"] for h in a["hits"]] != [h["row"] for h in b["hits"]]:
            return False
        if not np.allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-5):
            return False
    return True


def screenshot(url: str, query: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,760"):
        options.add_argument(argument)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{url}/?q={quote(query)}&k=14")
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".hit")) == 14 and all(
            i.get_property("complete") and i.get_property("naturalWidth") > 0
            for i in d.find_elements(By.CSS_SELECTOR, ".hit img")))
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"screenshot of {url}/?q=... : {out}")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(RUN))
    parser.add_argument("--gallery", default="outputs/synthetic-test.gallery")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=10_000, help="at most this many requests per client")
    parser.add_argument("--photos", type=int, default=8, help="gallery images uploaded as photo queries")
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()

    gallery = GalleryIndex.load(args.gallery)
    photos = [Path(gallery.root) / p for p in gallery.paths[:: max(1, len(gallery) // args.photos)][: args.photos]]
    jobs = [text_job([q], top_k=10) for q in QUERIES] + [text_job(QUERIES, top_k=5)]
    jobs += [image_job(p.read_bytes(), p.name, top_k=10, content_type="image/png" if p.suffix == ".png" else "image/jpeg")
             for p in photos]
    process, url = start(args.model, args.gallery)
    try:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        sequential = [send(connection, job)[1] for job in jobs]
        connection.close()  # idle during the load: the server would close it (keep-alive timeout)
        result = run_load(url, jobs, clients=args.clients, seconds=args.seconds, max_requests=args.requests)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        _, health = send(connection, type(jobs[0])("GET", "/api/health"))
        connection.close()
        print(f"{len(gallery):,} images; {len(jobs)} distinct requests ({len(QUERIES) + 1} text, {len(photos)} photo)")
        print(result.summary())
        differ = sum(not same(body, sequential[i]) for i, status, _, body in result.answers if status == 200)
        print(f"answers that differ from the sequential ones: {differ}")
        for kind in ("text_batches", "image_batches"):
            calls, items = health[kind]["calls"], health[kind]["items"]
            print(f"{kind}: {items} items in {calls} model calls (mean batch {items / max(calls, 1):.1f})")
        print(json.dumps({"requests": len(result.answers), "throughput": round(result.throughput, 1),
                          "p50_ms": round(result.latency_ms(50), 1), "p99_ms": round(result.latency_ms(99), 1)}))
        if args.screenshot:
            screenshot(url, QUERIES[0], args.screenshot)
    finally:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    main()
