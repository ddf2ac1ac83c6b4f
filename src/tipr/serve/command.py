"""``tipr serve``: a plain function whose signature and docstring are its options (see :mod:`tipr.commands`)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from jsonargparse.typing import PositiveFloat, PositiveInt

__all__ = ["TOKEN_VARIABLE", "serve"]

TOKEN_VARIABLE = "TIPR_SERVE_TOKEN"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: str,
    gallery: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str | None = None,
    max_queries: PositiveInt = 32,
    max_query_chars: PositiveInt = 1000,
    max_top_k: PositiveInt = 1000,
    max_upload_bytes: PositiveInt = 10 * 2**20,
    max_pixels: PositiveInt = 40_000_000,
    max_in_flight: PositiveInt = 64,
    max_batch: PositiveInt = 32,
    batch_wait_ms: PositiveFloat = 5.0,
) -> int:
    """Serve a gallery (from 'tipr index') as a web page and JSON API: search by text, by photo, more like this.

    Prints the address, then answers until Ctrl-C. Binds 127.0.0.1 unless told
    otherwise; another --host (0.0.0.0: every interface) needs an access token,
    --token or the TIPR_SERVE_TOKEN environment variable, without which every
    request gets 401. Open the page once with ?token=<token>. Images are served
    by gallery row id only, never by a path a client names.

    Args:
        model: the model that indexed the gallery: a pretrained folder, a hub id or a TIPRModule checkpoint (.ckpt).
        gallery: gallery folder written by 'tipr index'.
        host: address to listen on.
        port: port to listen on (0: any free port; the address printed says which).
        token: access token the clients must send (default: $TIPR_SERVE_TOKEN; none on loopback).
        device: where the model runs (default: cuda if available, else cpu).
        max_queries: text queries in one request.
        max_query_chars: characters in one query.
        max_top_k: hits one query may ask for.
        max_upload_bytes: bytes of an uploaded photo.
        max_pixels: width x height of an uploaded photo, checked before it is decoded.
        max_in_flight: requests answered at once; more get 503 at once.
        max_batch: queries or photos encoded in one model call (dynamic batching).
        batch_wait_ms: how long a model call waits for more concurrent requests to batch.
    """
    try:
        import uvicorn

        from tipr.serve.app import Limits, create_app
    except ImportError as e:
        raise ImportError(f"tipr serve needs FastAPI, uvicorn and python-multipart ({e}): "
                          f'pip install "tipr[serve]"') from e
    from tipr.search.commands import load_model
    from tipr.search.gallery import GalleryIndex, model_identity

    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if not _loopback(host) and token is None:
        raise ValueError(f"--host {host} lets other machines connect: give an access token with --token or "
                         f"${TOKEN_VARIABLE} (or serve on 127.0.0.1)")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    loaded = GalleryIndex.load(gallery)
    network, processor = load_model(model, device)
    loaded.check_model(model_identity(network, model))
    limits = Limits(max_queries=max_queries, max_query_chars=max_query_chars, max_top_k=max_top_k,
                    max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_in_flight=max_in_flight,
                    max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    app = create_app(network, processor, loaded, token=token, limits=limits)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise OSError(f"--host {host} --port {port}: cannot listen there: {e.strerror}") from e
    sock.listen(2048)  # connections made from now on wait for uvicorn's loop: the address printed is ready
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"tipr serve: {len(loaded):,} images of {loaded.root} on http://{shown}:{bound}/"
          + (" (open it with ?token=<token>)" if token else ""), flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    from tipr.commands import main

    sys.exit(main(["serve", *sys.argv[1:]]))
