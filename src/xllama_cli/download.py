"""Checkpoints from the Hugging Face Hub: `xllama download`, and repo ids given as `--model`.

Every file is fetched by a resumable GET into a partial file that survives an interruption (the
next run asks the server only for the rest), checked against the hub's size and hash (sha256 for
LFS files, the git blob id for the others), and only then moved to where huggingface_hub keeps
it. `snapshot_download` then lays out the cache or the `--out` folder from those files: it finds
them in place and downloads nothing itself. (huggingface_hub >= 1.0 deletes its own partial
files when a download fails, so it cannot resume across runs on its own.)
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Iterator

from . import report
from .errors import XllamaError

# What xllama reads, among the files at the top of a repo
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json")
SAFETENSORS = ("*.safetensors", "model.safetensors.index.json")
TORCH_BIN = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
META = ("params.json", "consolidated.*.pth")
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth")

RETRIES = 5          # tries in a row that bring no new byte before a run gives up on a file
RETRY_WAIT_S = 1.0
CHUNK = 1 << 20
PARTIAL_SUFFIX = ".xllama-incomplete"

_REPO_ID = re.compile(r"(?!\.)[\w.-]+/(?!\.)[\w.-]+")


def is_repo_id(text: str) -> bool:
    """Whether text has the shape of a Hub repo id, `owner/name` (not ./x, ../x or /x)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text


# ---- --model: a folder, or a repo id found in the local cache ----
def resolve_model(model: str | Path) -> Path:
    """A local folder as given; else a repo id's snapshot in the HF cache (no network); else an error."""
    path = Path(model).expanduser()
    if path.exists() or not is_repo_id(str(model)):
        return path
    snapshot = cached_snapshot(str(model))
    if snapshot is None:
        raise XllamaError(f"{str(model)!r} is not a local folder, and the Hugging Face repo {model} is not "
                          f"downloaded; run: xllama download {model}")
    return snapshot


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of repo_id in the HF cache: its default branch first, else the newest other
    revision downloaded (a branch or tag by its ref, a commit by its snapshot)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    newest_first = lambda paths: sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)  # noqa: E731
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


def select_files(files: Iterable[str], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
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


# ---- the hub's view of a file ----
@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None   # LFS files: sha256 of the content
    blob_id: str | None  # git blob id: sha1 of b"blob <size>\0" + content

    @property
    def etag(self) -> str | None:
        """The name huggingface_hub gives the file's blob in its cache."""
        return self.sha256 or self.blob_id

    def digest(self):
        """A fresh hash object for verifying the content, or None when the hub gave nothing to check."""
        if self.sha256:
            return hashlib.sha256()
        if self.blob_id and self.size is not None:
            h = hashlib.sha1()
            h.update(b"blob %d\0" % self.size)
            return h
        return None

    def expected_digest(self) -> str | None:
        return self.sha256 or self.blob_id


def _remote_files(info) -> dict[str, RemoteFile]:
    out = {}
    for s in info.siblings or []:
        lfs = s.lfs
        size = lfs.size if lfs else s.size
        out[s.rfilename] = RemoteFile(s.rfilename, size, lfs.sha256 if lfs else None, s.blob_id)
    return out


# ---- errors ----
def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network-error base class of the HTTP library huggingface_hub's session uses (httpx or its successor)."""
    from huggingface_hub.utils import get_session

    lib = sys.modules.get(type(get_session()).__module__.split(".")[0])
    err = getattr(lib, "TransportError", None)
    return (err,) if isinstance(err, type) else ()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def hub_errors(repo_id: str, revision: str, token_in_use: bool) -> Iterator[None]:
    """Turns huggingface_hub's and the network's failures into one-line XllamaErrors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    unreachable = (f"cannot reach the Hugging Face Hub at {endpoint} ({{why}}); check the network connection "
                   f"(and HF_ENDPOINT). Models already downloaded need no network: set HF_HUB_OFFLINE=1 to run them "
                   f"from the cache")
    try:
        yield
    except RevisionNotFoundError:
        raise XllamaError(f"revision {revision!r} of {repo_id} was not found on the Hub; "
                          f"check --revision (a branch, tag or commit)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, GatedRepoError) or status in (401, 403):
            how = "the token in use was not accepted for it" if token_in_use else "no token was sent"
            raise XllamaError(f"access to {repo_id} was refused ({status}): it is gated or private (or does not "
                              f"exist); accept its licence at {endpoint}/{repo_id}, then pass a token that has access "
                              f"(--token, HF_TOKEN or `hf auth login`); {how}") from None
        if status == 404 or isinstance(e, RepositoryNotFoundError):
            raise XllamaError(f"{repo_id} was not found on the Hugging Face Hub ({endpoint}); check the repo id "
                              f"(owner/name)") from None
        raise XllamaError(f"the Hugging Face Hub answered {status} for {repo_id} ({_first_line(e)}); "
                          f"try again later") from None
    except OfflineModeIsEnabled:
        raise XllamaError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to download {repo_id}") from None
    except LocalEntryNotFoundError as e:
        cause = e.__cause__ or e.__context__
        raise XllamaError(unreachable.format(why=_first_line(cause or e))) from None
    except _transport_errors() as e:
        raise XllamaError(unreachable.format(why=_first_line(e))) from None


# ---- resumable, verified fetch of one file ----
def _hash_file(path: Path, digest) -> None:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)


def fetch(session, url: str, headers: dict[str, str], f: RemoteFile, partial: Path, final: Path, progress) -> int:
    """GET url into `partial` (continuing what an earlier run left there), verify it, move it to `final`.

    Returns the bytes received in this call. A dropped connection is retried with a Range request
    for the rest; after RETRIES tries without a new byte the partial file stays for the next run.
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if f.size is not None and have > f.size:  # not a prefix of this file: start over
        partial.unlink()
        have = 0
    digest = f.digest()
    if have and digest is not None:
        _hash_file(partial, digest)
    task = progress.add_task(f.name, total=f.size, completed=have)
    received, fruitless, net = 0, 0, _transport_errors()
    while f.size is None or have < f.size:
        before, error = have, None
        # identity: byte offsets must be those of the file itself, never of a compressed stream
        request_headers = dict(headers, **{"Accept-Encoding": "identity"}, **({"Range": f"bytes={have}-"} if have else {}))
        try:
            with session.stream("GET", url, headers=request_headers, follow_redirects=True) as r:
                if r.status_code >= 400:
                    r.read()  # the error's text is in the body
                    from huggingface_hub.utils import hf_raise_for_status

                    hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the Range: take it from the start
                    have, digest = 0, f.digest()
                with partial.open("ab" if have else "wb") as out:
                    for chunk in r.iter_bytes():  # as it arrives: a fixed chunk size would hold bytes back
                        out.write(chunk)
                        out.flush()  # what is on disk is what a later run resumes from
                        if digest is not None:
                            digest.update(chunk)
                        have += len(chunk)
                        received += len(chunk)
                        progress.update(task, completed=have)
            if f.size is None:
                break  # no size to aim for: the complete response is the file
        except net as e:
            error = e
        fruitless = 0 if have > before else fruitless + 1
        if f.size is not None and have < f.size and fruitless:
            if fruitless > RETRIES:
                why = _first_line(error) if error else "the server ended the response early"
                raise XllamaError(f"download of {f.name} stopped at {have} of {f.size} bytes ({why}); run the same "
                                  f"command again to resume") from None
            time.sleep(RETRY_WAIT_S)
    if f.size is not None and have != f.size:
        partial.unlink()
        raise XllamaError(f"{f.name}: the server sent {have} bytes, the hub lists {f.size}; run the command again")
    if digest is not None and digest.hexdigest() != f.expected_digest():
        partial.unlink()  # a corrupt file is no base to resume from
        kind = "sha256" if f.sha256 else "git blob id"
        raise XllamaError(f"{f.name}: {kind} {digest.hexdigest()} does not match the hub's {f.expected_digest()}; "
                          f"the bad download was removed, run the command again")
    partial.replace(final)
    return received


# ---- where files go: the HF cache (blobs named by etag) or an --out folder ----
class _CacheTarget:
    def __init__(self, repo_id: str) -> None:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.cache_dir = Path(constants.HF_HUB_CACHE)
        self.storage = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")

    def final(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f.etag

    def partial(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / (f.etag + PARTIAL_SUFFIX)

    def complete(self, f: RemoteFile) -> bool:
        p = self.final(f)
        return p.is_file() and (f.size is None or p.stat().st_size == f.size)

    def finished(self, f: RemoteFile, commit: str) -> None:
        pass  # snapshot_download links snapshots/<commit>/<name> to the blob


class _FolderTarget:
    def __init__(self, out: Path, repo_id: str, force: bool) -> None:
        self.out, self.repo_id, self.force = out, repo_id, force

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
        if size_ok and digest is not None:  # e.g. put there by hand: accept it if it is the same file
            _hash_file(p, digest)
            if digest.hexdigest() == f.expected_digest():
                return True
        if self.force or meta is not None:  # a file an earlier download put there (another revision): replace it
            return False
        raise XllamaError(f"{p} exists and is not {f.name} of {self.repo_id} at this revision; "
                          f"pass --force to replace it")

    def finished(self, f: RemoteFile, commit: str) -> None:
        from huggingface_hub._local_folder import write_download_metadata

        # what snapshot_download reads to know the file is this commit's, without hashing it again
        write_download_metadata(self.out, f.name, commit, f.etag)


def _check_config(repo_id: str, config_path: Path) -> None:
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise XllamaError(f"cannot read config.json of {repo_id}: {_first_line(e)}") from None
    if model_type != "llama":
        raise XllamaError(f"{repo_id} holds no Llama checkpoint: its config.json has model_type {model_type!r} "
                          f"(xllama runs model_type 'llama', or Meta's params.json layout)")


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # our own bars show the bytes; snapshot_download only links files here
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def download(repo_id: str, *, revision: str = "main", token: str | None = None, out: str | Path | None = None,
             include: Iterable[str] = (), exclude: Iterable[str] = (), force: bool = False) -> Path:
    """Fetch what xllama needs of repo_id (resumable, verified); returns the local folder that holds it."""
    if not is_repo_id(repo_id):
        raise XllamaError(f"{repo_id!r} is not a Hugging Face repo id (owner/name, e.g. meta-llama/Llama-2-7b-hf)")
    from huggingface_hub import HfApi, constants, get_token, hf_hub_url, snapshot_download
    from huggingface_hub.utils import build_hf_headers, get_session

    token_in_use = bool(token or get_token())
    with hub_errors(repo_id, revision, token_in_use):
        if constants.is_offline_mode():
            raise XllamaError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to download {repo_id}")
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
        remote = _remote_files(info)
        if "config.json" not in remote and "params.json" not in remote:
            raise XllamaError(f"{repo_id} holds no Llama checkpoint: no config.json and no params.json at "
                              f"revision {revision!r}")
        names = select_files(remote, include, exclude)
        if not any(_matches(n, WEIGHTS) for n in names):
            raise XllamaError(f"{repo_id} has no weights xllama reads among the files chosen "
                              f"(*.safetensors, pytorch_model*.bin, consolidated.NN.pth); check --include/--exclude")
        target = _FolderTarget(Path(out).expanduser(), repo_id, force) if out is not None else _CacheTarget(repo_id)
        session, headers = get_session(), build_hf_headers(token=token)
        ordered = sorted(names, key=lambda n: n != "config.json")  # learn the model type before the big files
        with report.transfer_progress() as progress:
            for name in ordered:
                f = remote[name]
                if f.etag is None:
                    continue  # no metadata to name or check it by: snapshot_download fetches it
                if target.complete(f):
                    progress.add_task(f"{name} (already here)", total=f.size, completed=f.size)
                else:
                    url = hf_hub_url(repo_id, name, revision=info.sha)
                    fetch(session, url, headers, f, target.partial(f), target.final(f), progress)
                    target.finished(f, info.sha)
                if name == "config.json":
                    _check_config(repo_id, target.final(f))
        folder = Path(snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=names, tqdm_class=_quiet_tqdm(),
            **({"local_dir": str(target.out)} if out is not None else {"cache_dir": str(target.cache_dir)})))
    for name in names:
        f, p = remote[name], folder / name
        if not p.is_file() or (f.size is not None and p.stat().st_size != f.size):
            got = p.stat().st_size if p.is_file() else 0
            raise XllamaError(f"{p} is incomplete ({got} of {f.size} bytes); run the download again")
    return folder
