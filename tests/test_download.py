"""data/cached_challenge_fineweb.py against a stand-in of the HuggingFace hub on 127.0.0.1.

The stand-in answers HEAD/GET on /datasets/<repo>/resolve/<revision>/<path> with the headers huggingface_hub reads
(X-Repo-Commit, ETag; for LFS files a 302 to another origin with X-Linked-Etag / X-Linked-Size, like the real hub's
CDN redirect; X-Error-Code on 404s). The script runs as a subprocess with HF_ENDPOINT pointed at it and HF_HOME in a
temporary folder, so the real huggingface_hub download path is exercised end to end.
"""
import collections
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402

SCRIPT = REPO_ROOT / "data" / "cached_challenge_fineweb.py"
FAKE_REPO = "golf-test/parameter-golf-fake"
VARIANT, DATASET = "sp512", "fineweb10B_sp512"
N_VAL, N_TRAIN = 2, 3


class FakeHub:
    """Files of one dataset repo, served over HTTP the way the hub's resolve endpoint serves them."""

    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id, self.files = repo_id, dict(files)
        self.commit = hashlib.sha1(b"fake commit").hexdigest()
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def git_sha1(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @staticmethod
    def reply(handler, status: int, headers: dict, data: bytes, body: bool):
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def answer(self, handler, body: bool):
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        resolve = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if resolve:
            repo, _revision, name = resolve.groups()
            if repo != self.repo_id:
                return self.reply(handler, 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
            if name not in self.files:
                return self.reply(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit},
                                  b"Entry not found", body)
            data = self.files[name]
            if name.endswith(".bin"):  # an LFS file: the hub redirects to its CDN, another origin
                sha = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
                headers = {"Location": f"http://localhost:{self.port}/cdn/{sha}", "X-Repo-Commit": self.commit,
                           "ETag": f'"{self.git_sha1(pointer)}"', "X-Linked-Etag": f'"{sha}"',
                           "X-Linked-Size": str(len(data))}
                return self.reply(handler, 302, headers, b"", body)
            headers = {"X-Repo-Commit": self.commit, "ETag": f'"{self.git_sha1(data)}"',
                       "Content-Type": "application/octet-stream"}
            return self.reply(handler, 200, headers, data, body)
        if cdn:
            for data in self.files.values():
                if hashlib.sha256(data).hexdigest() == cdn.group(1):
                    return self.reply(handler, 200, {"Content-Type": "application/octet-stream"}, data, body)
        return self.reply(handler, 404, {}, b"not found", body)

    def gets(self, suffix: str = "") -> list[str]:
        """Paths of GET requests that fetched content (CDN blobs are reported by the file name they stand for)."""
        by_sha = {hashlib.sha256(d).hexdigest(): n for n, d in self.files.items()}
        out = []
        for method, path in self.requests:
            if method == "GET":
                m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
                name = by_sha.get(m.group(1), path) if m else path.split("/resolve/main/", 1)[-1]
                if name.endswith(suffix):
                    out.append(name)
        return out


def shard_bytes(tmp_path: Path, name: str, tokens) -> bytes:
    path = tmp_path / "made" / name
    train_gpt.write_shard(path, np.asarray(tokens))
    return path.read_bytes()


def repo_files(tmp_path: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    ds = f"datasets/{DATASET}"
    files, stats = {}, {"files_val": N_VAL, "files_train": N_TRAIN, "tokens_val": 0}
    for split, count in (("val", N_VAL), ("train", N_TRAIN)):
        for i in range(count):
            tokens = np.concatenate([[1], rng.integers(4, 512, size=300 + 50 * i)])
            files[f"datasets/{ds}/fineweb_{split}_{i:06d}.bin"] = shard_bytes(tmp_path, f"{split}{i}.bin", tokens)
            if split == "val":
                stats["tokens_val"] += len(tokens)
    files["datasets/tokenizers/fineweb_512_bpe.model"] = b"\x0a\x05fake sentencepiece model bytes"
    files["datasets/tokenizers/fineweb_512_bpe.vocab"] = b"<pad>\t0\n<s>\t0\n"
    files["datasets/docs_selected.jsonl"] = b'{"text": "a doc"}\n'
    files["datasets/docs_selected.source_manifest.json"] = b'{"num_docs": 1, "docs_val": 0}'
    manifest = {
        "version": "10B",
        "tokenizers": [{"name": "sp_bpe_512", "kind": "sentencepiece_bpe", "vocab_size": 512, "bos_id": 1,
                        "eos_id": 2, "model_path": "tokenizers/fineweb_512_bpe.model",
                        "vocab_path": "tokenizers/fineweb_512_bpe.vocab"},
                       {"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                        "model_path": "tokenizers/fineweb_1024_bpe.model"}],
        "datasets": [{"name": DATASET, "tokenizer_name": "sp_bpe_512", "path": ds, "vocab_size": 512, "stats": stats},
                     {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "path": "datasets/fineweb10B_sp1024",
                      "stats": {"files_val": 1, "files_train": 1}}],
    }
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


@pytest.fixture
def hub(tmp_path):
    server = FakeHub(FAKE_REPO, repo_files(tmp_path))
    yield server
    server.close()


Result = collections.namedtuple("Result", "returncode stdout stderr")


def downloader_env(hub, tmp_path, repo_id=FAKE_REPO, endpoint=None) -> dict:
    return dict(HF_ENDPOINT=endpoint or hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), MATCHED_FINEWEB_REPO_ID=repo_id,
                MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="datasets", HF_HUB_DISABLE_TELEMETRY="1",
                NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


def downloader_argv(tmp_path, args) -> list[str]:
    return ["--variant", VARIANT, "--local-dir", str(tmp_path / "data"), *args]


def run_subprocess(hub, tmp_path, *args, **env_kw) -> Result:
    """The CLI exactly as a user runs it: configuration from the environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MATCHED_FINEWEB_"))}
    env.update(downloader_env(hub, tmp_path, **env_kw))
    r = subprocess.run([sys.executable, str(SCRIPT), *downloader_argv(tmp_path, args)], env=env,
                       capture_output=True, text=True, timeout=120)
    return Result(r.returncode, r.stdout, r.stderr)


@pytest.fixture
def download(hub, tmp_path, monkeypatch, capsys):
    """Run the downloader's main() in this process (a subprocess costs seconds of torch import each time).

    huggingface_hub reads HF_HOME when it is imported, so its cache folder is pointed at tmp_path directly.
    """
    import huggingface_hub.constants

    sys.path.insert(0, str(SCRIPT.parent))
    import cached_challenge_fineweb as ccf

    def run(*args, **env_kw) -> Result:
        for key in ("HF_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in downloader_env(hub, tmp_path, **env_kw).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
        capsys.readouterr()
        try:
            ccf.main(downloader_argv(tmp_path, args))
            code, message = 0, ""
        except SystemExit as e:
            code, message = (0, "") if e.code in (0, None) else (1, f"{e.code}\n")
        out = capsys.readouterr()
        return Result(code, out.out, out.err + message)

    return run


def local_shard(tmp_path, split, i) -> Path:
    return tmp_path / "data" / "datasets" / DATASET / f"fineweb_{split}_{i:06d}.bin"


def test_fresh_download_then_rerun_skips_everything(hub, tmp_path, download):
    r = run_subprocess(hub, tmp_path, "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    expected = [f"datasets/{DATASET}/fineweb_val_{i:06d}.bin" for i in range(N_VAL)]
    expected += [f"datasets/{DATASET}/fineweb_train_{i:06d}.bin" for i in range(2)]
    expected += ["tokenizers/fineweb_512_bpe.model", "tokenizers/fineweb_512_bpe.vocab", "manifest.json"]
    for rel in expected:
        assert (data / rel).read_bytes() == hub.files[f"datasets/{rel}"], rel
    assert not local_shard(tmp_path, "train", 2).exists(), "only the first N train shards"
    assert not (data / "docs_selected.jsonl").exists()
    assert local_shard(tmp_path, "train", 0).stat().st_nlink >= 2, "hard-linked from the hub cache"
    assert json.loads((data / "manifest.source.json").read_text())["repo_id"] == FAKE_REPO
    assert sorted(hub.gets()) == sorted(f"datasets/{rel}" for rel in expected), "each file fetched once"
    assert "4 shards verified" in r.stdout

    hub.requests.clear()
    r = download("2")  # positional form of --train-shards
    assert r.returncode == 0, r.stderr
    assert hub.requests == [("HEAD", f"/datasets/{FAKE_REPO}/resolve/main/datasets/manifest.json")]
    assert "6 files (4 shards); 6 already here and valid, 0 to fetch" in r.stdout

    hub.requests.clear()
    r = download("2", "--skip-manifest")
    assert r.returncode == 0, r.stderr
    assert hub.requests == [], "offline rerun makes no request at all"

    hub.requests.clear()
    r = download("--train-shards", "3", "--with-docs")
    assert r.returncode == 0, r.stderr
    assert sorted(hub.gets()) == sorted(["datasets/docs_selected.jsonl", "datasets/docs_selected.source_manifest.json",
                                         f"datasets/datasets/{DATASET}/fineweb_train_000002.bin"])


def test_corrupted_local_shard_is_fetched_again(hub, tmp_path, download):
    assert download("--train-shards", "2").returncode == 0
    good = hub.files[f"datasets/datasets/{DATASET}/fineweb_train_000001.bin"]
    with open(local_shard(tmp_path, "train", 1), "r+b") as f:  # in place: the hard-linked cache blob breaks too
        f.truncate(len(good) - 10)
    with open(local_shard(tmp_path, "val", 0), "r+b") as f:  # bad magic, right size
        f.write(b"\0\0\0\0")
    with open(tmp_path / "data" / "manifest.json", "r+b") as f:  # hard-linked too: the cached copy breaks as well
        f.truncate(10)
    hub.requests.clear()
    r = download("--train-shards", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(hub.gets(".bin")) == sorted([f"datasets/datasets/{DATASET}/fineweb_train_000001.bin",
                                               f"datasets/datasets/{DATASET}/fineweb_val_000000.bin"])
    assert local_shard(tmp_path, "train", 1).read_bytes() == good
    assert (tmp_path / "data" / "manifest.json").read_bytes() == hub.files["datasets/manifest.json"]
    assert train_gpt.read_shard_header(local_shard(tmp_path, "val", 0)) > 0


def test_served_shard_with_bad_header_is_reported(hub, tmp_path, download):
    name = f"datasets/datasets/{DATASET}/fineweb_train_000001.bin"
    broken = bytearray(hub.files[name])
    broken[0:4] = np.array([12345], dtype="<i4").tobytes()
    hub.files[name] = bytes(broken)
    r = download("--train-shards", "2")
    assert r.returncode != 0
    assert "fineweb_train_000001.bin" in r.stderr and "bad magic 12345" in r.stderr
    assert "as served by" in r.stderr and FAKE_REPO in r.stderr
    assert not local_shard(tmp_path, "train", 1).exists(), "a bad file is not left where trainers would glob it"


def test_refusals_with_clear_messages(hub, tmp_path, download):
    r = download("--train-shards", str(N_TRAIN + 1))
    assert r.returncode != 0 and f"more than the {N_TRAIN} train shards" in r.stderr
    assert hub.gets(".bin") == [], "nothing downloaded before the request is checked"

    r = download("--variant", "sp8192")
    assert r.returncode != 0
    assert "fineweb10B_sp8192 is not in the manifest" in r.stderr and DATASET in r.stderr
    assert "kevclark/parameter-golf" in r.stderr

    r = download(repo_id="nobody/no-such-repo")
    assert r.returncode != 0
    assert "nobody/no-such-repo not found" in r.stderr and "MATCHED_FINEWEB_REPO_ID" in r.stderr

    # a manifest fetched from one repo is stale for another
    assert download("--train-shards", "1").returncode == 0
    r = download("--skip-manifest", repo_id="kevclark/parameter-golf")
    assert r.returncode != 0 and "stale" in r.stderr and "Delete it" in r.stderr


def test_refuses_a_folder_of_locally_built_shards(hub, tmp_path, download):
    """Shards that data/build_shards.py wrote have valid headers: without this check they would pass as published
    ones and be mixed into the download."""
    local_shard(tmp_path, "train", 0).parent.mkdir(parents=True)
    (local_shard(tmp_path, "train", 0).parent / ".build_shards.json").write_text("{}")
    r = download("--train-shards", "1")
    assert r.returncode != 0 and "built by data/build_shards.py" in r.stderr and "another --out" in r.stderr
    assert hub.gets(".bin") == []


def test_endpoint_that_is_not_a_hub(hub, tmp_path, download):
    class Plain(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        r = download(endpoint=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode != 0 and "HF_ENDPOINT" in r.stderr and "X-Repo-Commit" in r.stderr


def test_argument_parsing():
    sys.path.insert(0, str(SCRIPT.parent))
    import cached_challenge_fineweb as ccf

    assert ccf.parse_args([]).train_shards == 80
    assert ccf.parse_args(["12"]).train_shards == 12
    assert ccf.parse_args(["--train-shards", "7", "--variant", "byte260"]).train_shards == 7
    assert ccf.variant_dir("sp8192") == "fineweb10B_sp8192"
    for bad in (["--variant", "gpt2"], ["3", "--train-shards", "4"], ["--train-shards", "-1"]):
        with pytest.raises(SystemExit):
            ccf.parse_args(bad)
    assert "kevclark/parameter-golf" in ccf.__doc__
