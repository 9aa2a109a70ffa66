#!/usr/bin/env python3
"""Download the challenge's published, pre-tokenized FineWeb shards from a HuggingFace dataset repo.

    python3 data/cached_challenge_fineweb.py --variant sp1024             # all val shards + 80 train shards
    MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf \\
        python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 128    # the records' data

The repo's <prefix>/manifest.json names each dataset (fineweb10B_<variant>), its shard counts (stats.files_val,
stats.files_train) and its tokenizer files. This script fetches the manifest (kept as <local-dir>/manifest.json),
every val shard, the first N train shards and the tokenizer files, through the HuggingFace cache (HF_HOME), and
hard-links (or copies) them to <local-dir>/datasets/fineweb10B_<variant>/ and <local-dir>/tokenizers/. Files already
there and valid (shards: header and exact size) are skipped; damaged ones are fetched again. Every shard is checked
after download.

Environment: MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf, which publishes sp1024; the sp8192 data is
at kevclark/parameter-golf), MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default "datasets"), and the huggingface_hub ones:
HF_ENDPOINT (a mirror), HF_HOME (the download cache), HF_TOKEN.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt  # noqa: E402
from build_shards import STAMP_NAME as BUILD_STAMP_NAME  # noqa: E402 - what data/build_shards.py leaves in its output

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
SP8192_REPO_ID = "kevclark/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
MANIFEST_NAME = "manifest.json"
MANIFEST_SOURCE_NAME = "manifest.source.json"  # which repo the local manifest.json came from
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")


class DownloadError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"download error: {message}")


def repo_config() -> tuple[str, str, str | None]:
    """(repo id, remote root prefix, HF_ENDPOINT or None) from the environment, read at call time."""
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO_ID
    root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT).strip("/")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    return repo_id, root, endpoint


def variant_dir(variant: str) -> str:
    if variant == "byte260" or re.fullmatch(r"sp[1-9][0-9]*", variant):
        return f"fineweb10B_{variant}"
    raise argparse.ArgumentTypeError(f"unknown variant {variant!r}: use byte260 or sp<VOCAB> (sp1024, sp8192, ...)")


def safe_relative(rel: str) -> str:
    """A manifest path must stay inside the local dir."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise DownloadError(f"the manifest names an unsafe path {rel!r}")
    return "/".join(parts)


def is_valid(path: Path) -> bool:
    """Shards: header, version and exact size; JSON: parses; anything else: present and non-empty."""
    try:
        if path.suffix == ".bin":
            train_gpt.read_shard_header(path)
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
        else:
            return path.stat().st_size > 0
        return True
    except (OSError, ValueError):  # ShardError is a ValueError
        return False


def network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the hub cannot be reached or does not answer like a hub."""
    from huggingface_hub import errors

    found: tuple[type[BaseException], ...] = (errors.LocalEntryNotFoundError, errors.HfHubHTTPError,
                                              errors.FileMetadataError)
    try:  # the HTTP client huggingface_hub 1.x/2.x is built on; transfer errors after the HEAD come from it
        import httpx2
        found += (httpx2.HTTPError,)
    except ImportError:
        pass
    return found


def read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


class Hub:
    """Fetches <root>/<rel> of the dataset repo through the HuggingFace cache, with errors that say what to do."""

    def __init__(self, local_dir: Path):
        self.repo_id, self.root, self.endpoint_arg = repo_config()
        self.endpoint = self.endpoint_arg or "https://huggingface.co"
        self.local_dir = local_dir

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def cached_file(self, rel: str, force: bool) -> Path:
        from huggingface_hub import errors, hf_hub_download

        remote = self.remote(rel)
        where = f"{remote} of dataset repo {self.repo_id} at {self.endpoint}"
        how = ("set MATCHED_FINEWEB_REPO_ID to the repo that publishes the data (sp1024: "
               f"{DEFAULT_REPO_ID}, sp8192: {SP8192_REPO_ID})")
        try:
            return Path(hf_hub_download(repo_id=self.repo_id, filename=remote, repo_type="dataset",
                                        endpoint=self.endpoint_arg, force_download=force))
        except errors.GatedRepoError as e:
            raise DownloadError(f"{self.repo_id} is gated: accept its terms on the hub and log in (HF_TOKEN). ({e})")
        except errors.RepositoryNotFoundError:
            raise DownloadError(f"dataset repo {self.repo_id} not found at {self.endpoint} (or private): {how}")
        except errors.RevisionNotFoundError as e:
            raise DownloadError(f"{where}: revision not found ({e})")
        except errors.RemoteEntryNotFoundError:
            hint = (f"check MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (now {self.root!r}) or {how}" if rel == MANIFEST_NAME
                    else "the manifest lists a file the repo does not have")
            raise DownloadError(f"{where} does not exist: {hint}")
        except network_errors() as e:
            cause = f"{e}" + (f" ({e.__cause__})" if e.__cause__ else "")
            raise DownloadError(
                f"could not fetch {where}: the hub is unreachable or not a HuggingFace endpoint. Check the network; "
                f"set HF_ENDPOINT to a reachable hub or mirror and {how}; with the files already here, "
                f"--skip-manifest works offline. Cause: {cause}")

    def fetch(self, rel: str, dest: Path, force: bool = False) -> None:
        """Download (or take from the cache) and hard-link into dest, replacing it atomically."""
        src = self.cached_file(rel, force).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and os.path.samefile(src, dest):
            return
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, rel: str) -> bool:
        """Make <local_dir>/<rel> present and valid; return True when it had to be downloaded."""
        dest = self.local_dir / rel
        if is_valid(dest):
            return False
        # A damaged local file may share its inode with the cached blob (hard link): then the cache is damaged too.
        force = dest.exists()
        self.fetch(rel, dest, force=force)
        if not is_valid(dest) and not force:
            self.fetch(rel, dest, force=True)
        if not is_valid(dest):
            try:
                fault = train_gpt.read_shard_header(dest) if dest.suffix == ".bin" else "empty or not parseable"
            except (OSError, ValueError) as e:
                fault = str(e)
            dest.unlink(missing_ok=True)
            raise DownloadError(f"{self.remote(rel)} as served by {self.repo_id} at {self.endpoint} is not valid: "
                                f"{fault}. The published file is damaged; report it to the repo's owner.")
        return True


def load_manifest(hub: Hub, skip_manifest: bool) -> dict:
    path = hub.local_dir / MANIFEST_NAME
    source_path = hub.local_dir / MANIFEST_SOURCE_NAME
    source = {"repo_id": hub.repo_id, "remote_root": hub.root}
    if skip_manifest:
        if not path.is_file():
            raise DownloadError(f"--skip-manifest needs {path}; run once without --skip-manifest to fetch it")
        recorded = read_json(source_path)
        if recorded is not None and recorded != source:
            raise DownloadError(
                f"{path} is stale: it came from {recorded.get('repo_id')} (root {recorded.get('remote_root')!r}), not "
                f"{hub.repo_id} (root {hub.root!r}). Delete it (rm {path} {source_path}) or run without --skip-manifest.")
    else:
        hub.fetch(MANIFEST_NAME, path, force=path.exists() and not is_valid(path))
        if not is_valid(path):  # the cached copy was damaged
            hub.fetch(MANIFEST_NAME, path, force=True)
        if read_json(source_path) != source:
            train_gpt.atomic_write_bytes(source_path, (json.dumps(source) + "\n").encode())
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise DownloadError(f"{path} is not a manifest (not a JSON object); delete it and run without --skip-manifest")
    return manifest


def plan(manifest: dict, variant: str, train_shards: int, with_docs: bool, hub: Hub, skip_manifest: bool):
    """-> (files relative to the remote root, shard files, the dataset entry)."""
    name = variant_dir(variant)
    datasets = [d for d in manifest.get("datasets", []) if isinstance(d, dict)]
    entry = next((d for d in datasets if d.get("name") == name), None)
    manifest_path = hub.local_dir / MANIFEST_NAME
    if entry is None:
        available = ", ".join(str(d.get("name")) for d in datasets) or "none"
        msg = f"{name} is not in the manifest of {hub.repo_id} (it lists: {available})."
        if variant == "sp8192" and hub.repo_id != SP8192_REPO_ID:
            msg += f" The sp8192 data is published at {SP8192_REPO_ID}: set MATCHED_FINEWEB_REPO_ID={SP8192_REPO_ID}."
        elif variant == "sp1024" and hub.repo_id != DEFAULT_REPO_ID:
            msg += f" The sp1024 data is published at {DEFAULT_REPO_ID}: unset MATCHED_FINEWEB_REPO_ID."
        if skip_manifest:
            origin = ("was written by data/build_shards.py" if manifest.get("builder") else "may be stale, from another repo")
            msg += f" {manifest_path} {origin}: delete it and run without --skip-manifest."
        raise DownloadError(msg)
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"the manifest entry {name} lacks stats.files_val / stats.files_train")
    if train_shards > files_train:
        raise DownloadError(f"--train-shards {train_shards} is more than the {files_train} train shards "
                            f"{hub.repo_id} publishes for {name}")
    ds_path = safe_relative(entry.get("path") or f"datasets/{name}")
    shards = [f"{ds_path}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    shards += [f"{ds_path}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    tok_name = entry.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tokenizer is None:
        raise DownloadError(f"the manifest lists no tokenizer {tok_name!r} for {name}")
    tok_files = [safe_relative(tokenizer[k]) for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    docs = list(DOCS_FILES) if with_docs else []
    return docs + shards + tok_files, shards, entry


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_shards_positional", nargs="?", type=int, metavar="TRAIN_SHARDS",
                   help="same as --train-shards")
    p.add_argument("--variant", default="sp1024", help="sp1024 (default), sp8192 (at kevclark/parameter-golf: set "
                   f"MATCHED_FINEWEB_REPO_ID={SP8192_REPO_ID}), any sp<VOCAB>, or byte260")
    p.add_argument("--train-shards", type=int, default=None, help="how many train shards, from the first (default 80; "
                   "at most the manifest's stats.files_train)")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its source manifest")
    p.add_argument("--skip-manifest", action="store_true", help="use the local manifest.json, do not fetch it")
    p.add_argument("--local-dir", default=str(DATA_DIR), help="where datasets/ and tokenizers/ go (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=8, help="parallel downloads (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        variant_dir(args.variant)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.train_shards is not None and args.train_shards_positional is not None \
            and args.train_shards != args.train_shards_positional:
        p.error("give the number of train shards once (positional or --train-shards)")
    args.train_shards = next((v for v in (args.train_shards, args.train_shards_positional) if v is not None), 80)
    if args.train_shards < 0:
        p.error("--train-shards must be >= 0")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    hub = Hub(Path(args.local_dir))
    manifest = load_manifest(hub, args.skip_manifest)
    files, shards, entry = plan(manifest, args.variant, args.train_shards, args.with_docs, hub, args.skip_manifest)
    dataset_dir = hub.local_dir / safe_relative(entry.get("path") or "datasets/" + entry["name"])
    if (dataset_dir / BUILD_STAMP_NAME).exists():  # its shards have valid headers, so they would pass as published ones
        raise DownloadError(f"{dataset_dir} holds shards built by data/build_shards.py ({BUILD_STAMP_NAME}); the "
                            f"published {entry['name']} would be mixed with them. Build into another --out, or move "
                            "that folder away, then download.")
    todo = [rel for rel in files if not is_valid(hub.local_dir / rel)]
    print(f"{hub.repo_id}: {entry['name']}: {len(files)} files ({len(shards)} shards); "
          f"{len(files) - len(todo)} already here and valid, {len(todo)} to fetch", flush=True)
    if todo:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # one bar over all files instead of one per file
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool, \
                tqdm(total=len(todo), unit="file", desc=f"download {entry['name']}", file=sys.stderr) as bar:
            futures = [pool.submit(hub.get, rel) for rel in todo]
            try:
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    tokens = {"val": 0, "train": 0}
    for rel in shards:
        try:
            n = train_gpt.read_shard_header(hub.local_dir / rel)
        except (OSError, train_gpt.ShardError) as e:
            raise DownloadError(f"verification failed: {e}")
        tokens["val" if os.path.basename(rel).startswith("fineweb_val_") else "train"] += n
    expected_val = (entry.get("stats") or {}).get("tokens_val")
    if expected_val is not None and int(expected_val) != tokens["val"]:
        print(f"warning: the val shards hold {tokens['val']:,} tokens but the manifest says {int(expected_val):,}",
              file=sys.stderr)
    print(f"ok: {len(shards)} shards verified ({tokens['val']:,} val tokens, {tokens['train']:,} train tokens) in "
          f"{dataset_dir}", flush=True)


if __name__ == "__main__":
    main()
