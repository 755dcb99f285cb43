"""`xllama serve`: the OpenAI API and the LlamaChat page over HTTP (Starlette on uvicorn), with
one Engine doing the work.

The engine is not thread-safe and its `step` blocks, so it lives on one worker thread
(`EngineWorker`) that alone calls add, cancel and step; the event loop hands it requests through
a queue and gets each request's events back through `call_soon_threadsafe`. api.py knows the
request and response shapes; this module knows HTTP: routes, the API key, body limits, the
bounded queue, disconnects, the per-request log line and draining on shutdown."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import queue
import re
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

from . import report
from .api import ApiError, Job, Limits, Model, Reply, parse_chat, parse_completion
from .errors import XllamaError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request as HttpRequest
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:
    raise XllamaError(f"xllama serve needs {e.name or 'starlette and uvicorn'}, which is not "
                      "installed: pip install 'xllama-cli[serve]'") from None

from .engine import Engine, Event, Request, context_length

if TYPE_CHECKING:
    from .chat import Format
    from .loading import Loaded
    from .options import OpenedModel
    from .tokenizer import Tokenizer

Log = Callable[[str], None]
PAGE = "llamachat.html"


@dataclass(frozen=True)
class Settings:
    """How the server listens and what it admits; checked before the model loads."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8  # requests decoded together: the engine's slots
    max_queue: int = 64  # requests waiting for a slot, beyond the engine's max_batch running
    cors: tuple[str, ...] = ()  # origins allowed to call the API from a browser
    drain_seconds: float = 30.0
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise XllamaError(f"--port {self.port} is out of range: it must be from 0 (any free "
                              "port) to 65535")
        if self.max_batch < 1:
            raise XllamaError(f"--max-batch {self.max_batch} is out of range: it must be at "
                              "least 1")
        if self.max_queue < 0:
            raise XllamaError(f"--max-queue {self.max_queue} is out of range: it must be >= 0")
        if not 0 <= self.drain_seconds < float("inf"):
            raise XllamaError(f"--drain-seconds {self.drain_seconds} is out of range: it must be "
                              "a finite number >= 0")
        if self.api_key is not None and (not self.api_key.strip() or not self.api_key.isascii()):
            raise XllamaError("--api-key is empty or not ASCII; pass a key of printable ASCII "
                              "characters (or unset XLLAMA_API_KEY)")
        for origin in self.cors:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise XllamaError(f"--cors {origin!r} is not an origin; write it as "
                                  "http(s)://host[:port] with no path, or *")
        lim = self.limits
        for flag, value in (("--max-messages", lim.max_messages), ("--max-body", lim.max_body),
                            ("--max-tokens", 1 if lim.max_tokens is None else lim.max_tokens)):
            if value < 1:
                raise XllamaError(f"{flag} {value} is out of range: it must be at least 1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise XllamaError(f"cannot listen on {host}:{port}: {why}; choose another --host or "
                          "--port") from None
    sock.setblocking(False)
    return sock


# ---- the engine's thread ----
@dataclass
class Ticket:
    """One request between the event loop and the engine's thread."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    added: asyncio.Future | None = None  # the engine took it (None) or refused it (XllamaError)
    handle: Any = None  # what Engine.add returned; only the worker thread touches it
    done: bool = False  # its last event has been read (loop thread)

    def post(self, item: Any) -> None:
        """From the worker thread: hand an event (or a failure) to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def settle(self, error: Exception | None) -> None:
        def resolve() -> None:
            if self.added is not None and not self.added.done():
                if error is None:
                    self.added.set_result(None)
                else:
                    self.added.set_exception(error)
        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:
            pass


class EngineWorker:
    """The one thread that drives the engine: it takes add/cancel commands between steps and
    steps while any request is running or waiting. `live` and `waiting` are what the engine said
    after its last step, for /health."""

    def __init__(self, engine: Engine, log: Log = report.info) -> None:
        self.engine, self.log = engine, log
        self.inbox: queue.SimpleQueue[tuple[str, Ticket | None]] = queue.SimpleQueue()
        self.tickets: dict[int, Ticket] = {}  # id(ticket) -> ticket, for requests in the engine
        self.live = self.waiting = 0
        self.thread = threading.Thread(target=self._run, name="xllama-engine", daemon=True)

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is left and end the thread."""
        if self.thread.is_alive():
            self.inbox.put(("stop", None))
            self.thread.join(timeout)

    def add(self, ticket: Ticket) -> None:
        self.inbox.put(("add", ticket))

    def cancel(self, ticket: Ticket) -> None:
        self.inbox.put(("cancel", ticket))

    def cancel_all(self) -> None:
        """End every request now (the drain time is over); each gets a "cancelled" event."""
        self.inbox.put(("cancel_all", None))

    def _run(self) -> None:
        busy = stopping = False
        while True:
            for kind, ticket in self._commands(block=not busy and not stopping):
                if kind == "stop":
                    stopping = True
                elif kind == "cancel_all":
                    for t in self.tickets.values():
                        self.engine.cancel(t.handle)
                elif kind == "add":
                    self._add(ticket)
                elif ticket.handle is not None and id(ticket) in self.tickets:
                    self.engine.cancel(ticket.handle)
            if stopping:
                for t in self.tickets.values():
                    self.engine.cancel(t.handle)
            busy = self._step()
            if stopping and not busy:
                return

    def _commands(self, block: bool) -> list[tuple[str, Ticket | None]]:
        out = [self.inbox.get()] if block else []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _add(self, ticket: Ticket) -> None:
        deliver = ticket.request.on_event

        def on_event(event: Event) -> None:
            if event.finish_reason is not None:
                self.tickets.pop(id(ticket), None)
            if deliver is not None:
                deliver(event)

        ticket.request.on_event = on_event
        try:
            ticket.handle = self.engine.add(ticket.request)
        except Exception as e:  # XllamaError: the request is refused (400); else a bug (500)
            ticket.settle(e)
            return
        self.tickets[id(ticket)] = ticket
        ticket.settle(None)

    def _step(self) -> bool:
        try:
            busy = self.engine.step()
        except Exception as e:  # a bug or the device failing: every request in it is lost
            self.log(f"error: the engine failed: {type(e).__name__}: {e}")
            failed, self.tickets = list(self.tickets.values()), {}
            for t in failed:
                t.post(ApiError(500, f"the engine failed: {type(e).__name__}"))
                self.engine.cancel(t.handle)
            # the cancelled rows leave at the next step, which a new request starts: a failure
            # that repeats fails that request, not a loop
            busy = False
        self.live, self.waiting = self.engine.live, self.engine.waiting
        return busy


# ---- one request's life on the event loop ----
@dataclass
class Timing:
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None  # the first token's arrival
    end: float | None = None
    closed: bool = False  # counted out and logged

    def line(self, new_tokens: int) -> str:
        ttft = f"{(self.first - self.start) * 1e3:.0f} ms" if self.first is not None else "-"
        span = (self.end or time.perf_counter()) - (self.first or self.start)
        rate = (new_tokens - 1) / span if new_tokens > 1 and span > 0 else 0.0
        return f"ttft {ttft} | {rate:.1f} tok/s"


class Service:
    """What the routes share: the worker, the served model, the limits, the log."""

    def __init__(self, worker: EngineWorker, model: Model, settings: Settings,
                 log: Log = report.info) -> None:
        self.worker, self.model, self.settings, self.log = worker, model, settings, log
        self.pending = 0  # requests admitted and not yet finished (running or waiting)
        self.created = int(time.time())

    @property
    def capacity(self) -> int:
        return self.worker.max_batch + self.settings.max_queue

    def health(self) -> dict[str, Any]:
        live = self.worker.live
        return {"status": "ok", "model": self.model.name, "slots_in_use": live,
                "slots_total": self.worker.max_batch,
                "queue_length": max(self.pending - live, 0, self.worker.waiting)}

    async def run(self, http: HttpRequest, job: Job) -> Response:
        """Admit a checked request into the engine and answer it, streamed or whole."""
        if self.pending >= self.capacity:
            raise ApiError(503, f"the server is busy: {self.pending} requests are running or "
                                "waiting; try again later", code="queue_full")
        loop = asyncio.get_running_loop()
        reply = Reply(job, self.model.name, self.model.tokenizer)
        ticket = Ticket(Request(job.prompt, job.max_tokens, job.sampling, job.stop,
                                logprobs=job.logprobs), loop, added=loop.create_future())
        ticket.request.on_event = ticket.post
        timing = Timing()
        self.pending += 1
        try:
            self.worker.add(ticket)
            await ticket.added
        except XllamaError as e:
            self.pending -= 1
            raise ApiError(400, str(e)) from None
        except BaseException:
            self.pending -= 1
            self.release(ticket)
            raise
        if job.stream:
            return _Stream(self._stream(ticket, reply, timing),
                           lambda: self._close(ticket, reply, timing))
        try:
            gone = await self._collect(http, ticket, reply, timing)
        finally:
            self._done(reply, timing)
        if gone:  # nobody reads this answer
            return Response(status_code=499)
        return JSONResponse(reply.body())

    async def events(self, ticket: Ticket, timing: Timing) -> AsyncIterator[Event]:
        """The request's events as they come, up to its last."""
        while not ticket.done:
            event = await ticket.events.get()
            if isinstance(event, ApiError):
                raise event
            if event.tokens and timing.first is None:
                timing.first = time.perf_counter()
            ticket.done = event.finish_reason is not None
            if event.finish_reason == "cancelled":  # not by this client: the server is stopping
                raise ApiError(503, "the server is stopping: the answer was cut when its drain "
                                    "time ended", code="server_stopping")
            yield event

    def release(self, ticket: Ticket) -> None:
        """A request left before its end (a disconnect, a cancelled task, an error): cancel it in
        the engine, which frees its slot at the next step."""
        if not ticket.done:
            ticket.done = True
            self.worker.cancel(ticket)

    async def _collect(self, http: HttpRequest, ticket: Ticket, reply: Reply,
                       timing: Timing) -> bool:
        """Gather a whole answer, or stop when the client goes away (then True)."""
        async def gather() -> None:
            async for event in self.events(ticket, timing):
                reply.add(event)

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                reply.finish_reason = "cancelled"
                await asyncio.gather(work, return_exceptions=True)
            self.release(ticket)
        if reply.finish_reason != "cancelled":
            try:
                work.result()  # an engine failure or the server's stop is raised here
            except ApiError as e:
                reply.finish_reason = _ended_by(e)
                e.logged = True  # in this request's own line
                raise
        return reply.finish_reason == "cancelled"

    async def _stream(self, ticket: Ticket, reply: Reply, timing: Timing) -> AsyncIterator[str]:
        try:
            first = reply.first_chunk()
            if first is not None:
                yield sse(first)
            sent = 0
            async for event in self.events(ticket, timing):
                reply.add(event)
                chunk = reply.chunk(event, sent)
                sent += len(event.text)
                if chunk is not None:
                    yield sse(chunk)
            if reply.job.include_usage:
                yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the stream has begun: the error goes in it, as OpenAI does
            reply.finish_reason = _ended_by(e)
            yield sse(e.body())
        finally:
            self._close(ticket, reply, timing)

    def _close(self, ticket: Ticket, reply: Reply, timing: Timing) -> None:
        """A stream's end, however it came (also when it never started: a client gone before
        the first chunk)."""
        self.release(ticket)
        if reply.finish_reason is None:
            reply.finish_reason = "cancelled"
        self._done(reply, timing)

    def _done(self, reply: Reply, timing: Timing) -> None:
        if timing.closed:
            return
        timing.closed = True
        self.pending -= 1
        timing.end = timing.end or time.perf_counter()
        status = reply.finish_reason or "error"
        if status == "cancelled":
            status += " (client disconnected)"
        self.log(f"{reply.id} | prompt {reply.prompt_tokens} tokens | new "
                 f"{reply.completion_tokens} tokens | {timing.line(reply.completion_tokens)} | "
                 f"{status}")


def _ended_by(e: ApiError) -> str:
    """How a request that failed once admitted ended, for its log line."""
    if e.code == "server_stopping":
        return "cancelled (server stopping)"
    return f"error {e.status}: {e.message}"


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """Server-sent events that call `on_close` when the response ends, even if its body never
    started (Starlette drops an unstarted generator without running its `finally`)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- HTTP ----
async def read_json(http: HttpRequest, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refused past `limit` bytes before it is all read."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; this server takes at most "
                            f"{limit} (--max-body)")
    data = bytearray()
    async for chunk in http.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (--max-body)")
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


class RequireKey:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer <key>`. The page and /health
    are open (the page asks for the key when the API refuses it)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") \
                and scope.get("method") != "OPTIONS" and not self._allowed(scope):
            error = ApiError(401, "a valid API key is required: send the header 'Authorization: "
                                  "Bearer <key>'", code="invalid_api_key")
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class LoopbackHostOnly:
    """ASGI middleware for a server on a loopback address: a request must name a loopback host
    (localhost, 127.x.x.x, [::1]). A web page whose own name an attacker points at 127.0.0.1 (DNS
    rebinding) sends its own name, and is refused."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            name = host[1:host.find("]")] if host.startswith("[") else host.split(":")[0]
            if not is_loopback(name.lower()):
                error = ApiError(400, f"the Host header {host!r} does not name this loopback "
                                      "server; use localhost or 127.0.0.1 (or listen on another "
                                      "--host)")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def page_response() -> Callable[[HttpRequest], Any]:
    """GET /: LlamaChat, with a content security policy that runs its own inline script (by
    hash) and nothing else, and lets it talk only to this server."""
    html = (resources.files("xllama_cli") / "static" / PAGE).read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
                      + "'" for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}

    async def page(_http: HttpRequest) -> Response:
        return HTMLResponse(html, headers=headers)

    return page


def create_app(worker: EngineWorker, model: Model, settings: Settings,
               log: Log = report.info) -> Starlette:
    """The ASGI app. Its lifespan starts the worker thread and, at shutdown (after uvicorn has
    drained the running requests), cancels what is left and stops it."""
    service = Service(worker, model, settings, log)

    async def chat(http: HttpRequest) -> Response:
        return await service.run(http, parse_chat(await read_json(http, model.limits.max_body),
                                                  model))

    async def completions(http: HttpRequest) -> Response:
        body = await read_json(http, model.limits.max_body)
        return await service.run(http, parse_completion(body, model))

    async def models(_http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model.name, "object": "model", "created": service.created,
             "owned_by": "xllama", "max_model_len": model.context}]})

    async def health(_http: HttpRequest) -> Response:
        return JSONResponse(service.health())

    async def on_api_error(http: HttpRequest, e: ApiError) -> Response:
        if not e.logged:
            log(f"- | {http.method} {http.url.path} | {e.status}: {e.message}")
        return error_response(e)

    async def on_http_error(http: HttpRequest, e: HTTPException) -> Response:
        what = {404: f"no route {http.url.path}", 405: f"{http.method} is not allowed on "
                f"{http.url.path}"}.get(e.status_code, str(e.detail))
        return await on_api_error(http, ApiError(e.status_code, what))

    async def on_crash(http: HttpRequest, e: Exception) -> Response:
        return await on_api_error(http, ApiError(500, f"internal error: {type(e).__name__}"))

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    middleware = [Middleware(CORSMiddleware, allow_origins=list(settings.cors),
                             allow_methods=["GET", "POST", "OPTIONS"],
                             allow_headers=["Authorization", "Content-Type"])] \
        if settings.cors else []
    if is_loopback(settings.host):
        middleware.append(Middleware(LoopbackHostOnly))
    if settings.api_key:
        middleware.append(Middleware(RequireKey, key=settings.api_key))
    routes = [Route("/", page_response()), Route("/health", health),
              Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers,
                    lifespan=lifespan)
    app.state.worker = worker
    return app


class _Server(uvicorn.Server):
    """uvicorn's server with xllama's drain: at the first Ctrl-C or SIGTERM it stops accepting
    (uvicorn), and after `drain_seconds` the engine cancels what still runs, so that every request
    ends through its own code (a 503 in its stream or as its answer) rather than by uvicorn
    cancelling its task. The signal is kept (`stopped_by`) for the command's exit status instead
    of being raised again."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float,
                 on_deadline: Callable[[], None], log: Log) -> None:
        super().__init__(config)
        self.drain_seconds, self.on_deadline, self.log = drain_seconds, on_deadline, log
        self.stopped_by: int | None = None

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self.handle_exit)
                  for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            self.log(f"stopping: running requests have {self.drain_seconds:g} s to finish (again "
                     "to stop now)")
            self.stopped_by = sig
            deadline = threading.Timer(self.drain_seconds, self.on_deadline)
            deadline.daemon = True
            deadline.start()
        super().handle_exit(sig, frame)


def server(app: Starlette, drain_seconds: float, log: Log = report.info) -> _Server:
    """A uvicorn server for `app` (run it with `.run(sockets=[listen(...)])`): its own access log
    off (the app logs one line per request, never a header), and on Ctrl-C or SIGTERM it stops
    accepting, lets running requests finish for up to `drain_seconds`, then cancels them."""
    # uvicorn's own limit only backs up the drain: by then every request has been cancelled
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_seconds + 10, server_header=False)
    return _Server(config, drain_seconds, app.state.worker.cancel_all, log)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_app(loaded: Loaded, tokenizer: Tokenizer, name: str, chat_format: Format,
             settings: Settings, log: Log = report.info) -> Starlette:
    """The app serving a loaded model: an Engine with `settings.max_batch` slots on its worker
    thread."""
    engine = Engine(loaded.model, tokenizer, settings.max_batch, step=loaded.step, tp=loaded.tp)
    model = Model(name, tokenizer, chat_format, context_length(loaded.model), settings.limits)
    return create_app(EngineWorker(engine, log), model, settings, log)


def run(opened: OpenedModel, name: str, settings: Settings, *, template: str | None = None,
        compile: bool = False, log: Log = report.info) -> int | None:
    """Serve a checkpoint until Ctrl-C or SIGTERM (returned: the signal's number), every setting
    checked, the chat template chosen and the port bound before the weights load."""
    from .chat import TEMPLATES, choose_template

    chosen, why = choose_template(opened.checkpoint.path, template or "auto")
    if not settings.api_key and not is_loopback(settings.host):
        log(f"warning: listening on {settings.host} without --api-key: anyone who can reach this "
            "address can use the model; set --api-key or XLLAMA_API_KEY")
    sock = listen(settings.host, settings.port)
    try:
        loaded = opened.load(compile=compile, decode_batch=settings.max_batch)
        fmt = TEMPLATES[chosen] if isinstance(chosen, str) else chosen
        app = make_app(loaded, opened.tokenizer, name, fmt, settings, log)
        log(f"serving {name} at {url_of(sock)} (LlamaChat at /, the OpenAI API at /v1): max batch "
            f"{settings.max_batch}, queue {settings.max_queue}, template {chosen} ({why})")
        running = server(app, settings.drain_seconds, log)
        running.run(sockets=[sock])
        log("stopped")
        return running.stopped_by
    finally:
        sock.close()
