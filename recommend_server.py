"""The HTTP side of ``recommend.py --serve``: one page and a small JSON API around a Recommender.

    GET  /                the page (web/recommend.html)
    GET  /api/catalogue   users and item titles, for the page's pickers and autocompletion
    POST /api/recommend   {"user" | "history" | "history_ids", "query", "k"} -> top-K, history, latency

Bad input answers HTTP 400 with {"error": "..."}; anything else that fails answers 500 with its
message, never a stack trace. Requests run one at a time (the Recommender holds a lock).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from recommender import Recommender, RequestError

PAGE = Path(__file__).resolve().parent / "web" / "recommend.html"


class RecommendRequest(BaseModel):
    user: str | None = None
    history: str | None = None  # "Title one; Title two"
    history_ids: str | list[str] | None = None  # "12,40,7" or ["12", "40", "7"]
    query: str | None = None
    k: int = 10


def create_app(recommender: Recommender) -> FastAPI:
    app = FastAPI(title="LC-Rec recommendations", docs_url=None, redoc_url=None)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/api/catalogue")
    def catalogue() -> dict:
        return {"users": list(recommender.files.inters),
                "items": [{"item": i, "title": t} for i, t in recommender.searchable.items()],
                "num_items": len(recommender.indices), "max_his_len": recommender.max_his_len}

    @app.post("/api/recommend")
    async def recommend(payload: dict) -> JSONResponse:
        try:
            req = RecommendRequest(**payload)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=400)
        try:
            # the model runs in a worker thread, so the server keeps answering (the page, the catalogue)
            out = await run_in_threadpool(recommender.answer, req.user, req.history, req.history_ids, req.query, req.k)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 - a message on the page, not a stack trace
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse(out)

    return app


def serve(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    print(f"serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(recommender), host=host, port=port, log_level="warning")
