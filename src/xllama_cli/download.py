"""Checkpoints from the Hugging Face Hub: `xllama download`, and repo ids given as `--model`.

huggingface_hub does the transfer: its `http_get` fetches each file (a Range request for what is
missing, retries of dropped connections), and `hf_hub_download` lays out the cache or the `--out`
folder around it. xllama adds what huggingface_hub lacks:
- a partial file that outlives the process, so that the next run asks only for the rest
  (huggingface_hub >= 1.0 downloads into a new temporary file each time and deletes it on failure);
- a check of the content against the hub's sha256 (LFS files) or git blob id (huggingface_hub
  checks the size only);
- no trust in the server (HF_ENDPOINT may be a mirror, or hostile): every name, size, blob id and
  commit id of the listing is checked before any file is asked for, and so are the ETag and commit
  headers that hf_hub_download names cache files after (it checks file names, not those).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, Iterable, Iterator

from . import report
from .errors import XllamaError

# What xllama reads, among the files at the top of a repo
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json")
SAFETENSORS = ("*.safetensors", "model.safetensors.index.json")
TORCH_BIN = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
META = ("params.json", "consolidated.*.pth")
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth")

CHUNK = 1 << 20
PARTIAL_SUFFIX = ".xllama-incomplete"
_HEX40 = re.compile(r"[0-9a-f]{40}")  # a git blob or commit id
_HEX64 = re.compile(r"[0-9a-f]{64}")  # a sha256
# an ETag header as huggingface_hub reads it (it strips W/ and the quotes): a blob id or a sha256
_ETAG = re.compile(r'(?:W/)?"?([0-9a-f]{40}|[0-9a-f]{64})"?')

_REPO_ID = re.compile(r"(?!\.)[\w.-]+/(?!\.)[\w.-]+")


def is_repo_id(text: str) -> bool:
    """Whether text has the shape of a Hub repo id, `owner/name` (not ./x, ../x or /x)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text


# ---- --model: a folder, or a repo id found in the local cache ----
def resolve_model(model: str | Path) -> Path:
    """A local folder as given; else a repo id's snapshot in the HF cache (no network); else an
    error."""
    path = Path(model).expanduser()
    if path.exists() or not is_repo_id(str(model)):
        return path
    snapshot = cached_snapshot(str(model))
    if snapshot is None:
        raise XllamaError(f"{str(model)!r} is not a local folder, and the Hugging Face repo "
                          f"{model} is not downloaded; run: xllama download {model}")
    return snapshot


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of repo_id in the HF cache: its default branch first, else the newest
    other revision downloaded (a branch or tag by its ref, a commit by its snapshot)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")

    def newest_first(paths: Iterable[Path]) -> list[Path]:
        return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)

    revisions: list[str | None] = [None]  # None: the default branch
    if (storage / "refs").is_dir():
        refs = [p for p in (storage / "refs").rglob("*") if p.is_file()]
        revisions += [str(p.relative_to(storage / "refs")) for p in newest_first(refs)]
    if (storage / "snapshots").is_dir():
        revisions += [p.name for p in newest_first((storage / "snapshots").iterdir())]
    for revision in revisions:
        for name in ("config.json", "params.json"):
            found = try_to_load_from_cache(repo_id, name, revision=revision)
            if isinstance(found, str):
                return Path(found).parent
    return None


# ---- which files ----
def _matches(name: str, patterns: Iterable[str]) -> bool:
    # a pattern ending in "/" means everything under that folder, as in huggingface_hub
    return any(fnmatchcase(name, p + "*" if p.endswith("/") else p) for p in patterns)


def select_files(files: Iterable[str], include: Iterable[str] = (),
                 exclude: Iterable[str] = ()) -> list[str]:
    """The repo files xllama needs, plus --include matches, minus --exclude matches.

    Needed: config and tokenizer files, and the weights in one format only: safetensors (with the
    index) when the repo has any, else pytorch_model*.bin; a Meta-layout repo (params.json, no
    config.json) gives params.json and consolidated.NN.pth. Only top-level files by default.
    """
    files = list(files)
    top = [f for f in files if "/" not in f]
    patterns = list(AUX_FILES)
    if "config.json" not in top and "params.json" in top:
        patterns += META
    elif any(fnmatchcase(f, "*.safetensors") for f in top):
        patterns += SAFETENSORS
    else:
        patterns += TORCH_BIN
    chosen = {f for f in top if _matches(f, patterns)} | {f for f in files if _matches(f, include)}
    return sorted(f for f in chosen if not _matches(f, exclude))


# ---- what a server says, checked before it names a path ----
def path_problem(name: object) -> str | None:
    """Why `name` (a file name a hub listed, or a revision) would not stay inside the folder it is
    joined to; None when it would. Only a relative POSIX path of plain parts passes: no empty, '.'
    or '..' part, not absolute, no backslash or drive (separators and roots on Windows), no control
    character."""
    if not isinstance(name, str):
        return f"it is not text but {type(name).__name__}"
    if not name:
        return "it is empty"
    if name.startswith("/"):
        return "it is an absolute path"
    if "\\" in name:
        return "it holds a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "it has an empty, '.' or '..' part"
    if any(PureWindowsPath(part).drive for part in parts):
        return "it names a drive"
    return None


def _untrusted(repo_id: str, what: str) -> XllamaError:
    from huggingface_hub import constants

    return XllamaError(f"{repo_id} on {constants.ENDPOINT}: {what}; refusing it, as only a broken "
                       f"or hostile hub or mirror sends that (check HF_ENDPOINT)")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None   # LFS files: sha256 of the content
    blob_id: str | None  # git blob id: sha1 of b"blob <size>\0" + content

    @property
    def etag(self) -> str | None:
        """What the content must hash to, and the name huggingface_hub gives its blob in the
        cache."""
        return self.sha256 or self.blob_id

    def digest(self):
        """A fresh hash object for verifying the content, or None when the hub gave nothing to
        check."""
        if self.sha256:
            return hashlib.sha256()
        if self.blob_id and self.size is not None:
            h = hashlib.sha1()
            h.update(b"blob %d\0" % self.size)
            return h
        return None


def _remote_files(info, repo_id: str) -> dict[str, RemoteFile]:
    """The hub's listing of repo_id, with every name, size and id in it checked, chosen or not."""
    if not (isinstance(info.sha, str) and _HEX40.fullmatch(info.sha)):
        raise _untrusted(repo_id, f"the revision is at commit {info.sha!r}, which is not 40 hex "
                                  "digits")
    out = {}
    for s in info.siblings or []:
        name, lfs = s.rfilename, s.lfs
        why = path_problem(name)
        if why:
            raise _untrusted(repo_id, f"the file list names {name!r}, which would not stay inside "
                                      f"the target folder ({why})")
        sha256, size = (lfs.sha256, lfs.size) if lfs else (None, s.size)
        for kind, value, pattern, needed in (("sha256", sha256, _HEX64, lfs is not None),
                                             ("git blob id", s.blob_id, _HEX40, False)):
            well_formed = isinstance(value, str) and pattern.fullmatch(value)
            if (value is not None or needed) and not well_formed:
                digits = 64 if pattern is _HEX64 else 40
                raise _untrusted(repo_id, f"the file list gives {name!r} the {kind} {value!r}, "
                                          f"which is not {digits} lowercase hex digits")
        if size is not None and (type(size) is not int or size < 0):
            raise _untrusted(repo_id, f"the file list gives {name!r} the size {size!r}, which is "
                                      "not a number of bytes")
        out[name] = RemoteFile(name, size, sha256, s.blob_id)
    return out


def _model_info(repo_id: str, revision: str, token: str | None):
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
    # a listing huggingface_hub cannot parse
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise _untrusted(repo_id, f"its repo listing cannot be read ({type(e).__name__}: "
                                  f"{_first_line(e)})") from None


@dataclass
class _Listing:
    """What the hub listed: what its later answers about a file must agree with."""
    commit: str | None = None
    files: dict[str, RemoteFile] = field(default_factory=dict)


@contextmanager
def _checked_answers(repo_id: str) -> Iterator[_Listing]:
    """While the block runs, every HEAD answer's ETag and X-Repo-Commit are checked before
    huggingface_hub reads them (hf_hub_download names the blob, its temporary file and the snapshot
    folder after them): each must be a hash, and once the caller has filled in the listing, the
    very hash listed."""
    from urllib.parse import unquote

    from huggingface_hub.utils import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    listing = _Listing()

    def check(response) -> None:
        if response.request.method != "HEAD":
            return
        # the file asked about: what follows the (quoted) revision in .../resolve/<revision>/<name>
        path = response.request.url.raw_path.decode("ascii").split("?", 1)[0]
        name = unquote(path.split("/resolve/", 1)[-1].split("/", 1)[-1])
        # in huggingface_hub's order
        header = response.headers.get("X-Linked-Etag") or response.headers.get("ETag")
        etag = _ETAG.fullmatch(header) if header is not None else None
        if header is not None and etag is None:
            raise _untrusted(repo_id, f"the answer for {name!r} has the ETag "
                                      f"{header.strip(chr(34))!r}, which is not a blob id or "
                                      "sha256")
        commit = response.headers.get("X-Repo-Commit")
        if commit is not None and not _HEX40.fullmatch(commit):
            raise _untrusted(repo_id, f"the answer for {name!r} has the X-Repo-Commit {commit!r}, "
                                      "which is not 40 hex digits")
        f = listing.files.get(name)
        for what, got, listed in (("ETag", etag and etag.group(1), f and f.etag),
                                  ("commit", commit, listing.commit)):
            if got and listed and got != listed:
                raise XllamaError(f"{repo_id} changed on the Hub during the download: the answer "
                                  f"for {name} gives the {what} {got}, the file list {listed}; run "
                                  "the command again")

    def checked_client():
        client = default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = dict(hooks, response=[*hooks["response"], check])
        return client

    # a factory, not a hook on today's session: huggingface_hub replaces its session after a
    # connection error
    set_client_factory(checked_client)
    try:
        yield listing
    finally:
        set_client_factory(default_client_factory)


# ---- errors ----
def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network-error base class of the HTTP library huggingface_hub's session uses (httpx or
    its successor)."""
    from huggingface_hub.utils import get_session

    lib = sys.modules.get(type(get_session()).__module__.split(".")[0])
    err = getattr(lib, "TransportError", None)
    return (err,) if isinstance(err, type) else ()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _offline(repo_id: str) -> XllamaError:
    return XllamaError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to download "
                       f"{repo_id}")


@contextmanager
def hub_errors(repo_id: str, revision: str, token_in_use: bool) -> Iterator[None]:
    """Turns huggingface_hub's and the network's failures into one-line XllamaErrors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    unreachable = (f"cannot reach the Hugging Face Hub at {endpoint} ({{why}}); check the network "
                   "connection (and HF_ENDPOINT). Models already downloaded need no network: set "
                   "HF_HUB_OFFLINE=1 to run them from the cache")
    try:
        yield
    except RevisionNotFoundError:
        raise XllamaError(f"revision {revision!r} of {repo_id} was not found on the Hub; "
                          f"check --revision (a branch, tag or commit)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, GatedRepoError) or status in (401, 403):
            how = ("the token in use was not accepted for it" if token_in_use
                   else "no token was sent")
            raise XllamaError(f"access to {repo_id} was refused ({status}): it is gated or private "
                              f"(or does not exist); accept its licence at {endpoint}/{repo_id}, "
                              "then pass a token that has access (--token, HF_TOKEN or `hf auth "
                              f"login`); {how}") from None
        if status == 404 or isinstance(e, RepositoryNotFoundError):
            raise XllamaError(f"{repo_id} was not found on the Hugging Face Hub ({endpoint}); "
                              "check the repo id (owner/name)") from None
        raise XllamaError(f"the Hugging Face Hub answered {status} for {repo_id} "
                          f"({_first_line(e)}); try again later") from None
    except OfflineModeIsEnabled:
        raise _offline(repo_id) from None
    except LocalEntryNotFoundError as e:
        cause = e.__cause__ or e.__context__
        raise XllamaError(unreachable.format(why=_first_line(cause or e))) from None
    except _transport_errors() as e:
        raise XllamaError(unreachable.format(why=_first_line(e))) from None


# ---- one file: huggingface_hub's http_get into a partial file that outlives the run ----
def _hash_into(digest, file: BinaryIO) -> None:
    while chunk := file.read(CHUNK):
        digest.update(chunk)


class _Bar:
    """The progress bar huggingface_hub asks for (tqdm's context manager and `update`), drawn as a
    rich task."""

    def __init__(self, progress, name: str, *, total: float | None = None, initial: float = 0,
                 **_) -> None:
        self.progress, self.task = progress, progress.add_task(name, total=total, completed=initial)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.progress.advance(self.task, n)


class _Partial:
    """The partial file as http_get writes it: hashed as it grows, and refusing bytes past the size
    the hub listed (a server that kept sending would fill the disk)."""

    def __init__(self, file: BinaryIO, f: RemoteFile) -> None:
        self.file, self.f = file, f
        self._rehash()

    def _rehash(self) -> None:
        """Hash what the file holds: what an earlier run left there, or what a truncate kept."""
        self.digest = self.f.digest()
        end = self.file.seek(0, os.SEEK_END)
        if self.digest is not None:
            self.file.seek(0)
            _hash_into(self.digest, self.file)
        self.file.seek(end)

    def write(self, data: bytes) -> int:
        if self.f.size is not None and self.file.tell() + len(data) > self.f.size:
            raise XllamaError(f"{self.f.name}: the server sent more than the {self.f.size} bytes "
                              "the hub lists; the bad download was removed, run the command again")
        if self.digest is not None:
            self.digest.update(data)
        return self.file.write(data)

    # http_get starts over when a server ignores the Range
    def truncate(self, size: int | None = None) -> int:
        kept = self.file.truncate(size)
        self._rehash()
        return kept

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)


def fetch(url: str, headers: dict[str, str], f: RemoteFile, partial_path: Path, final: Path,
          bar) -> None:
    """Bring `partial_path` up to the whole file (continuing what an earlier run left there), check
    it against the hub's size and hash, and move it to `final`."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    partial_path.parent.mkdir(parents=True, exist_ok=True)
    if partial_path.is_file() and (f.size is None or partial_path.stat().st_size > f.size):
        # nothing to continue: no size to aim for, or not a prefix of this file
        partial_path.unlink()
    try:
        # unbuffered: what http_get has written is on disk for a later run to continue
        with partial_path.open("a+b", buffering=0) as file:
            out = _Partial(file, f)
            http_get(url, out, resume_size=out.tell(), headers=headers, expected_size=f.size,
                     displayed_filename=f.name, tqdm_class=bar)
    except XllamaError:
        partial_path.unlink(missing_ok=True)
        raise
    except HfHubHTTPError:
        raise  # refused or missing: hub_errors words it
    except ValueError as e:  # a file past the size plain HTTP downloads allow
        raise XllamaError(f"cannot download {f.name}: {_first_line(e)}") from None
    except (*_transport_errors(), OSError) as e:
        got = partial_path.stat().st_size if partial_path.is_file() else 0
        raise XllamaError(f"download of {f.name} stopped at {got} of {f.size} bytes "
                          f"({_first_line(e)}); run the same command again to resume") from None
    if out.digest is not None and out.digest.hexdigest() != f.etag:
        partial_path.unlink()  # a corrupt file is no base to resume from
        kind = "sha256" if f.sha256 else "git blob id"
        raise XllamaError(f"{f.name}: {kind} {out.digest.hexdigest()} does not match the hub's "
                          f"{f.etag}; the bad download was removed, run the command again")
    partial_path.replace(final)


# ---- where files go: the HF cache (blobs named by etag) or an --out folder ----
class _CacheTarget:
    def __init__(self, repo_id: str, commit: str) -> None:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        # resolved as hf_hub_download resolves it: the folder printed is the one it lays out
        self.cache_dir = Path(constants.HF_HUB_CACHE).expanduser().resolve()
        self.storage = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.folder = self.storage / "snapshots" / commit
        self.where = {"cache_dir": str(self.cache_dir)}

    def final(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f.etag

    def partial(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / (f.etag + PARTIAL_SUFFIX)

    def complete(self, f: RemoteFile) -> bool:
        p = self.final(f)
        return p.is_file() and (f.size is None or p.stat().st_size == f.size)

    def finished(self, f: RemoteFile, commit: str) -> None:
        pass  # hf_hub_download links snapshots/<commit>/<name> to the blob


class _FolderTarget:
    def __init__(self, out: Path, repo_id: str, force: bool) -> None:
        self.out, self.repo_id, self.force = out, repo_id, force
        self.folder = out.resolve()  # as hf_hub_download resolves it
        self.where = {"local_dir": str(self.folder)}

    def final(self, f: RemoteFile) -> Path:
        return self.out / f.name

    def partial(self, f: RemoteFile) -> Path:
        # inside huggingface_hub's own bookkeeping folder, which it marks as ignored by git
        return self.out / ".cache" / "huggingface" / "download" / (f.name + PARTIAL_SUFFIX)

    def complete(self, f: RemoteFile) -> bool:
        from huggingface_hub._local_folder import read_download_metadata

        p = self.final(f)
        if not p.exists():
            return False
        size_ok = p.is_file() and (f.size is None or p.stat().st_size == f.size)
        meta = read_download_metadata(self.out, f.name)
        if size_ok and meta is not None and meta.etag == f.etag:
            return True
        digest = f.digest()
        # e.g. put there by hand: accept it if it is the same file
        if size_ok and digest is not None:
            with p.open("rb") as file:
                _hash_into(digest, file)
            if digest.hexdigest() == f.etag:
                return True
        # a file an earlier download put there (another revision): replace it
        if self.force or meta is not None:
            return False
        raise XllamaError(f"{p} exists and is not {f.name} of {self.repo_id} at this revision; "
                          f"pass --force to replace it")

    def finished(self, f: RemoteFile, commit: str) -> None:
        from huggingface_hub._local_folder import write_download_metadata

        # what hf_hub_download reads to know the file is this commit's, without fetching or hashing
        # it again
        write_download_metadata(self.out, f.name, commit, f.etag)


def _check_config(repo_id: str, config_path: Path) -> None:
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise XllamaError(f"cannot read config.json of {repo_id}: {_first_line(e)}") from None
    from .config import FAMILIES

    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise XllamaError(f"{repo_id} holds no Llama checkpoint: its config.json has model_type "
                          f"{model_type!r} (xllama runs model_type {', '.join(FAMILIES)}, or "
                          "Meta's params.json layout)")


def download(repo_id: str, *, revision: str = "main", token: str | None = None,
             out: str | Path | None = None, include: Iterable[str] = (),
             exclude: Iterable[str] = (), force: bool = False) -> Path:
    """Fetch what xllama needs of repo_id (resumable, verified); returns the local folder that
    holds it."""
    if not is_repo_id(repo_id):
        raise XllamaError(f"{repo_id!r} is not a Hugging Face repo id (owner/name, e.g. "
                          "meta-llama/Llama-2-7b-hf)")
    why = path_problem(revision)  # huggingface_hub keeps refs/<revision> in the cache
    if why:
        raise XllamaError(f"--revision {revision!r} is not a branch, tag or commit name ({why})")
    # the writers' rule; which files of a folder are replaced is decided per file below
    if out is not None:
        from .writer import check_destination

        out = check_destination(out, force=force, kind="merge")
    from huggingface_hub import constants, get_token, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    token_in_use = bool(token or get_token())
    with hub_errors(repo_id, revision, token_in_use), _checked_answers(repo_id) as listing:
        if constants.is_offline_mode():
            raise _offline(repo_id)
        info = _model_info(repo_id, revision, token)
        remote = _remote_files(info, repo_id)
        listing.commit, listing.files = info.sha, remote
        if "config.json" not in remote and "params.json" not in remote:
            raise XllamaError(f"{repo_id} holds no Llama checkpoint: no config.json and no "
                              f"params.json at revision {revision!r}")
        names = select_files(remote, include, exclude)
        if not any(_matches(n, WEIGHTS) for n in names):
            raise XllamaError(f"{repo_id} has no weights xllama reads among the files chosen "
                              "(*.safetensors, pytorch_model*.bin, consolidated.NN.pth); check "
                              "--include/--exclude")
        target = (_FolderTarget(Path(out).expanduser(), repo_id, force) if out is not None
                  else _CacheTarget(repo_id, info.sha))
        # identity: byte offsets must be those of the file itself, never of a compressed stream
        headers = dict(build_hf_headers(token=token), **{"Accept-Encoding": "identity"})
        # learn the model type before the big files
        ordered = sorted(names, key=lambda n: n != "config.json")
        with report.transfer_progress() as progress:
            for name in ordered:
                f, bar = remote[name], partial(_Bar, progress, name)
                # without an etag the hub gave nothing to check it by: hf_hub_download fetches it
                if f.etag is not None:
                    if target.complete(f):
                        progress.add_task(f"{name} (already here)", total=f.size,
                                          completed=f.size)
                    else:
                        fetch(hf_hub_url(repo_id, name, revision=info.sha), headers, f,
                              target.partial(f), target.final(f), bar)
                    target.finished(f, info.sha)
                # finds the file checked here in place (its HEAD answer must agree with the
                # listing) and lays out around it: the snapshot link and refs/<revision>, or the
                # folder's metadata
                placed = Path(hf_hub_download(repo_id, name, revision=revision, token=token,
                                              tqdm_class=bar, **target.where))
                if name == "config.json":
                    _check_config(repo_id, placed)
    for name in names:
        f, p = remote[name], target.folder / name
        if not p.is_file() or (f.size is not None and p.stat().st_size != f.size):
            got = p.stat().st_size if p.is_file() else 0
            raise XllamaError(f"{p} is incomplete ({got} of {f.size} bytes); run the download "
                              "again")
    return target.folder
