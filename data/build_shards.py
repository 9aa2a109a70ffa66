#!/usr/bin/env python3
"""Build a SentencePiece tokenizer and challenge-format shards from a {"text": ...} jsonl (plain or .xz).

    python3 data/build_shards.py --input docs.jsonl.xz --tokenizer fineweb_8192_bpe.model \
        --num-val-docs 0 --chunk-tokens 8000000          # reuse a tokenizer
    python3 data/build_shards.py --input docs.jsonl --vocab-size 8192 --tokenizer-train-docs 100000   # train one

Output under --out (default: this data/ folder), as the challenge lays it out (ANCHORS 1.2/1.3):
  <out>/tokenizers/fineweb_<V>_bpe.model (+ .vocab)
  <out>/datasets/fineweb10B_sp<V>/fineweb_val_NNNNNN.bin, fineweb_train_NNNNNN.bin
  <out>/manifest.json
Every document becomes [BOS=1] + encode(text) (no EOS). The first --num-val-docs documents are validation. Tokens fill
fixed --chunk-tokens shards; documents straddle shard boundaries; the partial validation shard is flushed at the
val -> train switch and the last partial shard at the end. Output does not depend on --workers.

With --caseops (a CaseOps tokenizer, ANCHORS 7.4) every document becomes [BOS=1] + encode(caseops_encode(text)),
under <out>/datasets/fineweb10B_sp<V>_lossless_caps_caseops_v1_reserved/, and each validation shard gets a byte
sidecar fineweb_val_bytes_NNNNNN.bin (same format, one uint16 per token position: the original-text bytes of that
token, BOS 0; data/caseops.py) from which train_gpt.py computes val_bpb.

Re-running with the same input file, tokenizer and options does nothing when every shard is still valid. The record
of what was built lives in <dataset dir>/.build_shards.json; manifest.json is derived from it (and merged with the
entries of other datasets already listed there).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import hashlib
import json
import lzma
import math
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import caseops  # noqa: E402
import train_gpt  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
BOS_ID, EOS_ID = 1, 2  # the challenge recipe's control ids (train_gpt.train_sentencepiece)
BUILD_FORMAT = 1  # bump whenever the same request would produce different files
STAMP_NAME = ".build_shards.json"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left in a str is lone
SHARD_PATTERNS = ("fineweb_val_*.bin", "fineweb_train_*.bin")
BATCH_CHARS = 1 << 20  # about 1 MB of text per encoding task
MANIFEST_VERSION = "10B"  # the tag the challenge's manifests carry; kept so readers of that format accept ours


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


CASEOPS_TAG = "lossless_caps_caseops_v1_reserved"  # the names record #1787 gives its CaseOps tokenizer and data


def tokenizer_basename(vocab_size: int, caseops_data: bool = False) -> str:
    return f"fineweb_{vocab_size}_bpe" + (f"_{CASEOPS_TAG}" if caseops_data else "")


def dataset_name(vocab_size: int, caseops_data: bool = False) -> str:
    return f"fineweb10B_sp{vocab_size}" + (f"_{CASEOPS_TAG}" if caseops_data else "")


# ---------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------

class DocReader:
    """Iterates the "text" of each line of a jsonl file (.xz decompressed on the fly); tracks bytes read on disk."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path, self.limit = str(path), limit
        self.size = os.path.getsize(path)
        self._raw = None

    def bytes_read(self) -> int:
        return self._raw.tell() if self._raw is not None and not self._raw.closed else self.size

    def __iter__(self):
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream = lzma.open(raw, "rb") if self.path.endswith(".xz") else raw
            n = 0
            for lineno, line in enumerate(stream, 1):
                if self.limit is not None and n >= self.limit:
                    break
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise SystemExit(f"input error: {self.path}:{lineno}: not a JSON object ({e})")
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise SystemExit(f'input error: {self.path}:{lineno}: no string "text" field')
                n += 1
                # JSON may escape lone surrogates (\ud83d), which SentencePiece cannot take: U+FFFD, as a UTF-8
                # decoder makes of broken bytes
                yield LONE_SURROGATE.sub("\ufffd", text)


def batches(docs, max_chars: int | None = None):
    max_chars = max_chars or BATCH_CHARS
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------------------
# Encoding (in worker processes)
# ---------------------------------------------------------------------------------------------------------------

_WORKER_SP = None
_WORKER_SIDECAR = None  # caseops.SidecarTables when encoding CaseOps data


def _init_encoder(model_path: str, caseops_data: bool = False) -> None:
    global _WORKER_SP, _WORKER_SIDECAR
    import sentencepiece as spm

    _WORKER_SP = spm.SentencePieceProcessor(model_file=model_path)
    _WORKER_SIDECAR = caseops.SidecarTables(_WORKER_SP) if caseops_data else None


def _encode_batch(texts: list[str], with_counts: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (tokens per doc including its BOS, the docs' tokens concatenated as uint16, each doc led by BOS, and, for
    CaseOps data when with_counts, the original-text bytes of each token position as uint16, else None)."""
    if _WORKER_SIDECAR is not None:
        texts = [caseops.caseops_encode(t) for t in texts]
    pieces = []
    for ids in _WORKER_SP.encode(texts, num_threads=1):
        pieces.append((BOS_ID,))
        pieces.append(ids)
    lengths = np.array([len(p) for p in pieces[1::2]], dtype=np.int64) + 1
    tokens = np.fromiter((t for p in pieces for t in p), dtype=np.uint16, count=int(lengths.sum()))
    counts = _WORKER_SIDECAR.counts(tokens).astype(np.uint16) if with_counts and _WORKER_SIDECAR else None
    return lengths, tokens, counts


def encode_in_order(docs, model_path: str, workers: int, caseops_data: bool = False, count_docs: int = 0):
    """Yield _encode_batch results in input order; workers > 1 encode in parallel with a bounded read-ahead. For
    CaseOps data, batches holding any of the first count_docs documents (validation) come with byte counts."""
    def tasks():
        seen = 0
        for batch in batches(docs):
            yield batch, caseops_data and seen < count_docs
            seen += len(batch)

    if workers <= 1:
        _init_encoder(model_path, caseops_data)
        for task in tasks():
            yield _encode_batch(*task)
        return
    # Not a plain fork: a fork of a process with threads running (torch's pools, a test runner's) can deadlock in the
    # child. Workers fork from a single-threaded server that imported this script once (spawned workers each import
    # torch: +8 s for 16 of them on a fresh GPU machine). The executor raises BrokenProcessPool if a worker dies, where
    # a Pool waits forever.
    server = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=server, initializer=_init_encoder,
                                                initargs=(model_path, caseops_data)) as pool:
        pending = collections.deque()
        for task in tasks():
            pending.append(pool.submit(_encode_batch, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------------------------
# Shard writing (flush rules of ANCHORS 1.3)
# ---------------------------------------------------------------------------------------------------------------

class ShardWriter:
    """Fills fixed-size shards in order: val shards first, then train shards (start_split="train" when no val).
    With val_bytes, each val shard fineweb_val_N.bin gets its byte sidecar fineweb_val_bytes_N.bin, cut at the same
    positions (split "val_bytes" in the shard list)."""

    def __init__(self, out_dir: Path, chunk_tokens: int, start_split: str, val_bytes: bool = False):
        self.out_dir, self.chunk = out_dir, chunk_tokens
        self.buf = np.empty(chunk_tokens, dtype=np.uint16)
        self.bytes_buf = np.empty(chunk_tokens, dtype=np.uint16) if val_bytes else None
        self.fill = 0
        self.split = start_split
        self.shards: list[dict] = []  # {"name", "split", "tokens"} in write order

    def add(self, tokens: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Append tokens; counts (one per token) are required while writing val shards with sidecars."""
        with_bytes = self.bytes_buf is not None and self.split == "val" and len(tokens) > 0
        if with_bytes and (counts is None or len(counts) != len(tokens)):
            raise ValueError("val shards with byte sidecars need one byte count per token")
        pos = 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, self.chunk - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            if with_bytes:
                self.bytes_buf[self.fill:self.fill + take] = counts[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.chunk:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        index = sum(s["split"] == self.split for s in self.shards)
        name = f"fineweb_{self.split}_{index:06d}.bin"
        train_gpt.write_shard(self.out_dir / name, self.buf[:self.fill])
        self.shards.append({"name": name, "split": self.split, "tokens": int(self.fill)})
        if self.bytes_buf is not None and self.split == "val":
            name = f"fineweb_val_bytes_{index:06d}.bin"
            train_gpt.write_shard(self.out_dir / name, self.bytes_buf[:self.fill])
            self.shards.append({"name": name, "split": "val_bytes", "tokens": int(self.fill)})
        self.fill = 0

    def start_train(self) -> None:
        if self.split != "train":
            self.flush()
            self.split = "train"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: reuse or train
# ---------------------------------------------------------------------------------------------------------------

def piece_count(model_path: str | os.PathLike) -> int:
    """The model's vocabulary size, after checking it uses the BOS id the shards and trainers assume."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    if sp.bos_id() != BOS_ID:
        raise SystemExit(f"tokenizer error: {model_path} has bos_id {sp.bos_id()}; shards and trainers use "
                         f"BOS id {BOS_ID} (the challenge recipe: pad/bos/eos/unk = 0/1/2/3)")
    return sp.get_piece_size()


def check_caseops_tokenizer(model_path: str | os.PathLike, caseops_data: bool) -> None:
    """A CaseOps tokenizer exactly when --caseops: each without the other gives data no trainer counts right."""
    import sentencepiece as spm

    n_ops = len(train_gpt.caseops_operator_ids(spm.SentencePieceProcessor(model_file=str(model_path))))
    if caseops_data and n_ops != len(caseops.OPERATORS):
        raise SystemExit(f"tokenizer error: --caseops needs a CaseOps tokenizer, with the operators U+E001..U+E004 as "
                         f"pieces; {model_path} has {n_ops} of them")
    if not caseops_data and n_ops:
        raise SystemExit(f"tokenizer error: {model_path} is a CaseOps tokenizer (it has the operator pieces "
                         "U+E001..U+E004); pass --caseops so that documents are transformed and val bytes recorded")


def install_tokenizer(src: Path, dest_model: Path) -> str | None:
    """Copy a given .model (and its .vocab when there is one) to dest; return the vocab path written or None."""
    pairs = [(src, dest_model)]
    src_vocab, dest_vocab = src.with_suffix(".vocab"), dest_model.with_suffix(".vocab")
    if src_vocab.is_file():
        pairs.append((src_vocab, dest_vocab))
    elif dest_vocab.exists():
        dest_vocab.unlink()  # it belonged to another model
    for a, b in pairs:
        if b.exists() and (os.path.samefile(a, b) or file_sha256(a) == file_sha256(b)):
            continue
        train_gpt.atomic_write_bytes(b, a.read_bytes())
    return str(pairs[1][1]) if len(pairs) > 1 else None


def train_tokenizer(input_path: str, dest_model: Path, vocab_size: int, train_docs: int | None) -> None:
    tmp_prefix = dest_model.parent / f".tmp_{dest_model.stem}_{os.getpid()}"
    dest_model.parent.mkdir(parents=True, exist_ok=True)
    print(f"training a {vocab_size}-piece SentencePiece BPE tokenizer on "
          f"{'all' if train_docs is None else f'the first {train_docs:,}'} docs of {input_path}"
          + ("; SentencePiece holds that text in memory (measured: ~6x its size), so cap it with "
             "--tokenizer-train-docs on a large corpus (the challenge used 5,000,000)" if train_docs is None else ""),
          flush=True)
    t0 = time.time()
    try:
        train_gpt.train_sentencepiece(DocReader(input_path, limit=train_docs), str(tmp_prefix), vocab_size)
        got = piece_count(f"{tmp_prefix}.model")
        if got != vocab_size:
            raise SystemExit(f"tokenizer error: training produced {got} pieces, not {vocab_size}; the training text "
                             "is too small for that vocabulary: use more --tokenizer-train-docs or a smaller --vocab-size")
        os.replace(f"{tmp_prefix}.vocab", dest_model.with_suffix(".vocab"))
        os.replace(f"{tmp_prefix}.model", dest_model)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(f"{tmp_prefix}{ext}"):
                os.unlink(f"{tmp_prefix}{ext}")
    print(f"tokenizer written to {dest_model} in {time.time() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Build record, idempotency, manifest
# ---------------------------------------------------------------------------------------------------------------

def existing_shards(dataset_dir: Path) -> set[str]:
    return {os.path.basename(p) for pat in SHARD_PATTERNS for p in glob.glob(str(dataset_dir / pat))}


def read_stamp(dataset_dir: Path) -> dict | None:
    try:
        return json.loads((dataset_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def stamp_is_current(stamp: dict | None, request: dict, dataset_dir: Path, model_path: Path) -> bool:
    """True when the recorded build answers this request and every file it made is still there and valid."""
    if not stamp or stamp.get("request") != request:
        return False
    if not model_path.is_file() or file_sha256(model_path) != stamp.get("tokenizer_sha256"):
        return False
    shards = stamp.get("shards", [])
    if existing_shards(dataset_dir) != {s["name"] for s in shards}:
        return False
    for s in shards:
        try:
            if train_gpt.read_shard_header(dataset_dir / s["name"]) != s["tokens"]:
                return False
        except (OSError, train_gpt.ShardError):
            return False
    return True


def clear_previous_build(dataset_dir: Path, stamp: dict | None, overwrite: bool) -> None:
    """Remove the shards of an earlier build; refuse to delete shards this script did not write unless told to."""
    owned = {s["name"] for s in (stamp or {}).get("shards", [])}
    present = existing_shards(dataset_dir)
    foreign = sorted(present - owned)
    if foreign and not overwrite:
        raise SystemExit(f"output error: {dataset_dir} holds {len(foreign)} shard file(s) this script did not write "
                         f"(downloaded ones, or those of an interrupted build), e.g. {foreign[0]}. Choose another "
                         "--out, or pass --overwrite to delete them and build there.")
    (dataset_dir / STAMP_NAME).unlink(missing_ok=True)  # an interrupted build must not look complete
    for name in present:
        (dataset_dir / name).unlink()
    for tmp in glob.glob(str(dataset_dir / ".fineweb_*")):  # leftovers of killed atomic writes
        os.unlink(tmp)


def relative_to(path: str | os.PathLike, root: Path) -> str:
    """A path under root as a path relative to it (how the manifest records it); anything else as absolute."""
    path, root_abs = os.path.abspath(path), os.path.abspath(root)
    return os.path.relpath(path, root_abs) if os.path.commonpath([path, root_abs]) == root_abs else path


def manifest_entries(stamp: dict, out: Path, dataset_dir: Path, model_path: Path, vocab_path: str | None) -> dict:
    """The manifest.json content for this build (fields of ANCHORS 1.3; paths relative to --out)."""
    req, stats = stamp["request"], stamp["stats"]
    v = req["vocab_size"]
    bigram = math.ceil(v / 128) * 128 * 5
    caseops_data = "caseops" in req
    tok_name = f"sp_bpe_{v}" + (f"_{CASEOPS_TAG}" if caseops_data else "")
    spec = {"name": tok_name, "kind": "sentencepiece_bpe", "vocab_size": v}
    if "train" in req["tokenizer"]:
        spec["tokenizer_train_docs"] = req["tokenizer"]["train"]["tokenizer_train_docs"]
    else:
        spec["reuse_model_sha256"] = req["tokenizer"]["reuse_sha256"]
    rel_ds = relative_to(dataset_dir, out)
    dataset = {"name": dataset_dir.name, "tokenizer_name": tok_name, "tokenizer_kind": "sentencepiece_bpe",
               "path": rel_ds, "train_glob": f"{rel_ds}/fineweb_train_*.bin",
               "val_glob": f"{rel_ds}/fineweb_val_*.bin", "vocab_size": v, "bos_id": BOS_ID, "eos_id": EOS_ID,
               "recommended_bigram_vocab_size": bigram, "stats": stats}
    if caseops_data:  # val_glob also matches the sidecars; readers drop names with _bytes_ (ANCHORS 1.2)
        dataset.update(text_transform=req["caseops"], val_bytes_glob=f"{rel_ds}/fineweb_val_bytes_*.bin")
    return {
        "version": MANIFEST_VERSION,
        "builder": "data/build_shards.py",
        "num_docs": stats["docs_total"],
        "num_val_docs": req["num_val_docs"],
        "shuffle_seed": None,  # documents are taken in file order
        "shard_size": req["chunk_tokens"],
        "append_eos": False,
        "docs_jsonl": relative_to(stamp["input_path"], out),
        "docs_meta": {"remote_repo_id": None, "remote_root": None, "num_docs": stats["docs_total"],
                      "docs_sha256": req["input"]["sha256"], "source_manifest": None},
        "tokenizer_specs": [spec],
        "tokenizers": [{"name": tok_name, "kind": "sentencepiece_bpe", "vocab_size": v, "bos_id": BOS_ID,
                        "eos_id": EOS_ID, "recommended_bigram_vocab_size": bigram, "source_spec": spec,
                        "model_path": relative_to(model_path, out),
                        "vocab_path": relative_to(vocab_path, out) if vocab_path else None}],
        "datasets": [dataset],
    }


def merge_manifest(old: dict | None, new: dict) -> dict:
    """New top-level fields; entries of other datasets/tokenizers already listed in the old manifest are kept."""
    merged = dict(new)
    for key in ("tokenizers", "datasets"):
        mine = {e["name"] for e in new[key]}
        kept = [e for e in (old or {}).get(key, []) if isinstance(e, dict) and e.get("name") not in mine]
        merged[key] = kept + new[key]
    return merged


def write_manifest(out: Path, entries: dict) -> bool:
    path = out / "manifest.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    merged = merge_manifest(old, entries)
    if merged == old:
        return False
    train_gpt.atomic_write_bytes(path, (json.dumps(merged, indent=2) + "\n").encode())
    return True


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help='jsonl with a "text" field per line; .xz is decompressed on the fly')
    p.add_argument("--out", default=str(DATA_DIR), help="output root (default: %(default)s)")
    p.add_argument("--tokenizer", help="reuse this SentencePiece .model instead of training one")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the tokenizer to train (default 8192); with "
                   "--tokenizer it must match the model")
    p.add_argument("--tokenizer-train-docs", type=int, help="train the tokenizer on the first N docs (default: all)")
    p.add_argument("--num-val-docs", type=int, required=True, help="the first N docs become validation shards (the "
                   "challenge used 50000 on its docs_selected.jsonl); 0 = no validation shards: point the trainer's "
                   "VAL_FILES at a separate validation set")
    p.add_argument("--chunk-tokens", type=int, default=100_000_000, help="tokens per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: %(default)s)")
    p.add_argument("--caseops", action="store_true", help="CaseOps data (record #1787): transform each document with "
                   "data/caseops.py before encoding it with --tokenizer, a CaseOps tokenizer, and write the byte "
                   "sidecars fineweb_val_bytes_*.bin that val_bpb needs")
    p.add_argument("--overwrite", action="store_true", help="delete shards in the output dataset folder that this "
                   "script did not write (e.g. downloaded ones)")
    args = p.parse_args(argv)
    if args.chunk_tokens < 1:
        p.error("--chunk-tokens must be >= 1")
    if args.num_val_docs < 0:
        p.error("--num-val-docs must be >= 0")
    if args.tokenizer_train_docs is not None and args.tokenizer_train_docs < 1:
        p.error("--tokenizer-train-docs must be >= 1")
    if args.tokenizer and args.tokenizer_train_docs is not None:
        p.error("--tokenizer-train-docs only applies when training a tokenizer (no --tokenizer)")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} is not a file")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer} is not a file")
    if args.caseops and not args.tokenizer:
        p.error("--caseops needs --tokenizer: a CaseOps tokenizer (e.g. "
                "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model, with U+E001..U+E004 as pieces)")
    return args


def build(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    t0 = time.time()
    if args.tokenizer:
        vocab_size = piece_count(args.tokenizer)
        check_caseops_tokenizer(args.tokenizer, args.caseops)
        if args.vocab_size is not None and args.vocab_size != vocab_size:
            raise SystemExit(f"tokenizer error: {args.tokenizer} has {vocab_size} pieces, not --vocab-size {args.vocab_size}")
        tok_request = {"reuse_sha256": file_sha256(args.tokenizer)}
    else:
        vocab_size = args.vocab_size or 8192
        import sentencepiece as spm

        tok_request = {"train": {"tokenizer_train_docs": args.tokenizer_train_docs,
                                 "recipe": "train_gpt.train_sentencepiece", "sentencepiece": spm.__version__}}
    if vocab_size > 65536:
        raise SystemExit(f"tokenizer error: {vocab_size} pieces do not fit the uint16 shard format (<= 65536)")
    request = {"format": BUILD_FORMAT, "input": {"sha256": file_sha256(args.input), "bytes": os.path.getsize(args.input)},
               "tokenizer": tok_request, "vocab_size": vocab_size, "num_val_docs": args.num_val_docs,
               "chunk_tokens": args.chunk_tokens}
    if args.caseops:  # only then, so that the stamps of standard builds stay valid
        request["caseops"] = caseops.TRANSFORM_NAME
    dataset_dir = out / "datasets" / dataset_name(vocab_size, args.caseops)
    model_path = out / "tokenizers" / f"{tokenizer_basename(vocab_size, args.caseops)}.model"
    vocab_file = model_path.with_suffix(".vocab")
    stamp = read_stamp(dataset_dir)

    if stamp_is_current(stamp, request, dataset_dir, model_path):
        vocab_path = str(vocab_file) if vocab_file.is_file() else None
        changed = write_manifest(out, manifest_entries(stamp, out, dataset_dir, model_path, vocab_path))
        print(f"up to date: {dataset_dir} ({len(stamp['shards'])} shards, {stamp['stats']['tokens_total']:,} tokens)"
              + ("; manifest.json rewritten" if changed else "; nothing written"), flush=True)
        return stamp

    dataset_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_build(dataset_dir, stamp, args.overwrite)
    if args.tokenizer:
        vocab_path = install_tokenizer(Path(args.tokenizer), model_path)
    else:
        same_request = stamp is not None and stamp.get("request", {}).get("tokenizer") == tok_request \
            and stamp["request"].get("input") == request["input"] and stamp["request"].get("vocab_size") == vocab_size
        if not (same_request and model_path.is_file() and file_sha256(model_path) == stamp.get("tokenizer_sha256")):
            train_tokenizer(args.input, model_path, vocab_size, args.tokenizer_train_docs)
        vocab_path = str(vocab_file) if vocab_file.is_file() else None

    reader = DocReader(args.input)
    writer = ShardWriter(dataset_dir, args.chunk_tokens, "val" if args.num_val_docs > 0 else "train",
                         val_bytes=args.caseops)
    docs = tokens = 0
    tokens_val = 0
    bar = tqdm(total=reader.size, unit="B", unit_scale=True, desc=f"encode {os.path.basename(args.input)}",
               mininterval=1.0, file=sys.stderr)
    for lengths, toks, counts in encode_in_order(reader, str(model_path), args.workers, args.caseops,
                                                 args.num_val_docs):
        n_val = min(max(args.num_val_docs - docs, 0), len(lengths))
        split_at = int(lengths[:n_val].sum())
        writer.add(toks[:split_at], None if counts is None else counts[:split_at])
        if n_val < len(lengths):
            writer.start_train()
        writer.add(toks[split_at:], None if counts is None else counts[split_at:])  # val while n_val == len
        docs += len(lengths)
        tokens += len(toks)
        tokens_val += split_at
        bar.update(reader.bytes_read() - bar.n)
        bar.set_postfix(docs=docs, tokens=tokens, refresh=False)
    writer.flush()
    bar.close()

    docs_val = min(args.num_val_docs, docs)
    if docs == docs_val:
        print(f"note: all {docs:,} docs went to validation (--num-val-docs {args.num_val_docs}); no train shards",
              flush=True)
    files_val = sum(s["split"] == "val" for s in writer.shards)
    files_train = sum(s["split"] == "train" for s in writer.shards)
    stats = {"docs_total": docs, "docs_val": docs_val, "docs_train": docs - docs_val,
             "files_total": files_val + files_train, "files_val": files_val, "files_train": files_train,
             "tokens_total": tokens, "tokens_val": tokens_val, "tokens_train": tokens - tokens_val}
    stamp = {"request": request, "input_path": os.path.abspath(args.input), "tokenizer_sha256": file_sha256(model_path),
             "stats": stats, "shards": writer.shards}
    train_gpt.atomic_write_bytes(dataset_dir / STAMP_NAME, (json.dumps(stamp, indent=2) + "\n").encode())
    write_manifest(out, manifest_entries(stamp, out, dataset_dir, model_path, vocab_path))
    sidecars = f" + {files_val} val byte sidecar(s)" if args.caseops and files_val else ""
    print(f"wrote {files_val + files_train} shards ({files_val} val, {files_train} train){sidecars}, {tokens:,} tokens "
          f"from {docs:,} docs to {dataset_dir} in {time.time() - t0:.1f}s", flush=True)
    return stamp


def main(argv=None) -> None:
    build(parse_args(argv))


if __name__ == "__main__":
    main()
