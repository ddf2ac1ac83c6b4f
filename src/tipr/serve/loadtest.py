"""A bounded load generator for a tipr server: N clients, each a keep-alive connection, for T seconds at most.

Used by ``tests/test_serve.py`` and ``experiments/bench_serve.py``. Each client
sends the jobs in turn (starting at its own offset) until ``seconds`` have
passed or it has sent ``max_requests``; it records each answer's status,
latency and JSON body. Standard library only (``http.client`` and threads).
"""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

__all__ = ["Job", "LoadResult", "image_job", "run_load", "text_job"]


@dataclass(frozen=True)
class Job:
    """One request: method, path, body bytes and headers."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def text_job(queries: list[str], top_k: int = 10, prefix: str | None = None) -> Job:
    body = json.dumps({"queries": queries, "top_k": top_k, "prefix": prefix}).encode()
    return Job("POST", "/api/search/text", body, (("content-type", "application/json"),))


def image_job(data: bytes, filename: str = "photo.jpg", top_k: int = 10, content_type: str = "image/jpeg") -> Job:
    """A multipart upload of ``data`` as ``file``, with ``top_k``."""
    boundary = f"tipr{secrets.token_hex(8)}"
    parts = [
        f'--{boundary}\r\ncontent-disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'.encode(),
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"content-type: {content_type}\r\n\r\n".encode() + data + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return Job("POST", "/api/search/image", b"".join(parts),
               (("content-type", f"multipart/form-data; boundary={boundary}"),))


@dataclass
class LoadResult:
    """What a load run saw: per request ``(job index, status, seconds, JSON body or None)``."""

    seconds: float
    clients: int
    answers: list[tuple[int, int, float, object]] = field(default_factory=list)

    @property
    def statuses(self) -> Counter:
        return Counter(status for _, status, _, _ in self.answers)

    @property
    def throughput(self) -> float:
        return len(self.answers) / self.seconds

    def latency_ms(self, q: float) -> float:
        return float(np.percentile([s for _, _, s, _ in self.answers], q) * 1e3)

    def summary(self) -> str:
        return (f"{len(self.answers)} requests from {self.clients} clients in {self.seconds:.1f} s: "
                f"{self.throughput:.1f} requests/s, latency p50 {self.latency_ms(50):.0f} ms, "
                f"p99 {self.latency_ms(99):.0f} ms; statuses {dict(sorted(self.statuses.items()))}")


def send(connection: http.client.HTTPConnection, job: Job, token: str | None = None) -> tuple[int, object]:
    """Send ``job`` on ``connection``: ``(status, parsed JSON or None)``."""
    headers = dict(job.headers)
    if token:
        headers["authorization"] = f"Bearer {token}"
    connection.request(job.method, job.path, body=job.body or None, headers=headers)
    response = connection.getresponse()
    raw = response.read()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, None


def run_load(url: str, jobs: list[Job], *, clients: int = 32, seconds: float = 20.0, max_requests: int = 10_000,
             token: str | None = None, timeout: float = 60.0) -> LoadResult:
    """Run ``clients`` threads against ``url`` (``http://127.0.0.1:port``) for at most ``seconds`` each,
    at most ``max_requests`` requests each; returns every answer."""
    parts = urlsplit(url)
    answers: list = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        mine = []
        try:
            for i in range(max_requests):
                if time.perf_counter() - start >= seconds:
                    break
                index = (number + i) % len(jobs)
                began = time.perf_counter()
                status, body = send(connection, jobs[index], token)
                mine.append((index, status, time.perf_counter() - began, body))
        finally:
            connection.close()
            with lock:
                answers.extend(mine)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout)
    return LoadResult(time.perf_counter() - start, clients, answers)
