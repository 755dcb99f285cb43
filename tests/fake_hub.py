"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that download.

It speaks what `HfApi.model_info`, `hf_hub_download` and `snapshot_download` use:
  GET  /api/models/{repo}/revision/{rev}      repo info (siblings with size, blobId, lfs.sha256)
  GET  /api/models/{repo}/tree/{rev}          file listing
  HEAD /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size
  GET  /{repo}/resolve/{rev}/{path}           the file (Range honoured)
and, like the real hub, it redirects LFS files to a CDN on another origin (a second port here),
so an Authorization header must not follow them there. Errors carry the hub's X-Error-Code.
Counts every body byte it serves per file, and can drop or stall a download at a given byte.

It can also play a hostile hub or mirror: list names and ids the client must not trust
(`FakeRepo.listing`), answer with forged headers (`FakeHub.forged`), and serve content for any
path at all (`FakeHub.answer_anything`), since a client may normalise `../` out of a URL.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    lfs: set[str]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    access: str = "public"  # public | private (401 everywhere without the token) | gated (401/403 on files)
    token: str | None = None
    refs: dict[str, str] = field(default_factory=dict)
    listing: dict[str, dict] = field(default_factory=dict)  # name -> fields that replace those listed for it

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def pointer_id(self, name: str) -> str:
        data = self.files[name]
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256(name)}\nsize {len(data)}\n"
        return git_blob_id(pointer.encode())


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.served: Counter[str] = Counter()      # file name -> body bytes sent
        self.requests: list[tuple[str, str, str, dict]] = []  # (origin, method, path, lower-cased headers)
        self.cut_once: dict[str, int] = {}         # name -> byte at which its next GET is dropped
        self.stall: dict[str, tuple[int, threading.Event]] = {}  # name -> (byte, event to wait for)
        self.corrupt: set[str] = set()             # names served with one byte flipped
        self.no_ranges: set[str] = set()           # names served whole (200) whatever Range is asked for
        self.forged: dict[str, dict] = {}          # name -> headers that replace those of its resolve answers
        self.answer_anything: bytes | None = None  # served, 200, for a path that matches no route
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    def add(self, repo_id: str, repo: FakeRepo) -> FakeRepo:
        repo.refs.setdefault("main", repo.commit)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> "FakeHub":
        for origin in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, origin))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for _, event in self.stall.values():
            event.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def requested(self, name: str) -> bool:
        return any(p.endswith("/" + name) or p.startswith("/cdn/") and self._cdn_name(p) == name
                   for _, _, p, _ in self.requests)

    def _cdn_name(self, path: str) -> str | None:
        sha = path.rsplit("/", 1)[-1]
        for repo in self.repos.values():
            for name in repo.lfs:
                if repo.sha256(name) == sha:
                    return name
        return None


def _handler(hub: FakeHub, origin: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        # ---- plumbing ----
        def _send(self, status: int, headers: dict | None = None, body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, headers: dict | None = None) -> None:
            self._send(200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}, body)

        def _file(self, name: str, data: bytes, headers: dict) -> None:
            if name in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            m = None if name in hub.no_ranges else re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                if start >= len(data):
                    self._send(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
            status = 206 if m else 200
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, str(v))
            if m:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            end, stall = len(data), None
            with hub.lock:
                if name in hub.cut_once:
                    end = max(hub.cut_once.pop(name), start)
                elif name in hub.stall:
                    end, stall = hub.stall[name]
                    end = max(end, start)
            chunk = data[start:end]
            self.wfile.write(chunk)
            self.wfile.flush()
            with hub.lock:
                hub.served[name] += len(chunk)
            if end < len(data):  # drop the connection mid-body, as a network failure would
                if stall is not None:
                    stall.wait(30)
                self.close_connection = True

        # ---- routes ----
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((origin, self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            if origin == "cdn":
                return self._cdn(path)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?", path)
            if m:
                return self._api(m.group(1), m.group(2), m.group(3) or "main")
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(*m.groups())
            if hub.answer_anything is not None:
                return self._anything(path)
            self._error(404, "EntryNotFound", "no such route")

        def _anything(self, path: str) -> None:
            data = hub.answer_anything
            commit = next(iter(hub.repos.values())).commit
            self._file(path, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'})

        def _auth_ok(self, repo: FakeRepo) -> bool:
            return repo.token is not None and self.headers.get("Authorization") == f"Bearer {repo.token}"

        def _repo(self, repo_id: str, rev: str, files: bool) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.access == "private" and not self._auth_ok(repo):
                self._error(401, "RepoNotFound", "Invalid username or password.")
                return None
            commit = repo.refs.get(rev, rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            if files and repo.access == "gated" and not self._auth_ok(repo):
                status = 403 if self.headers.get("Authorization") else 401
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                                 "and be authenticated to access it. Please log in.")
                return None
            return repo, commit

        def _api(self, repo_id: str, kind: str | None, rev: str) -> None:
            found = self._repo(repo_id, rev, files=False)
            if found is None:
                return
            repo, commit = found
            if kind == "tree":
                entries = []
                for name, data in repo.files.items():
                    entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                    if name in repo.lfs:
                        entry["oid"] = repo.pointer_id(name)
                        entry["lfs"] = {"oid": repo.sha256(name), "size": len(data), "pointerSize": 134}
                    entries.append(_forge(entry, repo.listing.get(name, {}), tree=True))
                folders = {n.rsplit("/", 1)[0] for n in repo.files if "/" in n}
                entries += [{"type": "directory", "path": d, "size": 0, "oid": "0" * 40} for d in sorted(folders)]
                return self._json(entries)
            siblings = []
            for name, data in repo.files.items():
                s = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                if name in repo.lfs:
                    s["blobId"] = repo.pointer_id(name)
                    s["lfs"] = {"size": len(data), "sha256": repo.sha256(name), "pointerSize": 134}
                siblings.append(_forge(s, repo.listing.get(name, {})))
            self._json({"_id": "x", "id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.access == "private",
                        "gated": "manual" if repo.access == "gated" else False, "disabled": False, "downloads": 0,
                        "likes": 0, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z", "siblings": siblings})

        def _resolve(self, repo_id: str, rev: str, name: str) -> None:
            found = self._repo(repo_id, rev, files=True)
            if found is None:
                return
            repo, commit = found
            if name not in repo.files:
                self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
                return
            data, forged = repo.files[name], hub.forged.get(name, {})
            if name in repo.lfs:
                sha = repo.sha256(name)
                self._send(302, {"Location": f"{hub.cdn_url}/cdn/{sha}", "X-Repo-Commit": commit,
                                 "ETag": f'"{repo.pointer_id(name)}"', "X-Linked-Etag": f'"{sha}"',
                                 "X-Linked-Size": len(data), **forged})
                return
            self._file(name, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"', **forged})

        def _cdn(self, path: str) -> None:
            name = hub._cdn_name(path)
            if name is None:
                return self._send(404)
            repo = next(r for r in hub.repos.values() if name in r.lfs)
            self._file(name, repo.files[name], {"ETag": f'"{repo.sha256(name)}"'})

    return Handler


def _forge(entry: dict, changes: dict, tree: bool = False) -> dict:
    """A listing entry with a hostile hub's changes: `rfilename`, `size`, `blobId`, `lfs` (merged) for the
    repo info; the same changes under the tree API's names (path, oid, lfs.oid) for the tree."""
    names = {"rfilename": "path", "blobId": "oid", "sha256": "oid"} if tree else {}
    out = dict(entry)
    for key, value in changes.items():
        if key == "lfs" and "lfs" in out:
            out["lfs"] = dict(out["lfs"], **{names.get(k, k): v for k, v in value.items()})
        else:
            out[names.get(key, key)] = value
    return out
