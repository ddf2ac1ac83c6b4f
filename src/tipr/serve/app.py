"""The web application of ``tipr serve``: a page and a JSON API over one gallery and its model (FastAPI).

Routes (``GET /openapi.json`` describes them; ``GET /docs`` lists them, offline):

- ``GET /``: the page (``tipr/assets/serve``: plain HTML, CSS and JS, nothing fetched from elsewhere);
- ``POST /api/search/text``: ``{"queries": [...], "top_k": 10, "prefix": null}`` -> ``{"results": [{"query", "hits"}]}``;
- ``POST /api/search/image``: a multipart upload (``file``, ``top_k``, ``prefix``) -> ``{"hits": [...]}``;
- ``GET /api/search/similar/{row}``: more like a gallery image, by its stored feature;
- ``GET /api/thumbnail/{row}`` and ``GET /api/image/{row}``: a gallery image by row id, never by path;
- ``GET /api/health``: the gallery, the model, requests in flight, batching counts.

A hit is ``{"rank", "score", "path", "row", "thumbnail", "image"}``: the ranking of
:func:`tipr.search.search_features`, the same as ``tipr search``. Text queries and
uploaded images of concurrent requests are encoded together
(:class:`~tipr.serve.batching.MicroBatcher`); one model call runs at a time.
Every refused input is a 4xx with ``{"error": message}``; a failing request is
answered 500 and the server goes on. :mod:`tipr.serve.guard` adds the in-flight
bound, the token and the body limit.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from tipr.search.gallery import GalleryIndex, describe_model
from tipr.search.query import encode_queries, search_features
from tipr.serve.batching import MicroBatcher
from tipr.serve.guard import Guard
from tipr.serve.images import MEDIA_TYPES, ImageRefused, check_row, decode_upload, gallery_file, image_type, thumbnail

if TYPE_CHECKING:
    from tipr.model import TIPRModel
    from tipr.processing import TIPRProcessor

__all__ = ["Limits", "create_app"]

PAGE = files("tipr") / "assets" / "serve"
STATIC = {"app.js": "text/javascript", "docs.js": "text/javascript", "style.css": "text/css"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask; each is a ``tipr serve`` option of the same name."""

    max_queries: int = 32  # text queries in one request
    max_query_chars: int = 1000  # characters in one query
    max_top_k: int = 1000
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000  # width x height of an upload, checked before decoding
    max_in_flight: int = 64  # requests being answered at once; beyond: 503
    max_batch: int = 32  # items encoded in one model call
    batch_wait_ms: float = 5.0  # how long a batch waits for more requests


class TextSearch(BaseModel):
    queries: list[str]
    top_k: int = 10
    prefix: str | None = None


class _Service:
    """The model, processor and gallery behind the routes: batched encoders, ranking."""

    def __init__(self, model: TIPRModel, processor: TIPRProcessor, gallery: GalleryIndex, limits: Limits):
        self.model, self.processor, self.gallery, self.limits = model.eval(), processor, gallery, limits
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one model call at a time: the threads share the cores
        wait = limits.batch_wait_ms / 1000
        self.texts = MicroBatcher(self._encode_texts, max_items=limits.max_batch, max_wait_s=wait)
        self.images = MicroBatcher(self._encode_images, max_items=limits.max_batch, max_wait_s=wait)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        with self.lock:
            return encode_queries(self.model, self.processor, texts)

    def _encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        pixels = torch.stack([self.processor.transform(image) for image in images]).to(self.device)
        with self.lock, torch.inference_mode():
            return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()

    def check(self, top_k: int, prefix: str | None) -> None:
        if not 1 <= top_k <= self.limits.max_top_k:
            raise HTTPException(422, f"top_k must be between 1 and {self.limits.max_top_k}, got {top_k}")
        if prefix is not None and len(prefix) > self.limits.max_query_chars:
            raise HTTPException(422, f"prefix is {len(prefix):,} characters; the limit is {self.limits.max_query_chars:,}")

    async def rank(self, features, top_k: int, prefix: str | None) -> list[list[dict[str, Any]]]:
        try:
            hits = await asyncio.to_thread(search_features, self.gallery, features, top_k, prefix=prefix or None)
        except ValueError as e:  # GalleryError: nothing under the prefix
            raise HTTPException(404 if prefix else 422, str(e)) from e
        return [[{"rank": h.rank, "score": h.score, "path": h.path, "row": h.row,
                  "thumbnail": f"/api/thumbnail/{h.row}", "image": f"/api/image/{h.row}"} for h in row] for row in hits]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(model: TIPRModel, processor: TIPRProcessor, gallery: GalleryIndex, *, token: str | None = None,
               limits: Limits = Limits()) -> Guard:
    """The ASGI application serving ``gallery`` with ``model`` (which must be the gallery's: checked here)."""
    from tipr.search.gallery import model_identity

    gallery.check_model(model_identity(model))
    service = _Service(model, processor, gallery, limits)

    @asynccontextmanager
    async def lifespan(app):
        await service.texts.start()
        await service.images.start()
        yield
        await service.texts.stop()
        await service.images.stop()

    app = FastAPI(title="tipr serve", version="2", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Text-to-image person search over {len(gallery):,} images of {gallery.root}")

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's (404, 405)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(ImageRefused)
    async def refused(request: Request, error: ImageRefused):
        return _error(error.status, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "the body is not valid JSON: " + "; ".join(str(p.get("ctx", {}).get("error", p["msg"]))
                                                                         for p in problems))
        return _error(422, "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):  # logged by uvicorn; the server goes on
        return _error(500, f"the server failed on this request: {type(error).__name__}")

    @app.get("/", include_in_schema=False)
    async def page():
        return Response((PAGE / "index.html").read_bytes(), media_type="text/html", headers={"cache-control": "no-store"})

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return Response((PAGE / "docs.html").read_bytes(), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response((PAGE / name).read_bytes(), media_type=STATIC[name])

    @app.get("/api/health", summary="The gallery, the model and the server's counts")
    async def health():
        return {"status": "ok", "images": len(gallery), "root": gallery.root, "gallery": gallery.name,
                "model": describe_model(gallery.model), "limits": asdict(limits),
                "text_batches": {"calls": service.texts.calls, "items": service.texts.items},
                "image_batches": {"calls": service.images.calls, "items": service.images.items},
                "refused_busy": guard.refused_busy}

    @app.post("/api/search/text", summary="Rank the gallery by each of a batch of text queries")
    async def search_text(body: TextSearch):
        if not 1 <= len(body.queries) <= limits.max_queries:
            raise HTTPException(422, f"queries must hold 1 to {limits.max_queries} queries, got {len(body.queries)}")
        queries = [q.strip() for q in body.queries]
        for i, q in enumerate(queries, start=1):
            if not q:
                raise HTTPException(422, f"query {i} is empty: describe the person to find")
            if len(q) > limits.max_query_chars:
                raise HTTPException(422, f"query {i} is {len(q):,} characters; the limit is {limits.max_query_chars:,}")
        service.check(body.top_k, body.prefix)
        features = await service.texts.submit(queries)  # (len(queries), D), encoded with other requests
        hits = await service.rank(features, body.top_k, body.prefix)
        return {"results": [{"query": q, "hits": row} for q, row in zip(queries, hits)]}

    @app.post("/api/search/image", summary="Rank the gallery by an uploaded photo (the same person in other crops)")
    async def search_image(file: UploadFile = File(...), top_k: int = Form(10), prefix: str | None = Form(None)):
        service.check(top_k, prefix)
        data = await file.read(limits.max_upload_bytes + 1)
        image = decode_upload(data, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_pixels)
        (feature,) = await service.images.submit([image])
        return {"hits": (await service.rank(feature[None], top_k, prefix))[0]}

    @app.get("/api/search/similar/{row}", summary="More like a gallery image: rank by its stored feature")
    async def search_similar(row: int, top_k: int = Query(10), prefix: str | None = Query(None)):
        service.check(top_k, prefix)
        check_row(gallery, row)
        return {"row": row, "hits": (await service.rank(gallery.gather([row]), top_k, prefix))[0]}

    @lru_cache(maxsize=4096)
    def cached_thumbnail(row: int, height: int) -> bytes:
        return thumbnail(gallery_file(gallery, row), height, limits.max_pixels)

    @app.get("/api/thumbnail/{row}", summary="A JPEG thumbnail of a gallery image, by row id")
    async def get_thumbnail(row: int, height: int = Query(192, ge=16, le=1024)):
        return Response(await asyncio.to_thread(cached_thumbnail, row, height), media_type="image/jpeg",
                        headers={"cache-control": "private, max-age=3600"})

    @app.get("/api/image/{row}", summary="A gallery image file, by row id")
    async def get_image(row: int):
        path = gallery_file(gallery, row)
        with open(path, "rb") as f:
            kind = image_type(f.read(16))
        if kind is None:
            raise HTTPException(415, f"the file of row {row} is not a JPEG, PNG or WebP image")
        return FileResponse(path, media_type=MEDIA_TYPES[kind])

    guard = Guard(app, token=token, max_in_flight=limits.max_in_flight,
                  max_body_bytes=limits.max_upload_bytes + 2**20)
    guard.fastapi = app
    return guard
