"""`xllama download` and `--model REPO_ID`, end to end against a fake hub on 127.0.0.1.

The CLI runs in a subprocess: huggingface_hub reads HF_ENDPOINT and HF_HUB_CACHE when imported,
so each run gets a fresh environment pointing at this test's server and cache.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, fixture, make_hf_checkpoint
from fake_hub import FakeHub, FakeRepo
from xllama_cli.cli import app
from xllama_cli.download import is_repo_id, path_problem, select_files

NEEDED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
NOT_NEEDED = ["README.md", ".gitattributes", "pytorch_model.bin", "flax_model.msgpack", "original/consolidated.00.pth",
              "original/params.json"]
LFS = {"model.safetensors", "tokenizer.model", "pytorch_model.bin", "flax_model.msgpack", "original/consolidated.00.pth"}


@pytest.fixture(scope="module")
def tiny_repo_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny random Llama as an HF repo would hold it, with files xllama does not need besides."""
    fixture("llama2c/tok512.model")
    src = tmp_path_factory.mktemp("tiny-src")
    make_hf_checkpoint(src, tokenizer=True, vocab_size=512)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    files["tokenizer_config.json"] = b'{"add_bos_token": true}\n'
    files["README.md"] = b"# tiny llama\n"
    files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    files["pytorch_model.bin"] = os.urandom(20_000)
    files["flax_model.msgpack"] = os.urandom(20_000)
    files["original/consolidated.00.pth"] = os.urandom(20_000)
    files["original/params.json"] = b'{"dim": 64}'
    assert set(files) == set(NEEDED) | set(NOT_NEEDED)
    return files


@pytest.fixture
def hub(tiny_repo_files):
    server = FakeHub().start()
    server.add("owner/tiny", FakeRepo(dict(tiny_repo_files), lfs=set(LFS)))
    yield server
    server.stop()


def _env(tmp_path: Path, endpoint: str, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env.update(PYTHONPATH=str(ROOT / "src"), HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="200")
    env.update(extra)
    return env


def xllama(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xllama_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _snapshot(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / "models--owner--tiny" / "snapshots" / FakeRepo({}, set()).commit


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)


def _assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


# ---- end to end ----
def test_download_fetches_only_needed_files_and_generate_runs_from_the_cache_offline(hub, tiny_repo_files, tmp_path):
    env = _env(tmp_path, hub.url)
    r = xllama(env, "download", "owner/tiny")
    assert r.returncode == 0, r.stderr
    snap = _snapshot(tmp_path)
    assert Path(r.stdout.strip()) == snap
    assert _files_under(snap) == sorted(NEEDED)
    for name in NEEDED:
        assert (snap / name).read_bytes() == tiny_repo_files[name]
    for name in NOT_NEEDED:  # never even asked for
        assert not hub.requested(name), name
    assert sum(hub.served.values()) == sum(len(tiny_repo_files[n]) for n in NEEDED)  # each byte once

    # a second run finds everything in place and fetches no file body again
    served = sum(hub.served.values())
    r = xllama(env, "download", "owner/tiny")
    assert r.returncode == 0, r.stderr
    assert sum(hub.served.values()) == served

    # the hub goes away: the repo id still resolves, from the cache, to the same model
    hub.stop()
    args = ["generate", "-n", "8", "--temperature", "0", "--quiet", "Once upon a time"]
    by_id = xllama(dict(env, HF_HUB_OFFLINE="1"), *args, "--model", "owner/tiny")
    src = tmp_path / "copy"
    src.mkdir()
    for name in NEEDED:
        (src / name).write_bytes(tiny_repo_files[name])
    by_folder = CliRunner().invoke(app, [*args, "--model", str(src)])
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_folder.stdout and by_id.stdout.startswith("Once upon a time")


def test_generate_with_a_repo_id_not_downloaded_says_how_to_download_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = CliRunner().invoke(app, ["generate", "--model", "owner/absent", "hi"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: 'owner/absent' is not a local folder, and the Hugging Face repo owner/absent "
                                "is not downloaded; run: xllama download owner/absent")


def test_download_to_an_out_folder_and_generate_from_it(hub, tiny_repo_files, tmp_path):
    env = _env(tmp_path, hub.url)
    out = tmp_path / "tiny"
    r = xllama(env, "download", "owner/tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == out.resolve()
    assert _files_under(out) == sorted(NEEDED)
    served = sum(hub.served.values())
    assert xllama(env, "download", "owner/tiny", "--out", str(out)).returncode == 0
    assert sum(hub.served.values()) == served  # nothing fetched twice
    g = CliRunner().invoke(app, ["generate", "--model", str(out), "-n", "4", "--temperature", "0", "--quiet", "Hello"])
    assert g.exit_code == 0 and g.stdout.startswith("Hello"), g.stderr


def test_a_foreign_file_in_the_out_folder_is_kept_without_force(hub, tmp_path):
    env = _env(tmp_path, hub.url)
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"my own file")
    _assert_one_line_error(xllama(env, "download", "owner/tiny", "--out", str(out)), "tokenizer.model", "--force")
    assert (out / "tokenizer.model").read_bytes() == b"my own file"
    assert xllama(env, "download", "owner/tiny", "--out", str(out), "--force").returncode == 0
    assert (out / "tokenizer.model").read_bytes() != b"my own file"


def test_a_new_revision_replaces_what_an_earlier_download_put_in_the_out_folder(hub, tmp_path):
    env = _env(tmp_path, hub.url)
    out = tmp_path / "tiny"
    assert xllama(env, "download", "owner/tiny", "--out", str(out)).returncode == 0
    repo = hub.repos["owner/tiny"]
    repo.files["tokenizer_config.json"] = b'{"add_bos_token": false}\n'
    repo.commit = repo.refs["main"] = "f" * 40
    r = xllama(env, "download", "owner/tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer_config.json").read_bytes() == b'{"add_bos_token": false}\n'


def test_include_and_exclude_change_the_files_fetched(hub, tmp_path):
    r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny", "--include", "original/", "--exclude",
               "tokenizer_config.json")
    assert r.returncode == 0, r.stderr
    assert _files_under(_snapshot(tmp_path)) == sorted(
        set(NEEDED) - {"tokenizer_config.json"} | {"original/consolidated.00.pth", "original/params.json"})


def test_a_tag_or_commit_download_resolves_by_repo_id_too(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from xllama_cli.download import resolve_model

    repo = hub.repos["owner/tiny"]
    repo.refs["v1.0"] = repo.commit
    env = _env(tmp_path, hub.url)
    assert xllama(env, "download", "owner/tiny", "--revision", "v1.0").returncode == 0
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    assert resolve_model("owner/tiny") == _snapshot(tmp_path)
    (tmp_path / "hf" / "hub" / "models--owner--tiny" / "refs" / "v1.0").unlink()  # as after a download by commit
    assert resolve_model("owner/tiny") == _snapshot(tmp_path)


def test_hf_hub_offline_refuses_to_download(tmp_path):
    r = xllama(_env(tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1"), "download", "owner/tiny")
    _assert_one_line_error(r, "HF_HUB_OFFLINE is set")


# ---- resuming ----
# huggingface_hub's http_get writes what it receives in blocks of DOWNLOAD_CHUNK_SIZE, so a cut loses
# what came after the last whole block: these tests use weights of two blocks and a bit, cut inside
# the second block, so that a block is on disk to continue from.
@pytest.fixture
def big_hub(tiny_repo_files):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    server = FakeHub().start()
    files = dict(tiny_repo_files, **{"model.safetensors": os.urandom(2 * DOWNLOAD_CHUNK_SIZE + 12345)})
    server.add("owner/tiny", FakeRepo(files, lfs=set(LFS)))
    yield server, files["model.safetensors"], DOWNLOAD_CHUNK_SIZE + 777
    server.stop()


def _weight_ranges(hub) -> list[str | None]:
    """The Range header of every GET of model.safetensors from the CDN, in order."""
    return [h.get("range") for o, m, p, h in hub.requests
            if o == "cdn" and m == "GET" and hub._cdn_name(p) == "model.safetensors"]


def _range_start(header: str) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", header)
    assert m, header
    return int(m.group(1))


def test_a_connection_cut_mid_file_resumes_in_the_same_run(big_hub, tmp_path):
    hub, data, cut = big_hub
    hub.cut_once["model.safetensors"] = cut
    r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny")
    assert r.returncode == 0, r.stderr
    first, then = _weight_ranges(hub)
    start = _range_start(then)
    assert first is None and 0 < start <= cut  # continued from what was on disk, not from the start
    assert hub.served["model.safetensors"] == cut + len(data) - start  # then the rest only
    assert (_snapshot(tmp_path) / "model.safetensors").read_bytes() == data


def test_an_interrupted_download_resumes_on_the_next_run_fetching_only_the_rest(big_hub, tmp_path):
    import threading

    hub, data, cut = big_hub
    release = threading.Event()
    hub.stall["model.safetensors"] = (cut, release)
    env = _env(tmp_path, hub.url)
    proc = subprocess.Popen([sys.executable, "-m", "xllama_cli", "download", "owner/tiny"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partials = lambda: [p for p in (tmp_path / "hf").rglob("*.xllama-incomplete") if p.stat().st_size]  # noqa: E731
    try:  # wait until part of the file is on disk, then kill the download as a power cut would
        deadline = time.time() + 60
        while not partials():
            assert time.time() < deadline and proc.poll() is None, "the download never wrote a byte"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        del hub.stall["model.safetensors"]
        release.set()
    assert hub.served["model.safetensors"] == cut
    kept = partials()[0].stat().st_size
    assert 0 < kept <= cut
    assert not _snapshot(tmp_path).joinpath("model.safetensors").exists()

    r = xllama(env, "download", "owner/tiny")
    assert r.returncode == 0, r.stderr
    assert _weight_ranges(hub)[1:] == [f"bytes={kept}-"]
    assert hub.served["model.safetensors"] - cut == len(data) - kept  # the second run fetched only the rest
    assert (_snapshot(tmp_path) / "model.safetensors").read_bytes() == data
    assert not list((tmp_path / "hf").rglob("*incomplete"))  # no partial file left behind


def test_a_server_that_ignores_the_range_sends_the_whole_file_again_and_it_checks_out(big_hub, tmp_path):
    hub, data, cut = big_hub
    hub.cut_once["model.safetensors"] = cut
    hub.no_ranges.add("model.safetensors")
    r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny")
    assert r.returncode == 0, r.stderr
    assert _range_start(_weight_ranges(hub)[1]) > 0  # asked for the rest, was given all of it
    assert hub.served["model.safetensors"] == cut + len(data)
    assert (_snapshot(tmp_path) / "model.safetensors").read_bytes() == data


def test_a_corrupted_file_fails_its_sha256_and_is_not_kept(hub, tmp_path):
    hub.corrupt.add("model.safetensors")
    env = _env(tmp_path, hub.url)
    _assert_one_line_error(xllama(env, "download", "owner/tiny"), "model.safetensors", "sha256", "does not match")
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    hub.corrupt.clear()  # the next run starts that file over and succeeds
    assert xllama(env, "download", "owner/tiny").returncode == 0


def test_a_server_that_sends_more_than_the_listed_size_is_cut_off_and_nothing_is_kept(hub, tiny_repo_files, tmp_path):
    size = len(tiny_repo_files["model.safetensors"])
    hub.repos["owner/tiny"].listing["model.safetensors"] = {"size": size - 100, "lfs": {"size": size - 100}}
    r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny")
    _assert_one_line_error(r, "model.safetensors", f"more than the {size - 100} bytes")
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size > 100_000]


def test_answers_that_disagree_with_the_file_list_stop_the_download(hub, tmp_path):
    hub.forged["tokenizer.model"] = {"X-Linked-Etag": '"' + "a" * 64 + '"'}  # a hash, but not the one listed
    r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny")
    _assert_one_line_error(r, "owner/tiny changed on the Hub during the download", "tokenizer.model")
    assert not list((tmp_path / "hf").rglob("a" * 64 + "*"))  # nothing kept under the name the answer gave


# ---- access and network errors ----
@pytest.fixture
def hub_with(tiny_repo_files):
    servers = []

    def make(access: str = "public", token: str | None = None, **changes) -> FakeHub:
        files = dict(tiny_repo_files, **changes)
        server = FakeHub().start()
        server.add("owner/tiny", FakeRepo(files, lfs=set(LFS), access=access, token=token))
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


def test_a_gated_repo_without_a_token_says_to_accept_the_licence_and_pass_a_token(hub_with, tmp_path):
    hub = hub_with("gated", token="hf_good")
    line = _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/tiny"),
                                  "(401)", "gated", f"{hub.url}/owner/tiny", "licence", "--token", "HF_TOKEN")
    assert "no token was sent" in line


def test_a_gated_repo_with_a_token_without_access_gives_403(hub_with, tmp_path):
    hub = hub_with("gated", token="hf_good")
    line = _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/tiny", "--token", "hf_bad"),
                                  "(403)", "licence")
    assert "the token in use was not accepted" in line and "hf_bad" not in line


def test_a_gated_repo_downloads_with_a_good_token_from_hf_token_never_sent_to_the_cdn(hub_with, tmp_path):
    hub = hub_with("gated", token="hf_good")
    r = xllama(_env(tmp_path, hub.url, HF_TOKEN="hf_good"), "download", "owner/tiny")
    assert r.returncode == 0, r.stderr
    assert _files_under(_snapshot(tmp_path)) == sorted(NEEDED)
    cdn = [h for o, _, _, h in hub.requests if o == "cdn"]
    assert cdn and not any("authorization" in h for h in cdn)
    assert all(h.get("authorization") == "Bearer hf_good" for o, _, p, h in hub.requests
               if o == "hub" and "/resolve/" in p)


def test_a_private_repo_gives_401(hub_with, tmp_path):
    hub = hub_with("private", token="hf_good")
    _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/tiny"), "(401)", "private")


def test_an_unknown_repo_gives_404(hub, tmp_path):
    _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/nothing"),
                           "owner/nothing was not found on the Hugging Face Hub")


def test_an_unknown_revision_gives_404(hub, tmp_path):
    _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/tiny", "--revision", "v9"),
                           "revision 'v9' of owner/tiny was not found", "--revision")


def test_an_unreachable_hub_says_so_and_mentions_offline_mode(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    r = xllama(_env(tmp_path, f"http://127.0.0.1:{port}"), "download", "owner/tiny")
    _assert_one_line_error(r, "cannot reach the Hugging Face Hub", f"127.0.0.1:{port}", "HF_HUB_OFFLINE=1")
    assert time.time() - start < 30  # no long retry loop


def test_a_repo_that_is_not_llama_is_refused_before_the_weights(hub_with, tmp_path):
    hub = hub_with(**{"config.json": b'{"model_type": "gpt2"}'})
    _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/tiny"),
                           "holds no Llama checkpoint", "'gpt2'")
    assert hub.served["model.safetensors"] == 0


def test_a_repo_without_config_or_params_is_refused(hub_with, tmp_path):
    hub = hub_with()
    del hub.repos["owner/tiny"].files["config.json"]
    _assert_one_line_error(xllama(_env(tmp_path, hub.url), "download", "owner/tiny"),
                           "holds no Llama checkpoint", "no config.json and no params.json")


def test_a_malformed_repo_id_is_refused(tmp_path):
    _assert_one_line_error(xllama(_env(tmp_path, "http://127.0.0.1:9"), "download", "just-a-name"),
                           "not a Hugging Face repo id")


# ---- a hostile hub or mirror (HF_ENDPOINT) ----
# Each case lists (or answers with) a name or id that would put a file outside the target; the
# download must stop with one line naming the repo and the bad value, write nothing outside the
# target and remove nothing. An escape aims at tmp_path/escaped*, where a file of the user's waits.
def _tree(root: Path) -> dict[str, bytes | str]:
    """Every file and link under root, with its content (or a link's target)."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def _escape(tmp_path: Path, start: Path, what: str = "escaped.txt") -> str:
    return os.path.relpath(tmp_path / what, start)


def _hostile_run(hub, tmp_path: Path, out: bool, *args: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    (tmp_path / "escaped.txt").write_bytes(b"the user's own file")
    before = _tree(tmp_path)
    target = ["--out", str(tmp_path / "a" / "b" / "out")] if out else []
    r = xllama(_env(tmp_path, hub.url), "download", "owner/tiny", *args, *target)
    return r, before, _tree(tmp_path)


def _nothing_outside(tmp_path: Path, out: bool, before: dict, after: dict) -> None:
    inside = "a/b/out/" if out else "hf/hub/"
    new_or_changed = {k for k in after if before.get(k) != after[k]}
    assert not {k for k in new_or_changed if not k.startswith(inside)}, new_or_changed
    assert all(after.get(k) == v for k, v in before.items()), "a file was removed or changed"


def _out_dir(tmp_path: Path) -> Path:
    return tmp_path / "a" / "b" / "out"


HOSTILE_NAMES = {  # label -> the name, given the folder it would be joined to
    "parent": lambda tmp, base: _escape(tmp, base),
    "inner parent": lambda tmp, base: "sub/" + _escape(tmp, base / "sub"),
    "absolute": lambda tmp, base: str(tmp / "escaped.txt"),
    "backslash": lambda tmp, base: _escape(tmp, base, "escaped.safetensors").replace("/", "\\"),
}


@pytest.mark.parametrize("out", [False, True], ids=["cache", "out"])
@pytest.mark.parametrize("label", list(HOSTILE_NAMES))
def test_a_file_name_that_leaves_the_target_is_refused_before_any_file_is_fetched(hub, tmp_path, label, out):
    name = HOSTILE_NAMES[label](tmp_path, _out_dir(tmp_path) if out else _snapshot(tmp_path))
    hub.repos["owner/tiny"].files[name] = b"the server's choice"
    hub.answer_anything = b"the server's choice"
    r, before, after = _hostile_run(hub, tmp_path, out, "--include", "*")
    _assert_one_line_error(r, "owner/tiny", repr(name), "HF_ENDPOINT")
    assert after == before  # nothing written at all, nothing removed
    assert not hub.served and not [p for _, _, p, _ in hub.requests if not p.startswith("/api/")]


@pytest.mark.parametrize("name", ["./config.json", "sub//config.json", "", "sub/.", "a\nb", "a\x00b", "c:/x", "sub/"])
def test_odd_names_are_refused_too(hub, tmp_path, name):
    hub.repos["owner/tiny"].files[name] = b"x"
    r, before, after = _hostile_run(hub, tmp_path, False)
    _assert_one_line_error(r, "owner/tiny", "HF_ENDPOINT")
    assert after == before


def test_a_hostile_name_is_refused_even_when_it_is_not_among_the_files_chosen(hub, tmp_path):
    name = _escape(tmp_path, _out_dir(tmp_path))
    hub.repos["owner/tiny"].files[name] = b"the server's choice"
    r, before, after = _hostile_run(hub, tmp_path, True)
    assert _assert_one_line_error(r) == (
        f"error: owner/tiny on {hub.url}: the file list names {name!r}, which would not stay inside the target folder "
        f"(it has an empty, '.' or '..' part); refusing it, as only a broken or hostile hub or mirror sends that "
        f"(check HF_ENDPOINT)")
    assert after == before


HOSTILE_IDS = {  # label -> (file, listing changes given the blobs folder)
    "sha256 with ../": ("model.safetensors", lambda tmp, blobs: {"lfs": {"sha256": _escape(tmp, blobs, "escaped")}}),
    "sha256 not hex": ("model.safetensors", lambda tmp, blobs: {"lfs": {"sha256": "z" * 64}}),
    "sha256 too short": ("model.safetensors", lambda tmp, blobs: {"lfs": {"sha256": "ab" * 20}}),
    "sha256 missing": ("model.safetensors", lambda tmp, blobs: {"lfs": {"sha256": None}}),
    "blob id with ../": ("config.json", lambda tmp, blobs: {"blobId": _escape(tmp, blobs, "escaped")}),
    "blob id upper case": ("config.json", lambda tmp, blobs: {"blobId": "AB" * 20}),
    "negative size": ("config.json", lambda tmp, blobs: {"size": -5}),
    "size as text": ("model.safetensors", lambda tmp, blobs: {"lfs": {"size": "12"}}),
}


@pytest.mark.parametrize("out", [False, True], ids=["cache", "out"])
@pytest.mark.parametrize("label", list(HOSTILE_IDS))
def test_a_listed_blob_id_or_size_that_is_not_what_it_should_be_is_refused(hub, tmp_path, label, out):
    name, changes = HOSTILE_IDS[label]
    blobs = tmp_path / "hf" / "hub" / "models--owner--tiny" / "blobs"
    changes = changes(tmp_path, blobs)
    hub.repos["owner/tiny"].listing[name] = changes
    r, before, after = _hostile_run(hub, tmp_path, out)
    value = (changes.get("lfs") or changes).popitem()[1]
    _assert_one_line_error(r, "owner/tiny", repr(name), repr(value), "HF_ENDPOINT")
    assert after == before
    assert not hub.served


@pytest.mark.parametrize("out", [False, True], ids=["cache", "out"])
def test_a_commit_id_that_is_not_a_hash_is_refused(hub, tmp_path, out):
    repo = hub.repos["owner/tiny"]
    repo.commit = repo.refs["main"] = "../../../../escaped"
    hub.answer_anything = b"the server's choice"
    r, before, after = _hostile_run(hub, tmp_path, out)
    assert _assert_one_line_error(r) == (
        f"error: owner/tiny on {hub.url}: the revision is at commit '../../../../escaped', which is not 40 hex digits; "
        f"refusing it, as only a broken or hostile hub or mirror sends that (check HF_ENDPOINT)")
    assert after == before


FORGED = {  # label -> (file, headers of its resolve answers, given the blobs folder)
    "ETag with ../": ("config.json", lambda tmp, blobs: {"ETag": f'"{_escape(tmp, blobs, "escaped")}"'}),
    "X-Linked-Etag with ../": ("model.safetensors",
                               lambda tmp, blobs: {"X-Linked-Etag": f'"{_escape(tmp, blobs, "escaped")}"'}),
    "X-Repo-Commit with ../": ("tokenizer.model",
                               lambda tmp, blobs: {"X-Repo-Commit": _escape(tmp, blobs.parent / "snapshots" / "x")}),
}


@pytest.mark.parametrize("out", [False, True], ids=["cache", "out"])
@pytest.mark.parametrize("label", list(FORGED))
def test_a_forged_etag_or_commit_header_is_refused(hub, tmp_path, label, out):
    """huggingface_hub names cache files after these headers without checking them."""
    name, headers = FORGED[label]
    headers = headers(tmp_path, tmp_path / "hf" / "hub" / "models--owner--tiny" / "blobs")
    hub.forged[name] = headers
    r, before, after = _hostile_run(hub, tmp_path, out)
    value = next(iter(headers.values())).strip('"')
    _assert_one_line_error(r, "owner/tiny", repr(value), "HF_ENDPOINT")
    _nothing_outside(tmp_path, out, before, after)


def test_a_revision_that_is_not_a_ref_name_is_refused_before_any_request(tmp_path):
    from conftest import cli_fails

    assert cli_fails(["download", "owner/tiny", "--revision", "../../x"]) == (
        "error: --revision '../../x' is not a branch, tag or commit name (it has an empty, '.' or '..' part)")


# ---- pure functions ----
def test_default_files_are_safetensors_config_and_tokenizer_only():
    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
            "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", "LICENSE.txt", "original/consolidated.00.pth", "flax_model.msgpack"]
    assert select_files(repo) == sorted(["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                         "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                         "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                         "special_tokens_map.json"])


def test_bin_weights_only_when_the_repo_has_no_safetensors():
    repo = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json", "tokenizer.model", "training_args.bin"]
    assert select_files(repo) == ["config.json", "pytorch_model-00001-of-00002.bin",
                                  "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.model"]


def test_a_meta_layout_repo_gives_params_and_consolidated_shards():
    repo = ["params.json", "consolidated.00.pth", "consolidated.01.pth", "tokenizer.model", "checklist.chk", "LICENSE"]
    assert select_files(repo) == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]


def test_include_adds_and_exclude_removes():
    repo = ["config.json", "model.safetensors", "tokenizer.model", "original/params.json", "README.md"]
    assert select_files(repo, include=["original/", "*.md"], exclude=["tokenizer.*"]) == [
        "README.md", "config.json", "model.safetensors", "original/params.json"]


@pytest.mark.parametrize("name", ["config.json", "original/params.json", "a b/c.json", "x..y", "..x", ".gitattributes",
                                  "dir/.hidden", "refs/pr/1", "v1.0"])
def test_plain_relative_names_are_accepted(name):
    assert path_problem(name) is None


@pytest.mark.parametrize("name,why", [
    ("", "empty"), ("..", "'..' part"), ("../x", "'..' part"), ("a/../../x", "'..' part"), ("a/..", "'..' part"),
    ("./x", "'.' or"), ("a//b", "empty, '.'"), ("a/", "empty, '.'"), ("/etc/passwd", "absolute"),
    ("..\\x", "backslash"), ("a\\b", "backslash"), ("\\\\host\\share", "backslash"), ("C:/x", "drive"),
    ("c:x", "drive"), ("a/D:", "drive"), ("a\nb", "control"), ("a\x00b", "control"), (None, "not text"),
    (42, "not text but int")])
def test_names_that_would_leave_the_folder_are_refused(name, why):
    assert why in path_problem(name)


@pytest.mark.parametrize("text,ok", [("meta-llama/Llama-2-7b-hf", True), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", True),
                                     ("./models/x", False), ("../x", False), ("/abs/path", False), ("name", False),
                                     ("a/b/c", False), ("models/", False), ("a/..b", False)])
def test_repo_id_shape(text, ok):
    assert is_repo_id(text) is ok
