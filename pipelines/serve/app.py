"""The Ray Serve deployment: routes, limits, the bearer token and the admission count.

- `POST /generate` (multipart: `identity` image, `audio` and/or `video`, optional `emotion`, `seed`,
  `transcript`) -> the mp4 (headers X-Frames, X-Frames-SHA256: generate.run's hash of the rendered frames);
- `POST /generate/stream` (same fields) -> a fragmented mp4 sent as it is rendered (pipelines/serve/stream.py);
- `GET /` a page to try it (page.html), `GET /health` (neither needs the token) and `GET /model` (name, version, training run, data hashes).

Errors are JSON `{"error": "<one line>"}`: 401 without the token, 411/413 for a body without length or over a limit,
422 for an input generate refuses (the CLI's message, naming the form field), 503 + Retry-After when the replica has
`max_pending` requests already.
"""

# no `from __future__ import annotations`: FastAPI reads the route methods' annotations (Request) at run time
import asyncio
import hmac
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve

from pipelines.serve.config import TOKEN_ENV, TOKEN_FILE_ENV, ServeParams
from pipelines.serve.engine import Engine, ServeError, Upload
from pipelines.serve.stream import Stream

api = FastAPI(title="edtalk serve", docs_url=None, redoc_url=None, openapi_url=None)
PAGE = Path(__file__).with_name("page.html")
FILE_FIELDS = ("identity", "audio", "video")
TEXT_FIELDS = ("emotion", "seed", "transcript")


def read_token() -> str | None:
    """The bearer token from $EDTALK_SERVE_TOKEN, else the file $EDTALK_SERVE_TOKEN_FILE names; None = no token."""
    token = os.environ.get(TOKEN_ENV)
    if not token and os.environ.get(TOKEN_FILE_ENV):
        token = Path(os.environ[TOKEN_FILE_ENV]).read_text(encoding="utf-8").strip()
    return token or None


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@serve.deployment
@serve.ingress(api)
class EDTalkServer:
    def __init__(self, model: str, gen, prep, params: ServeParams):
        self.params = params
        self.engine = Engine(model, gen, prep, params)
        self.token = read_token()
        self.pending = 0  # admitted /generate requests (rendering or waiting for the renderer)

    def _refused(self, request: Request) -> JSONResponse | None:
        if self.token is None:
            return None
        sent = request.headers.get("authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            return None
        return error(401, "missing or wrong bearer token; send 'Authorization: Bearer TOKEN'",
                     **{"WWW-Authenticate": "Bearer"})  # fmt: skip

    @api.get("/")
    def page(self) -> HTMLResponse:
        """The try-it page (static: no model data, so no token; it sends the token it is given with its requests)."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/health")
    def health(self) -> dict:
        import psutil  # a Ray dependency

        rss = psutil.Process().memory_info().rss
        return {"status": "ok", "pending": self.pending, "rss_mb": round(rss / 2**20, 1)}

    @api.get("/model")
    def model(self, request: Request):
        return self._refused(request) or self.engine.info()

    @api.post("/generate")
    async def generate(self, request: Request):
        """The whole mp4 once it is complete (headers X-Frames, X-Frames-SHA256)."""

        async def respond(uploads: dict) -> Response:
            mp4, summary = await asyncio.to_thread(self.engine.generate, **uploads)
            headers = {"X-Frames": str(summary["frames"]), "X-Frames-SHA256": summary["frames_sha256"]}
            return Response(mp4, media_type="video/mp4", headers=headers)

        return await self._admit(request, respond)

    @api.post("/generate/stream")
    async def generate_stream(self, request: Request):
        """A fragmented mp4 sent as it is rendered (same form fields)."""

        async def respond(uploads: dict) -> StreamingResponse:
            stream = await asyncio.to_thread(Stream, self.engine, uploads)
            stream.start()
            first = await stream.first()
            return StreamingResponse(stream.chunks(first), media_type="video/mp4")

        return await self._admit(request, respond)

    async def _admit(self, request: Request, respond):
        """Token, admission count (503 + Retry-After when full), form -> respond(uploads); ServeError -> JSON."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.pending >= self.params.max_pending:
            return error(503, f"busy: {self.pending} requests pending; retry in {self.params.retry_after_s} s",
                         **{"Retry-After": str(self.params.retry_after_s)})  # fmt: skip
        self.pending += 1
        try:
            return await respond(await self._uploads(request))
        except ServeError as exc:
            return error(exc.status, str(exc))
        finally:
            self.pending -= 1  # (a stream counts until its first bytes: the rest is reading a file)

    async def _uploads(self, request: Request) -> dict:
        """The multipart form -> Engine.request's keyword arguments, with the body-size limit."""
        length = request.headers.get("content-length")
        if length is None:
            raise ServeError(411, "send the body with a Content-Length (no chunked uploads)")
        if int(length) > self.params.max_upload_bytes:
            raise ServeError(
                413, f"body of {length} bytes is over the limit of {self.params.max_upload_bytes}"
            )
        form = await request.form(max_files=len(FILE_FIELDS), max_fields=len(TEXT_FIELDS))
        unknown = sorted(set(form) - set(FILE_FIELDS) - set(TEXT_FIELDS))
        if unknown:
            raise ServeError(
                422, f"unknown form field(s) {unknown}; known: {list(FILE_FIELDS + TEXT_FIELDS)}"
            )
        files = {}
        for name in FILE_FIELDS:
            item = form.get(name)
            if item is not None:
                if isinstance(item, str):
                    raise ServeError(422, f"{name}: send a file upload, not text")
                files[name] = Upload(name, await item.read())
        if "identity" not in files:
            raise ServeError(422, "identity: missing; upload a portrait image with one face")
        seed = form.get("seed")
        if seed is not None and not str(seed).lstrip("-").isdigit():
            raise ServeError(422, f"seed {seed!r}: not an integer")
        return {
            **files,
            "emotion": form.get("emotion") or None,
            "seed": None if seed is None else int(seed),
            "transcript": form.get("transcript") or None,
        }
