"""scripts/download.sh against a local server laid out like Meta's signed download URL.

The server answers `/PATH?Policy=...&Signature=...&Key-Pair-Id=...` (403 for any other query, as
an expired or altered URL gets), honours Range (416 past the end, as S3/CloudFront do), counts the
body bytes it serves per path, and can corrupt, drop or stall a file. The 7B and 13B folders hold
the trained stories260K fixture in Meta's layout (1 and 2 shards), so what the script fetches is
run with `xllama generate` and must give the fixture's known story.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from conftest import ROOT, STORY, fixture
from xllama_cli.cli import app

SCRIPT = ROOT / "scripts" / "download.sh"
SECRET = "Policy=eyJTZWNSRVQiOiJzZWNyZXQifQ__&Signature=SeCrEtSiGnAtUrE~&Key-Pair-Id=K2SECRETKEYPAIR"
BASH = shutil.which("bash")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _checklist(files: dict[str, bytes]) -> bytes:
    return "".join(f"{_md5(data)}  {name}\n" for name, data in sorted(files.items())).encode()


@pytest.fixture(scope="module")
def meta_files() -> dict[str, bytes]:
    """Every path the signed URL serves, in Meta's Llama 2 layout."""
    files = {"LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
             "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
             "tokenizer.model": fixture("llama2c/tok512.model").read_bytes()}
    files["tokenizer_checklist.chk"] = _checklist({"tokenizer.model": files["tokenizer.model"]})
    rng = __import__("random").Random(0)
    models = {"llama-2-7b": fixture("stories260K-meta"), "llama-2-13b": fixture("stories260K-meta-mp2")}
    for name, src in models.items():
        for chat in ("", "-chat"):
            folder = {p.name: p.read_bytes() for p in src.iterdir() if p.name != "tokenizer.model"}
            folder["checklist.chk"] = _checklist(folder)
            files.update({f"{name}{chat}/{k}": v for k, v in folder.items()})
    for chat in ("", "-chat"):  # 70B: eight shards of filler
        folder = {f"consolidated.{i:02d}.pth": rng.randbytes(3000) for i in range(8)}
        folder["params.json"] = b'{"dim": 8192, "n_heads": 64, "n_kv_heads": 8, "n_layers": 80}'
        folder["checklist.chk"] = _checklist(folder)
        files.update({f"llama-2-70b{chat}/{k}": v for k, v in folder.items()})
    return files


class MetaServer:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.served: Counter[str] = Counter()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range)
        self.corrupt: set[str] = set()
        self.cut_once: dict[str, int] = {}
        self.stall: dict[str, tuple[int, threading.Event]] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/*?{SECRET}"

    def stop(self) -> None:
        for _, event in self.stall.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _plain(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path.lstrip("/")
                with srv.lock:
                    srv.requests.append((path, self.headers.get("Range")))
                if parts.query != SECRET:
                    return self._plain(403, b"<Error><Code>AccessDenied</Code></Error>")
                if path not in srv.files:
                    return self._plain(404, b"<Error><Code>NoSuchKey</Code></Error>")
                data = srv.files[path]
                if path in srv.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        return self._plain(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if self.command == "HEAD":
                    return
                end, stall = len(data), None
                with srv.lock:
                    if path in srv.cut_once:
                        end = max(srv.cut_once.pop(path), start)
                    elif path in srv.stall:
                        end, stall = srv.stall[path]
                        end = max(end, start)
                self.wfile.write(data[start:end])
                self.wfile.flush()
                with srv.lock:
                    srv.served[path] += end - start
                if end < len(data):  # drop the connection mid-file
                    if stall is not None:
                        stall.wait(30)
                    self.close_connection = True

        return Handler


@pytest.fixture
def server(meta_files):
    s = MetaServer(meta_files)
    yield s
    s.stop()


@pytest.fixture(params=["wget", "curl"])
def tool_path(request, tmp_path_factory) -> str:
    """PATH for the script: the system's, or one without wget (so the script falls back to curl)."""
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    if request.param == "wget":
        return os.environ["PATH"]
    bin_dir = tmp_path_factory.mktemp("no-wget-bin")
    for d in os.environ["PATH"].split(os.pathsep):
        if os.path.isdir(d):
            for entry in os.scandir(d):
                target = bin_dir / entry.name
                if entry.name != "wget" and not target.exists():
                    target.symlink_to(entry.path)
    assert shutil.which("wget", path=str(bin_dir)) is None and shutil.which("curl", path=str(bin_dir))
    return str(bin_dir)


def run_script(path_env: str, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path_env)
    r = subprocess.run([BASH, str(SCRIPT), *args], env=env, input=stdin, capture_output=True, text=True,
                       timeout=timeout)
    # the signed part of the URL is a secret: it must never be printed, whatever happens
    assert "SeCrEt" not in r.stdout + r.stderr and "Policy=" not in r.stdout + r.stderr
    return r


def _generate(model: Path) -> str:
    r = CliRunner().invoke(app, ["generate", "--model", str(model), "--temperature", "0", "--quiet", "-n", "60",
                                 "Once upon a time"])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_a_good_run_passes_the_checksums_and_a_rerun_fetches_nothing(server, meta_files, tool_path, tmp_path):
    out = tmp_path / "llama-2"
    r = run_script(tool_path, "--url", server.url, "--models", "7B,13B", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Checksums match") == 3  # tokenizer, 7B, 13B
    for name in ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk",
                 "llama-2-7b/consolidated.00.pth", "llama-2-7b/params.json", "llama-2-7b/checklist.chk",
                 "llama-2-13b/consolidated.00.pth", "llama-2-13b/consolidated.01.pth", "llama-2-13b/params.json"]:
        assert (out / name).read_bytes() == meta_files[name], name
    assert not (out / "llama-2-70b").exists() and not (out / "llama-2-7b-chat").exists()

    # run again: every file is already complete, so no file body is sent twice
    served = sum(server.served.values())
    r = run_script(tool_path, "--url", server.url, "--models", "7B,13B", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    assert sum(server.served.values()) == served


def test_what_the_script_fetches_runs_in_xllama_generate(server, tmp_path):
    out = tmp_path / "llama-2"
    r = run_script(os.environ["PATH"], "--url", server.url, "--models", "7B,13B-chat", "--dir", str(out))
    assert r.returncode == 0, r.stderr
    assert f"xllama generate --model {out}/llama-2-7b" in r.stdout
    assert _generate(out / "llama-2-7b").startswith(STORY)  # 1 shard, tokenizer.model from the parent folder
    assert _generate(out / "llama-2-13b-chat").startswith(STORY)  # 2 model-parallel shards, merged


def test_the_prompts_ask_for_url_and_models_and_70b_has_eight_shards(server, meta_files, tmp_path):
    out = tmp_path / "llama-2"
    r = run_script(os.environ["PATH"], "--dir", str(out), stdin=f"{server.url}\n70B-chat\n")
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in (out / "llama-2-70b-chat").glob("consolidated.*.pth"))
    assert shards == [f"consolidated.{i:02d}.pth" for i in range(8)]
    assert r.stdout.count("Checksums match") == 2


def test_a_corrupted_shard_fails_naming_it(server, tool_path, tmp_path):
    server.corrupt.add("llama-2-13b/consolidated.01.pth")
    out = tmp_path / "llama-2"
    r = run_script(tool_path, "--url", server.url, "--models", "13B", "--dir", str(out))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checksum mismatch") and f"{out}/llama-2-13b/consolidated.01.pth" in last
    assert "consolidated.00.pth" not in last


def test_an_interrupted_run_resumes_on_the_next_run_fetching_only_the_rest(server, meta_files, tool_path, tmp_path):
    name = "llama-2-7b/consolidated.00.pth"
    size = len(meta_files[name])
    cut = size // 2
    release = threading.Event()
    server.stall[name] = (cut, release)
    out = tmp_path / "llama-2"
    args = ["--url", server.url, "--models", "7B", "--dir", str(out)]
    proc = subprocess.Popen([BASH, str(SCRIPT), *args], env=dict(os.environ, PATH=tool_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    part = out / name
    try:  # half the shard sent and (but for the downloader's last write buffer) on disk: kill it, as a power cut would
        deadline = time.time() + 60
        while not (server.served[name] == cut and part.is_file() and part.stat().st_size >= cut - 65536):
            assert time.time() < deadline and proc.poll() is None, "the download never reached the cut"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        del server.stall[name]
        release.set()
    on_disk = part.stat().st_size
    assert 0 < on_disk <= cut

    r = run_script(tool_path, *args)
    assert r.returncode == 0, r.stderr
    assert server.served[name] - cut == size - on_disk  # the second run asked only for what was missing
    assert (name, f"bytes={on_disk}-") in server.requests
    assert (out / name).read_bytes() == meta_files[name]


def test_a_dropped_connection_ends_complete_within_two_runs_without_refetching(server, meta_files, tool_path, tmp_path):
    name = "llama-2-7b/consolidated.00.pth"
    server.cut_once[name] = 1000
    args = ["--url", server.url, "--models", "7B", "--dir", str(tmp_path)]
    r = run_script(tool_path, *args)
    if r.returncode != 0:  # curl does not retry a dropped transfer: it stops, naming the file
        assert name in r.stderr.strip().splitlines()[-1] and "run the script again" in r.stderr
        r = run_script(tool_path, *args)
    assert r.returncode == 0, r.stderr
    assert server.served[name] == len(meta_files[name])
    assert (tmp_path / name).read_bytes() == meta_files[name]


def test_a_refused_url_stops_with_an_error_and_no_secret(server, tool_path, tmp_path):
    expired = server.url.replace("Signature=SeCrEt", "Signature=OlD")
    r = run_script(tool_path, "--url", expired, "--models", "7B", "--dir", str(tmp_path))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: download of LICENSE failed") and "expired" in last


@pytest.mark.parametrize("args,message", [
    (["--models", "7B", "--url", "http://127.0.0.1:9/files?x=1"], "no '*'"),
    (["--models", "7B", "--url", "ftp://x/*"], "https://"),
    (["--models", "7B,65B", "--url", "http://127.0.0.1:9/*?x=1"], "unknown model '65B'"),
    (["--bogus"], "unknown argument"),
])
def test_bad_arguments_exit_2_before_any_download(args, message, tmp_path):
    r = run_script(os.environ["PATH"], "--dir", str(tmp_path / "d"), *args)
    assert r.returncode == 2
    assert message in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "d").exists()
