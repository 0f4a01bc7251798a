"""The gateway's OpenAI-compatible HTTP front end: a FastAPI app served by uvicorn on the gateway's own asyncio
loop, beside the gRPC server, over the same serving core.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or server-sent events), GET /health
(200 while serving, 503 while loading, stopping or after the serving loop died), GET /metrics (the process's
Prometheus registry). With API keys configured, /v1/* need `Authorization: Bearer KEY` (401 otherwise); health
and metrics stay open. Every error, FastAPI's validation included, leaves in OpenAI's shape with the status
http_errors gives it. On stop the front end refuses new /v1 calls (503) and gives the running ones the drain
time; uvicorn never touches the process's signals (the gateway runtime owns them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import ServerStoppingError
from services.gateway.http_errors import AuthenticationError, ParamError, RouteNotFoundError, error_body
from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.openai_serving import OpenAIServing, Streamed
from services.rpc.auth import key_is_valid

log = logging.getLogger(__name__)


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status)


def _validation_error(exc: RequestValidationError) -> ParamError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad parameter."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ParamError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if first.get("type") == "missing" and not loc:
        return ParamError("a JSON body is required")
    param = ".".join(loc) or None
    return ParamError(f"{param or 'body'}: {first.get('msg', 'invalid')}", param)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gateway runtime handles SIGTERM/SIGINT (draining both front ends)
        yield


class EventStream(StreamingResponse):
    """Server-sent events whose run is cancelled however the response ends (a client gone mid-stream too)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class HttpFrontEnd:
    def __init__(self, serving: OpenAIServing, host: str, port: int, api_keys: frozenset[str] = frozenset()):
        self.serving, self.api_keys = serving, api_keys
        self.serving_now = False  # set by the runtime with the gRPC health
        self.stopping = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=2048)
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.app = build_app(self)
        self.server = _Server(
            uvicorn.Config(
                self.asgi,
                interface="asgi3",
                lifespan="off",
                log_config=None,
                log_level="warning",
                access_log=False,
                proxy_headers=False,
                timeout_graceful_shutdown=1,
                timeout_keep_alive=30,
            )
        )
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))

    async def asgi(self, scope, receive, send) -> None:
        """ASGI wrapper: /v1 calls are counted while they run (streams until their last event); refused on stop."""
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.stopping:
            return await error_response(ServerStoppingError("the gateway is stopping"))(scope, receive, send)
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls; wait up to `timeout_s` for the running ones. Returns whether they all finished."""
        self.stopping = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self.stopping = True
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=5)
        self.sock.close()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request: Request, work) -> Response:
    """Run a call's work; a client that goes away before the answer cancels it (and its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # nobody reads it
    try:
        result = task.result()
    except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error body
        return error_response(exc)
    if isinstance(result, Streamed):
        return EventStream(result.events, on_close=result.close)
    return JSONResponse(result)


def build_app(front: HttpFrontEnd) -> FastAPI:
    app = FastAPI(title="expertmesh", docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(request: Request) -> None:
        if front.api_keys and not key_is_valid(request.headers.get("authorization"), front.api_keys):
            raise AuthenticationError("a valid API key is required: send the header `Authorization: Bearer KEY`")

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        if exc.status_code == 404:
            return error_response(RouteNotFoundError(f"no route {request.method} {request.url.path}"))
        return JSONResponse(
            {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}},
            status_code=exc.status_code,
        )

    @app.exception_handler(AuthenticationError)
    async def on_auth(request, exc):
        return error_response(exc)

    @app.get("/health")
    async def health():
        ok = front.serving_now and not front.stopping
        return JSONResponse({"status": "serving" if ok else "not serving"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        try:
            return JSONResponse(front.serving.models())
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(request, front.serving.completions(body))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _answer(request, front.serving.chat(body))

    return app
