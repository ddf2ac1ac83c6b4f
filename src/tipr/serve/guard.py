"""The server's outer layer (pure ASGI): a bound on requests in flight, the access token, body size, headers.

Every HTTP request passes here first:

1. more than ``max_in_flight`` requests being answered: 503 at once, with
   ``Retry-After: 1``, instead of a queue without end;
2. with a token set, a request without it gets 401. The token may come as
   ``Authorization: Bearer <token>``, an ``X-Tipr-Token`` header, a ``token``
   query parameter (to open the page: the answer then sets an HttpOnly,
   SameSite=Strict cookie so the page's own requests and images carry it), or
   that cookie. Compared in constant time;
3. a body over ``max_body_bytes`` (by ``Content-Length``, or counted while it is
   read) gets 413;
4. every answer carries ``X-Content-Type-Options: nosniff``, a same-origin
   Content-Security-Policy (the page loads nothing from elsewhere) and no framing.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

__all__ = ["COOKIE", "Guard"]

COOKIE = "tipr_token"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


async def send_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS,
        *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wrap an ASGI ``app`` (see the module docstring)."""

    def __init__(self, app, *, token: str | None, max_in_flight: int, max_body_bytes: int):
        self.app, self.token, self.max_in_flight, self.max_body_bytes = app, token, max_in_flight, max_body_bytes
        self.in_flight = 0
        self.refused_busy = 0  # 503s answered: a load test reads it from /api/health

    def _given_token(self, scope) -> tuple[str | None, bool]:
        """The token the request carries, and whether it came as a query parameter."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if headers.get("authorization", "").startswith("Bearer "):
            return headers["authorization"][7:].strip(), False
        if "x-tipr-token" in headers:
            return headers["x-tipr-token"], False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header carries no token
            return None, False
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            self.refused_busy += 1
            return await send_json(send, 503, {"error": f"the server is busy: {self.in_flight} requests in flight "
                                                        f"(the limit is {self.max_in_flight}); retry shortly"},
                                   [(b"retry-after", b"1")])
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope, receive, send):
        extra = list(SECURITY_HEADERS)
        if self.token is not None:
            given, from_query = self._given_token(scope)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                why = "no access token" if given is None else "a wrong access token"
                return await send_json(send, 401, {"error": f"the request carries {why}: this server needs one "
                                                            f"(Authorization: Bearer <token>, or ?token= to open the page)"},
                                       [(b"www-authenticate", b"Bearer")])
            if from_query:
                extra.append((b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()))
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await send_json(send, 413, {"error": f"the request body is {length.decode()} bytes; the limit is "
                                                        f"{self.max_body_bytes:,} bytes"})
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise HTTPException(413, f"the request body is over the limit of {self.max_body_bytes:,} bytes")
            return message

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, counted_receive, with_headers)
