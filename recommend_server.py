"""The HTTP side of ``recommend.py --serve``: one page and a small JSON API around a Recommender.

    GET  /                the page (web/recommend.html)
    GET  /api/catalogue   users and item titles, for the page's pickers and autocompletion
    POST /api/recommend   {"user" | "history" | "history_ids", "query", "k", "keep_history"}
                          -> top-K, history, latency

Every refused request answers {"error": "..."} naming the field at fault: 413 for a body over the
limit (``--max_body_kb``), found before anything is parsed or tokenized; 400 for any other bad
request (wrong content type, empty body, malformed JSON, unknown or mistyped fields, an unknown
user or title); 404/405 for a wrong route or method. Anything else that fails answers 500 with
its message, never a stack trace. Requests run one at a time (the Recommender holds a lock).
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from recommender import Recommender, RequestError, shorten
from utils import DataError

PAGE = Path(__file__).resolve().parent / "web" / "recommend.html"
DRAIN = 16 * 2**20  # bytes of an over-limit body read and dropped, so that the client reads the 413
EXAMPLE = '{"user": "1", "k": 10}'


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    user: str | None = None
    history: str | None = None  # "Title one; Title two"
    history_ids: str | list[str] | None = None  # "12,40,7" or ["12", "40", "7"]
    query: str | None = None
    k: int = 10
    keep_history: bool = False  # also recommend items of the history


class BadRequest(Exception):
    """A request refused before the model sees it: the message for {"error": ...} and the status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, holding at most ``limit`` bytes of it in memory. A larger body (announced by
    Content-Length, or found while reading a chunked one) raises BadRequest 413; the rest of it is
    read and dropped first, up to DRAIN bytes, so that the client is not cut off before the answer."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if not over:
            body += chunk
        elif size > DRAIN:
            break
    if over:
        raise BadRequest(f"body: over the limit of {limit / 1024:g} KB (--max_body_kb)", 413)
    return bytes(body)


async def read_request(request: Request, limit: int) -> RecommendRequest:
    """The checked request, or BadRequest naming what is wrong: the size first (nothing is parsed
    past the limit), then the content type, then the JSON, then the fields."""
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise BadRequest(f"Content-Type: expected application/json, got {shorten(content_type, 100) or 'none'!r}")
    if not body.strip():
        raise BadRequest(f"body: empty; expected a JSON object such as {EXAMPLE}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body: not valid JSON ({shorten(e, 120)}); expected an object such as {EXAMPLE}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body: expected a JSON object such as {EXAMPLE}, got a {type(payload).__name__}")
    try:
        return RecommendRequest.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(shorten(p, 60) for p in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}") from None


def create_app(recommender: Recommender, max_body: int = 64 * 1024) -> FastAPI:
    """The app; ``max_body``: the largest request body accepted, in bytes."""
    app = FastAPI(title="LC-Rec recommendations", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405: the same shape
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/api/catalogue")
    def catalogue() -> dict:
        return {"users": list(recommender.files.inters),
                "items": [{"item": i, "title": t} for i, t in recommender.searchable.items()],
                "num_items": len(recommender.indices), "max_his_len": recommender.max_his_len}

    @app.post("/api/recommend")
    async def recommend(request: Request) -> JSONResponse:
        req = await read_request(request, max_body)
        try:
            # the model runs in a worker thread, so the server keeps answering (the page, the catalogue)
            out = await run_in_threadpool(recommender.answer, req.user, req.history, req.history_ids, req.query, req.k,
                                          req.keep_history)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 - a message on the page, not a stack trace
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse(out)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, bound before the model loads, so that a port in use (or an
    unknown host) ends recommend.py at once with the OS's reason."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        reason = getattr(e, "strerror", None) or str(e)
        raise DataError(f"--host {host} --port {port}: cannot listen there: {reason}") from None


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(recommender: Recommender, sock: socket.socket, host: str, max_body: int = 64 * 1024) -> None:
    """Serve on ``sock`` (from ``listen``) until Ctrl-C."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(recommender, max_body), log_level="warning"))
    print(f"serving on {url(host, sock.getsockname()[1])} (Ctrl-C stops)", flush=True)  # the port is bound
    server.run(sockets=[sock])
