"""The FastAPI app and ``serve(args)``: start the scheduler process, wait for its
handshake, print the startup report, run uvicorn; exit non-zero if the scheduler dies."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from portaserve.server.common import TokenTexts
from portaserve.server.errors import APIError
from portaserve.server.manager import SchedulerClient

logger = logging.getLogger("portaserve.server")

OPEN_PATHS = {"/health"}


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return APIError(status, message, type_, param, code, headers).response()


class BodyLimit:
    """413 for a request body over the limit (--max-request-body-mb), read no further: at
    once from its Content-Length, else (chunked) when the bytes received pass it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of "
                        f"{self.limit >> 20} MiB (--max-request-body-mb)", "invalid_request_error",
                        None, "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._error().response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # raised inside the handler's body read: the APIError handler answers
                raise self._error()
            return message

        return await self.app(scope, counted, send)


def create_app(client: SchedulerClient) -> FastAPI:
    from portaserve import __version__
    from portaserve.server import native_api, openai_api

    args = client.args
    app = FastAPI(title="portaserve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.client = client
    app.state.token_texts = TokenTexts(client.tokenizer)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return _error(e.status_code, msg, kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logger.exception("internal error on %s", request.url.path)
        return _error(500, f"internal server error: {type(e).__name__}: {e}", "server_error")

    if args.api_key:
        want = f"Bearer {args.api_key}".encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path not in OPEN_PATHS:
                got = request.headers.get("authorization", "").encode()
                if not secrets.compare_digest(got, want):
                    msg = ("missing API key: send Authorization: Bearer <key>" if not got
                           else "invalid API key")
                    return _error(401, msg, "invalid_request_error", None, "invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    if args.max_request_body_mb:
        app.add_middleware(BodyLimit, limit=args.max_request_body_mb << 20)
    # browsers may call the API from any page, as SGLang and vLLM allow by default; added
    # last, so it is the outermost layer and answers preflights before the API key check
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.include_router(native_api.router)
    app.include_router(openai_api.router)

    @app.get("/metrics")
    async def metrics(request: Request):
        m = client.metrics
        if m is None:
            return _error(404, "metrics are off: start the server with --enable-metrics",
                          "not_found_error")
        try:
            m.update_from_stats(await client.call("stats", timeout=5))
        except Exception:  # noqa: BLE001 - still serve the HTTP-side metrics
            pass
        return Response(m.render(), media_type=m.content_type)

    @app.get("/")
    async def root():
        return {"name": "portaserve", "version": __version__,
                "model": client.info.get("served_model_name")}

    return app


WARMUP_TIMEOUT_S = 600  # first-use kernel builds (Triton, FlashInfer) on a fresh machine


async def _warmup(client: SchedulerClient) -> None:
    """One short request through the whole path before the port opens (SGLang does the
    same): the kernels that compile on first use (Triton's, on GPUs) compile now, not in
    the first user's request.  Its prompt is then dropped from the prefix cache."""
    import uuid

    from portaserve.server.common import make_req, wait_all

    t0 = time.perf_counter()
    lim = client.limits
    cap = min(lim.context_len, lim.pool_tokens)  # prompt + new tokens must fit both
    n = min(16, lim.vocab_size - 1, cap - 1)
    if n < 1:
        logger.warning("no warm-up request fits (context %d, pool %d, vocab %d); skipped",
                       lim.context_len, lim.pool_tokens, lim.vocab_size)
        return
    sp = {"max_new_tokens": min(8, cap - n), "temperature": 0, "ignore_eos": True}
    try:
        req = make_req(client, None, [1 + i for i in range(n)], sp, rid=f"WARMUP_{uuid.uuid4().hex}")
        states = client.submit([req])
        await asyncio.wait_for(wait_all(client, states), timeout=WARMUP_TIMEOUT_S)
        if states[0].error is not None:
            raise RuntimeError(states[0].error)
        flushed = await client.call("flush_cache", timeout=WARMUP_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"the warm-up request did not finish in {WARMUP_TIMEOUT_S} s "
                           "(--skip-server-warmup skips it)") from None
    except (APIError, RuntimeError) as e:  # SchedulerDead is a RuntimeError
        raise RuntimeError(f"the warm-up request failed: {e} (--skip-server-warmup skips it)") from None
    if not flushed:
        logger.warning("the warm-up prompt could not be flushed from the prefix cache")
    logger.info("warm-up request done in %.1f s", time.perf_counter() - t0)


async def _serve_async(args) -> int:
    import uvicorn

    client = SchedulerClient(args)
    try:
        await client.start()
    except BaseException:
        await client.close()
        raise
    if not args.skip_server_warmup:
        try:
            await _warmup(client)
        except BaseException:
            await client.close()
            raise
    if args.enable_metrics:
        from portaserve.server.metrics import Metrics

        client.metrics = Metrics(client.info.get("served_model_name") or "default")
    app = create_app(client)
    url = f"http://{args.host}:{args.port}"
    logger.info("portaserve is ready\n%s\nserving %r at %s", client.report,
                client.info.get("served_model_name"), url)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level == "debug", timeout_keep_alive=30,
                            timeout_graceful_shutdown=10, lifespan="off")
    server = uvicorn.Server(config)
    exit_code = {"code": 0}

    def on_death(message: str) -> None:
        exit_code["code"] = 1
        # /health answers 503 meanwhile; in-flight requests send their errors; then stop
        asyncio.get_running_loop().call_later(1.0, _stop)
        threading.Thread(target=_hard_exit, daemon=True).start()

    def _stop():
        server.should_exit = True
        server.force_exit = True

    def _hard_exit():
        time.sleep(5.0)
        logger.error("the server did not stop in 5 s after the scheduler died; exiting")
        os._exit(1)

    client.on_death = on_death
    try:
        await server.serve()
    finally:
        await client.close()
    if not server.started and exit_code["code"] == 0:
        return 1  # could not bind the port (uvicorn logged why)
    return exit_code["code"]


def serve(args) -> int:
    """Run the server until interrupted (0) or until the scheduler dies (1)."""
    try:
        return asyncio.run(_serve_async(args))
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, ValueError, OSError) as e:
        print(f"portaserve: error: {e}", file=sys.stderr)
        return 1
