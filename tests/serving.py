"""Servers for the tests of `xllama serve`: the app on a uvicorn thread in this process (model
loaded once per module), or the real command in a subprocess (flags, signals, the log on
stderr). Both listen on 127.0.0.1 on a port the system picks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0  # waits are bounded so that a broken server fails a test instead of hanging it


def needs_serve_extra() -> None:
    for name in ("starlette", "uvicorn", "openai"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install -e '.[test]'")


def http_module():
    """The HTTP client the installed openai package is built on: httpx2 (openai 3) or httpx."""
    try:
        import httpx2
        return httpx2
    except ImportError:
        import httpx
        return httpx


@dataclass
class Running:
    url: str
    log: list[str]
    loaded: Any  # loading.Loaded
    tokenizer: Any
    worker: Any = None

    def client(self, key: str = "-"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=DEADLINE_S)


class SlowEngine:
    """An engine whose every step takes at least `seconds` longer: a slow model, so that a test
    (the browser's) can watch an answer stream and stop it before it ends."""

    def __init__(self, engine: Any, seconds: float) -> None:
        self.engine, self.seconds = engine, seconds

    def step(self) -> bool:
        time.sleep(self.seconds)
        return self.engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@contextmanager
def server_thread(model_path: Path, *, max_batch: int = 8, slow_s: float = 0.0,
                  template: str = "auto", wrap: Any = None, **settings: Any) -> Iterator[Running]:
    """The app for `model_path` (float32 on the CPU) served from a thread of this process; its
    engine made slow (`slow_s` a step) or wrapped by `wrap(engine)`."""
    from xllama_cli import serve
    from xllama_cli.api import Model
    from xllama_cli.chat import TEMPLATES, choose_template
    from xllama_cli.engine import Engine
    from xllama_cli.generation import context_length
    from xllama_cli.loading import load
    from xllama_cli.tokenizer import load_tokenizer

    loaded = load(model_path, device="cpu", dtype="float32", decode_batch=max_batch)
    tokenizer = load_tokenizer(model_path)
    chosen, _ = choose_template(model_path, template)
    fmt = TEMPLATES[chosen] if isinstance(chosen, str) else chosen
    config = serve.Settings(max_batch=max_batch, **settings)
    log: list[str] = []
    engine: Any = Engine(loaded.model, tokenizer, max_batch)
    if slow_s:
        engine = SlowEngine(engine, slow_s)
    if wrap is not None:
        engine = wrap(engine)
    worker = serve.EngineWorker(engine, log.append)
    model = Model(str(model_path.name), tokenizer, fmt, context_length(loaded.model),
                  config.limits)
    app = serve.create_app(worker, model, config, log.append)
    sock = serve.listen("127.0.0.1", 0)
    server = serve.server(app, config.drain_seconds, log.append)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started, "the server did not start")
    try:
        yield Running(serve.url_of(sock), log, loaded, tokenizer, worker)
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        sock.close()


def until(condition, what: str, deadline_s: float = DEADLINE_S, every_s: float = 0.02) -> Any:
    """Wait for condition() to be truthy (and return it), or fail saying `what`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"{what} within {deadline_s:g} s")


@dataclass
class Subprocess:
    proc: subprocess.Popen
    url: str
    stderr_path: Path
    lines: list[str] = field(default_factory=list)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextmanager
def server_process(args: list[str], tmp: Path, env: dict[str, str] | None = None
                   ) -> Iterator[Subprocess]:
    """`python -m xllama_cli serve --port 0 ARGS` with stderr to a file; the URL read from its
    'serving ... at URL' line."""
    err = tmp / "serve-stderr.txt"
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200", **(env or {})}
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "xllama_cli", "serve", "--port", "0",
                                 *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=f, env=environ, cwd=tmp)
    try:
        def started() -> str | None:
            m = re.search(r"serving .* at (http://\S+)", err.read_text(errors="replace"))
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}: {err.read_text()}")
            return m.group(1) if m else None

        url = until(started, "serve did not say where it listens")
        yield Subprocess(proc, url, err)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE_S)
