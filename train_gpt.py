"""Parameter Golf training script: SP8192 GPT, depth recurrence, Muon, GPTQ artifact, score-first or phased LoRA TTT.

Reads top to bottom as the pipeline:
configuration -> data -> model -> optimizer -> training loop -> quantization and artifact -> evaluation -> main.
Every hyperparameter comes from an environment variable (README.md has the table).
"""
from __future__ import annotations

import ast
import atexit
import base64
import copy
import dataclasses
import fcntl
import functools
import glob
import hashlib
import importlib.util
import io
import json
import lzma
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

PROCESS_START = time.time()  # before the heavy imports: launch -> first timed step includes them

import uuid
import warnings
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple


def bytecode_cached(module_file: str) -> bool:
    """Whether Python finds the compiled bytecode of a module's source (in __pycache__ or under PYTHONPYCACHEPREFIX)."""
    return os.path.exists(importlib.util.cache_from_source(module_file))


class BytecodeCache(NamedTuple):
    folder: str  # PYTHONPYCACHEPREFIX, as set for this process and the processes it starts
    compiled_s: float | None  # seconds spent compiling torch, Triton and SymPy there; None: found there


def keep_torch_bytecode() -> BytecodeCache | None:
    """Where Python finds no bytecode for torch (an image with PYTHONDONTWRITEBYTECODE=1, torch installed by uv), every
    process compiles torch's sources as it imports them: 16 s of the cold start on an H100 host (README: compile
    cache). Then torch, Triton and SymPy are compiled once, into PYTHONPYCACHEPREFIX (default
    ~/.cache/parameter-golf/pycache): 3-5 s on 16 cores, by one process while the machine's other ranks wait. Python
    keeps what else it compiles there too, and the processes started later inherit the setting. Where torch has no
    bytecode beside its sources, returns that folder and this run's compile time (None: found there); else None.
    Must run before torch is imported."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin or bytecode_cached(spec.origin):
        return None
    prefix = os.environ.get("PYTHONPYCACHEPREFIX") or os.path.expanduser("~/.cache/parameter-golf/pycache")
    try:
        os.makedirs(prefix, exist_ok=True)
        lock = open(os.path.join(prefix, ".lock"), "w")
    except OSError:  # no writable folder: every process compiles torch, as it would have
        return None
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix, sys.dont_write_bytecode = prefix, False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bytecode_cached(spec.origin):  # now looked up under the prefix: an earlier run or rank compiled it
            return BytecodeCache(prefix, None)
        t0 = time.perf_counter()
        packages = [os.path.dirname(s.origin) for s in (spec, *map(importlib.util.find_spec, ("triton", "sympy")))
                    if s is not None and s.origin]
        subprocess.run([sys.executable, "-m", "compileall", "-qq", "-j", "0", *packages],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return BytecodeCache(prefix, time.perf_counter() - t0)


BYTECODE_CACHE = keep_torch_bytecode()

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class Startup:
    """Launch -> first timed step (the cold start) by stage: mark(stage) ends the stage begun at the previous mark."""

    def __init__(self, t0: float):
        self.t0, self.last, self.stages = t0, t0, {}

    def mark(self, stage: str) -> None:
        now = time.time()
        self.stages[stage], self.last = now - self.last, now

    def line(self) -> str:
        return " ".join(f"{k}:{v:.1f}s" for k, v in self.stages.items()) + f" total:{self.last - self.t0:.1f}s"


STARTUP = Startup(PROCESS_START)
STARTUP.mark("imports")

# =====================================================================================================
# 1. Configuration
# =====================================================================================================

SIZE_CAP_BYTES = 16_000_000  # the challenge's cap: compressed model + wrapped code, decimal bytes


@dataclasses.dataclass
class Hyperparameters:
    # data and run
    data_dir: str = "./data/"
    data_path: str = ""  # default: <DATA_DIR>/datasets/fineweb10B_sp<VOCAB_SIZE>
    tokenizer_path: str = ""  # default: <DATA_DIR>/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model
    val_files: str = ""  # glob; default: <DATA_PATH>/fineweb_val_*.bin
    run_id: str = ""
    artifact_dir: str = ""  # default: logs/<RUN_ID>
    seed: int = 1337
    smoke: int = 0
    dry_run: int = 0
    compile: int = 1
    compile_scope: str = "blocks"  # blocks: each piece compiled once, shared by all layers; model: the whole model
    # schedule and batch
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0
    warmdown_frac: float = 0.72
    min_lr: float = 0.0
    warmup_steps: int = 3  # compile warm-up steps per graph; the records used 20, 3 suffice to compile
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    train_log_every: int = 500
    val_loss_every: int = 4000
    val_batch_tokens: int = 524_288
    # model
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    qk_gain_init: float = 5.25
    logit_softcap: float = 30.0
    attention_backend: str = "auto"  # auto: FA3, else FA4, else the fastest SDPA (timed); or fa3, fa4, sdpa_cudnn, ...
    fused_ce: int = 1  # training loss by the fused Triton kernels (CUDA); the eager CE where Triton is missing
    fused_mlp: int = 1  # training MLP by the fused Triton GEMM + LeakyReLU² kernels (CUDA); else the module path
    xsa_last_n: int = 11
    sparse_attn_gate_enabled: int = 1  # per-head sigmoid gate on each attention output, from 12 input channels
    doc_isolated_attn: int = 0  # 1: training attention never crosses a BOS; costs ~40% of attention time without FA3
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35
    parallel_residual_start: int = 7
    tied_embed_init_std: float = 0.005
    # optimizer
    matrix_lr: float = 0.022
    tied_embed_lr: float = 0.03
    scalar_lr: float = 0.02
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_row_normalize: int = 1
    muon_polar_express: int = 1
    muon_wd: float = 0.095
    embed_wd: float = 0.085
    adam_wd: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.9965
    # quantization and artifact
    gptq_calibration_batches: int = 64
    gptq_reserve_seconds: float = -1.0  # < 0: measured before training starts
    matrix_bits: int = 6
    embed_bits: int = 8
    matrix_clip_sigmas: float = 12.85
    attn_clip_sigmas: float = -1.0  # < 0: MATRIX_CLIP_SIGMAS
    mlp_clip_sigmas: float = -1.0  # < 0: MATRIX_CLIP_SIGMAS
    embed_clip_sigmas: float = 20.0
    compressor: str = "brotli"
    size_target_bytes: int = SIZE_CAP_BYTES  # > 0: search the clip multiplier to land under this many total bytes
    eval_only: int = 0
    artifact_path: str = ""  # artifact to evaluate with EVAL_ONLY=1
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    sliding_window_enabled: int = 1
    eval_budget_seconds: float = 600.0
    ttt_enabled: int = 1
    ttt_mode: str = "lora_phased"  # lora_phased (ANCHORS 6.2; scored better within budget: README) or score_first (6.1)
    ttt_lr: float = 0.005
    ttt_epochs: int = 3
    ttt_momentum: float = 0.9
    ttt_chunk_tokens: int = 32768
    ttt_grad_clip: float = 1.0
    # lora_phased: per-document LoRA, scored chunk by chunk, with global SGD phases (its SGD reuses TTT_MOMENTUM,
    # TTT_GRAD_CLIP and TTT_CHUNK_TOKENS)
    ttt_batch_size: int = 64  # documents per batch, each with its own adapters
    ttt_chunk_size: int = 48  # predictions a document scores before each adapter step
    ttt_lora_rank: int = 96
    ttt_lora_alpha: float = 144.0  # adapter output scale alpha/rank
    ttt_lora_lr: float = 1e-4  # AdamW, betas (0, 0.999), eps 1e-10
    ttt_weight_decay: float = 1.0
    ttt_warm_start_a: int = 1  # 1: A carries over between a lane's batches (B restarts at 0); 0: A drawn per batch
    phased_ttt_prefix_docs: int = 2000  # the global phases train on up to this many already scored documents
    phased_ttt_num_phases: int = 3  # global phases, after PREFIX_DOCS*k/NUM_PHASES scored documents (k = 1..)
    global_ttt_lr: float = 0.001  # SGD lr of the base weights in a phase (cosine over its chunks)


# SMOKE=1: a tiny model on data the script makes itself, end to end on a laptop CPU in well under a minute.
SMOKE_DEFAULTS = dict(
    vocab_size=512, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8,
    xsa_last_n=6, loop_start=2, loop_end=3, parallel_residual_start=4, train_seq_len=128, eval_seq_len=128,
    train_batch_tokens=2048, val_batch_tokens=4096, max_wallclock_seconds=12.0, warmup_steps=2,
    train_log_every=10, val_loss_every=0, gptq_calibration_batches=2, gptq_reserve_seconds=0.0,
    eval_stride=32, ttt_chunk_tokens=1024, ttt_epochs=1, compile=0, muon_momentum_warmup_steps=20,
    matrix_lr=0.03, tied_embed_lr=0.05, scalar_lr=0.03, embed_bits=8,
    ttt_batch_size=8, ttt_chunk_size=16, ttt_lora_rank=8, ttt_lora_alpha=12.0, phased_ttt_prefix_docs=48,
    phased_ttt_num_phases=2,
)


def _parse_int(raw: str) -> int:
    """An integer, also written as a float ("1e6", "8.0"); 1.9 is an error, not 1."""
    try:
        return int(raw)
    except ValueError:
        value = float(raw)
        if not value.is_integer():
            raise ValueError(raw)
        return int(value)


def load_hyperparameters(environ=os.environ) -> Hyperparameters:
    """Defaults, then SMOKE defaults, then every field's upper-case environment variable."""
    hp = Hyperparameters()
    if int(environ.get("SMOKE", "0")):
        hp = dataclasses.replace(hp, **SMOKE_DEFAULTS)
    for f in dataclasses.fields(hp):
        raw = environ.get(f.name.upper())
        if raw is None:
            continue
        cast = type(getattr(hp, f.name))
        try:
            setattr(hp, f.name, _parse_int(raw) if cast is int else cast(raw))
        except ValueError:
            raise SystemExit(f"config error: {f.name.upper()}={raw!r} is not a valid {cast.__name__}")
    hp.run_id = hp.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    hp.data_path = hp.data_path or os.path.join(hp.data_dir, "datasets", f"fineweb10B_sp{hp.vocab_size}")
    hp.tokenizer_path = hp.tokenizer_path or os.path.join(hp.data_dir, "tokenizers", f"fineweb_{hp.vocab_size}_bpe.model")
    hp.val_files = hp.val_files or os.path.join(hp.data_path, "fineweb_val_*.bin")
    hp.artifact_dir = hp.artifact_dir or os.path.join("logs", hp.run_id)
    return hp


def validate_hyperparameters(hp: Hyperparameters, world_size: int) -> None:
    """Configuration errors that can be found without data or GPU, each with what to set."""
    sizes = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "train_seq_len", "eval_seq_len",
             "train_batch_tokens", "vocab_size")
    errors = [f"{name.upper()}={getattr(hp, name)} must be at least 1" for name in sizes if getattr(hp, name) < 1]
    if errors:  # the checks below divide by these
        raise SystemExit("config error:\n  " + "\n  ".join(errors))
    if 8 % world_size:
        errors.append(f"WORLD_SIZE={world_size} must divide 8 (gradient accumulation is 8/world); use 1, 2, 4 or 8 GPUs")
    grad_accum = 8 // world_size if 8 % world_size == 0 else 1
    if hp.train_batch_tokens % (world_size * grad_accum * hp.train_seq_len):
        errors.append(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must be a multiple of 8*TRAIN_SEQ_LEN={8 * hp.train_seq_len}")
    if hp.model_dim % hp.num_heads or hp.num_heads % hp.num_kv_heads:
        errors.append("MODEL_DIM must be divisible by NUM_HEADS, and NUM_HEADS by NUM_KV_HEADS")
    head_dim = hp.model_dim // max(hp.num_heads, 1)
    if hp.rope_dims % 2 or hp.rope_dims > head_dim:
        errors.append(f"ROPE_DIMS={hp.rope_dims} must be even and at most the head dim {head_dim}")
    if hp.num_loops > 0 and not 0 <= hp.loop_start <= hp.loop_end < hp.num_layers:
        errors.append(f"need 0 <= LOOP_START <= LOOP_END < NUM_LAYERS (got {hp.loop_start}, {hp.loop_end}, {hp.num_layers})")
    if hp.sparse_attn_gate_enabled and hp.model_dim < ATTN_GATE_WINDOW:
        errors.append(f"SPARSE_ATTN_GATE_ENABLED=1 reads {ATTN_GATE_WINDOW} channels: MODEL_DIM must be at least that")
    if hp.vocab_size > 65536:
        errors.append("VOCAB_SIZE must be at most 65536 (tokens are stored as uint16)")
    if hp.compile_scope not in ("blocks", "model"):
        errors.append(f"COMPILE_SCOPE={hp.compile_scope!r}: use blocks or model")
    if hp.compressor not in ("brotli", "lzma"):
        errors.append(f"COMPRESSOR={hp.compressor!r}: use brotli or lzma")
    if not 2 <= hp.matrix_bits <= 8 or not 2 <= hp.embed_bits <= 8:
        errors.append("MATRIX_BITS and EMBED_BITS must be between 2 and 8")
    if hp.eval_seq_len > hp.train_seq_len:
        errors.append(f"EVAL_SEQ_LEN={hp.eval_seq_len} must be at most TRAIN_SEQ_LEN={hp.train_seq_len}: RoPE is not "
                      "rescaled for positions the model never trained on")
    if hp.eval_stride <= 0 or hp.eval_stride > hp.eval_seq_len:
        errors.append(f"EVAL_STRIDE={hp.eval_stride} must be in 1..EVAL_SEQ_LEN={hp.eval_seq_len}")
    if hp.attention_backend not in ATTENTION_BACKENDS:
        errors.append(f"ATTENTION_BACKEND={hp.attention_backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if hp.ttt_mode not in ("score_first", "lora_phased"):
        errors.append(f"TTT_MODE={hp.ttt_mode!r}: use score_first or lora_phased")
    if hp.ttt_batch_size < 2 or hp.ttt_lora_rank < 1 or not 1 <= hp.ttt_chunk_size <= hp.eval_seq_len:
        errors.append("need TTT_BATCH_SIZE >= 2, TTT_LORA_RANK >= 1 and 1 <= TTT_CHUNK_SIZE <= EVAL_SEQ_LEN")
    if hp.phased_ttt_num_phases < 0 or hp.phased_ttt_prefix_docs < 0:
        errors.append("PHASED_TTT_NUM_PHASES and PHASED_TTT_PREFIX_DOCS must be >= 0")
    if 0 < hp.max_wallclock_seconds <= hp.gptq_reserve_seconds:
        errors.append(f"GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds} leaves no training time in "
                      f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}")
    if hp.eval_only and not hp.artifact_path:
        errors.append("EVAL_ONLY=1 needs ARTIFACT_PATH=<path of a .ptz artifact>")
    if errors:
        raise SystemExit("config error:\n  " + "\n  ".join(errors))


def format_hyperparameters(hp: Hyperparameters) -> str:
    return "Hyperparameters:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(dataclasses.asdict(hp).items()))


# =====================================================================================================
# 2. Data: shard format, tokenizer byte accounting, loaders
# =====================================================================================================

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


class ShardError(ValueError):
    pass


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write uint16 tokens in the challenge's shard format, atomically (temp file + rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 65536):
        raise ShardError(f"{path}: token ids must lie in [0, 65536) to be stored as uint16")
    if tokens.size >= 2**31:
        raise ShardError(f"{path}: a shard holds fewer than 2**31 tokens, got {tokens.size}")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u2").tobytes())


def read_shard_header(path: str | os.PathLike) -> int:
    """Check magic, version and exact file size; return the token count. Errors name the file and the fault."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header (truncated download?)")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a shard file")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    n = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: header says {n} tokens = {SHARD_HEADER_BYTES + 2 * n} bytes, file has {size} bytes "
                         "(truncated or corrupt; delete it and download or rebuild it)")
    return n


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header."""
    n = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def find_shards(pattern: str, what: str, vocab_size: int) -> list[str]:
    files = sorted(f for f in glob.glob(pattern) if "_bytes_" not in os.path.basename(f))
    if not files:
        raise SystemExit(f"data error: no {what} shards match {pattern}. Download them "
                         f"(python3 data/cached_challenge_fineweb.py --variant sp{vocab_size}) or build them "
                         "(python3 data/build_shards.py), or point DATA_PATH / VAL_FILES at them.")
    for f in files:
        try:
            read_shard_header(f)
        except ShardError as e:
            raise SystemExit(f"data error: {e}")
    return files


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise SystemExit(f"tokenizer error: {path} not found. Set TOKENIZER_PATH, or fetch it with "
                         "data/cached_challenge_fineweb.py.")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.get_piece_size() != vocab_size:
        raise SystemExit(f"tokenizer error: {path} has {sp.get_piece_size()} pieces but VOCAB_SIZE={vocab_size}; "
                         "set VOCAB_SIZE to match the tokenizer the shards were made with")
    return sp


def build_byte_tables(sp, vocab_size: int):
    """Per-token byte counts for val_bpb: (base_bytes int16, has_leading_space bool, is_boundary bool).

    A target t after previous token p is worth base_bytes[t] + (has_leading_space[t] and not is_boundary[p]) bytes:
    the space that a leading U+2581 stands for is not there at the start of a document. Byte-fallback pieces are one
    byte each; control, unknown and unused pieces are zero-byte boundaries.
    """
    n_sp = sp.get_piece_size()
    if sp.piece_to_id("\u2581") == sp.unk_id() and sp.id_to_piece(sp.unk_id()) != "\u2581":
        raise SystemExit("tokenizer error: the tokenizer has no standalone '\u2581' (space) piece, so byte counts of "
                         "text with lone spaces would be wrong; retrain it with the challenge's recipe (data/build_shards.py)")
    n = max(n_sp, vocab_size)
    base = np.zeros(n, dtype=np.int16)
    leading = np.zeros(n, dtype=np.bool_)
    boundary = np.ones(n, dtype=np.bool_)
    for t in range(n_sp):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            leading[t] = True
            piece = piece[1:]
        base[t] = len(piece.encode("utf-8"))
    return base, leading, boundary


class ByteTables(NamedTuple):
    """What val_bpb divides by: the bytes each target is worth. The tables of build_byte_tables (ANCHORS 2.1), and,
    when the val shards come with a byte sidecar, the sidecar, which then replaces them (ANCHORS 2.6). A plain
    (base, leading, boundary) tuple is the same thing without a sidecar."""
    base: Tensor
    leading: Tensor
    boundary: Tensor
    sidecar: Tensor | None = None  # int32 original-text bytes per position of the val stream (BOS: 0)

    def to(self, device) -> "ByteTables":
        return ByteTables(*(None if t is None else t.to(device) for t in self))


def count_target_bytes(prev: Tensor, tgt: Tensor, tables, tgt_pos: Tensor | None = None) -> Tensor:
    """Bytes credited to each target token (tables as torch tensors on prev's device): the sidecar's count at the
    target token's position in the val stream (tgt_pos; target i of the stream is token i + 1) when there is a
    sidecar, else the table rule given the token before it."""
    tables = ByteTables(*tables)
    if tables.sidecar is not None:
        if tgt_pos is None:
            raise ValueError("byte counts from a sidecar need the targets' stream positions (tgt_pos)")
        return tables.sidecar[tgt_pos].to(torch.int64)
    return tables.base[tgt].to(torch.int64) + (tables.leading[tgt] & ~tables.boundary[prev]).to(torch.int64)


CASEOPS_OPERATORS = "\ue001\ue002\ue003\ue004"  # TITLE, ALLCAPS, CAPNEXT, ESC of the transform in data/caseops.py


def _protobuf_fields(buf: bytes):
    """(field number, value) of a serialized protobuf message; enough to read a SentencePiece model's piece types."""
    def varint(i):
        value = shift = 0
        while True:
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
            if buf[i - 1] < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def caseops_operator_ids(sp) -> list[int]:
    """Ids of the CaseOps operator pieces of the tokenizer: U+E001..U+E004 as user-defined symbols (always split off
    as their own tokens). The sentencepiece API hides piece types and protobuf is no dependency, so they are read
    from the model's serialized proto (ModelProto field 1 = pieces; SentencePiece field 3 = type, 4 = USER_DEFINED)."""
    pieces = [dict(_protobuf_fields(p)) for f, p in _protobuf_fields(sp.serialized_model_proto()) if f == 1]
    return [i for i, p in enumerate(pieces) if p.get(3) == 4 and p.get(1, b"").decode() in CASEOPS_OPERATORS]


def val_bytes_path(val_file: str) -> str | None:
    """Where a val shard's byte sidecar lives: fineweb_val_X.bin -> fineweb_val_bytes_X.bin, same folder."""
    folder, name = os.path.split(val_file)
    if not name.startswith("fineweb_val_"):
        return None
    return os.path.join(folder, "fineweb_val_bytes_" + name[len("fineweb_val_"):])


def load_validation_bytes(files: list[str], n_tokens: int, required_by: str | None) -> Tensor | None:
    """The byte sidecars of the val shards, concatenated and cut like load_validation_tokens (n_tokens positions), as
    int32; None when no val shard has one. Any sidecar present means all must be there, each as long as its shard.
    required_by names the reason a missing sidecar is an error (a CaseOps tokenizer), or is None."""
    build = ("build the validation data with its sidecars: python3 data/build_shards.py --caseops --tokenizer "
             "<the CaseOps .model> (data/README.md)")
    pairs = [(f, val_bytes_path(f)) for f in files]
    missing = [(f, b) for f, b in pairs if b is None or not os.path.isfile(b)]
    if len(missing) == len(pairs) and not required_by:
        return None
    if missing:
        f, b = missing[0]
        where = b or "fineweb_val_bytes_* (only a val shard named fineweb_val_* can have one)"
        raise SystemExit(f"data error: {len(missing)} of {len(pairs)} validation shards have no byte sidecar, e.g. "
                         f"{f} needs {where}. " + (f"{required_by}, so val_bpb needs them; " if required_by else "")
                         + build)
    counts = []
    for f, b in pairs:
        try:
            n, n_bytes = read_shard_header(f), read_shard_header(b)
        except ShardError as e:
            raise SystemExit(f"data error: {e}")
        if n != n_bytes:
            raise SystemExit(f"data error: byte sidecar {b} has {n_bytes} counts but {f} has {n} tokens: they were "
                             "not built together; " + build)
        counts.append(read_shard(b))
    return torch.from_numpy(np.concatenate(counts)[:n_tokens].astype(np.int32))


def train_sentencepiece(docs, model_prefix: str, vocab_size: int, **overrides) -> str:
    """The challenge's tokenizer recipe (SentencePiece BPE, byte fallback, nmt_nfkc, split digits, no dummy prefix)."""
    import sentencepiece as spm

    def sentences():
        for text in docs:
            text = text.replace("\x00", " ").strip()
            if text:
                yield text

    args = dict(model_type="bpe", vocab_size=vocab_size, character_coverage=0.999, byte_fallback=True,
                split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1,
                eos_id=2, unk_id=3, hard_vocab_limit=False, num_threads=os.cpu_count() or 1)
    args.update(overrides)
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_prefix=model_prefix, logstream=quiet, **args)
    return model_prefix + ".model"


class ShuffledSequenceLoader:
    """Random fixed-length windows, each drawn once per epoch; order seeded by SEED and rank.

    Each rank reads the shards rank::world (all shards when there are fewer shards than ranks). Every shard gets a
    random phase and a shuffled list of window starts; a window is taken from a shard chosen in proportion to the
    windows it has left, so the draw is uniform without replacement over all remaining windows.
    """

    def __init__(self, files: list[str], seq_len: int, seed: int, rank: int, world: int, device):
        self.files = files[rank::world] if len(files) >= world else list(files)
        self.seq_len, self.device = seq_len, device
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.tokens = [read_shard(f) for f in self.files]
        if all(len(t) < seq_len + 1 for t in self.tokens):
            raise SystemExit(f"data error: training shards {self.files} hold no window of TRAIN_SEQ_LEN+1={seq_len + 1} tokens")
        self.starts = [self._new_starts(t) for t in self.tokens]

    def _new_starts(self, tokens) -> list[int]:
        n, T = len(tokens), self.seq_len
        if n < T + 1:
            return []
        phase = int(self.rng.integers(0, min(T - 1, n - T - 1) + 1))
        starts = phase + T * np.arange((n - 1 - phase) // T)
        return self.rng.permutation(starts).tolist()

    def next_batch(self, num_seqs: int) -> tuple[Tensor, Tensor]:
        T = self.seq_len
        out = np.empty((num_seqs, T + 1), dtype=np.int64)
        for i in range(num_seqs):
            left = np.array([len(s) for s in self.starts], dtype=np.float64)
            if left.sum() == 0:
                self.starts = [self._new_starts(t) for t in self.tokens]
                left = np.array([len(s) for s in self.starts], dtype=np.float64)
            k = int(self.rng.choice(len(left), p=left / left.sum()))
            s = self.starts[k].pop()
            out[i] = self.tokens[k][s:s + T + 1]
        batch = torch.from_numpy(out)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def load_validation_tokens(files: list[str], seq_len: int) -> Tensor:
    """All val shards in order, cut to a whole number of sequences plus one (the last target's successor)."""
    tokens = np.concatenate([read_shard(f) for f in files])
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise SystemExit(f"data error: validation shards {files} hold {len(tokens)} tokens, fewer than EVAL_SEQ_LEN+1")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


SMOKE_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
               "an they you were her she all one there been their has would more will we when who no if out so said "
               "what up its about into than them can only other new some could time these two may then do first any "
               "my now such like our over man me even most made after also did many before must through back years "
               "where much your way well down should because each just those people how too little state good very "
               "make world still own see men work long get here between both life being under never day same another "
               "know while last might us great old year off come since against go came right used take three").split()


def make_smoke_data(root: str, vocab_size: int, seed: int = 0) -> tuple[str, str]:
    """Synthetic documents -> a small tokenizer and train/val shards under root. Idempotent."""
    root_p = Path(root)
    model = root_p / f"smoke_{vocab_size}.model"
    data = root_p / f"smoke_sp{vocab_size}"
    if model.exists() and (data / "fineweb_val_000000.bin").exists():
        return str(data), str(model)
    rng = random.Random(seed)
    # Zipf-weighted words in short sentences, with some digits, punctuation and non-ASCII for byte fallback.
    weights = [1.0 / (i + 1) for i in range(len(SMOKE_WORDS))]

    def doc():
        sents = []
        for _ in range(rng.randint(2, 12)):
            words = rng.choices(SMOKE_WORDS, weights, k=rng.randint(4, 14))
            if rng.random() < 0.2:
                words.append(str(rng.randint(0, 9999)))
            if rng.random() < 0.05:
                words.append(rng.choice(["café", "naïve", "Zürich", "東京", "π≈3.14"]))
            sents.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        return " ".join(sents)

    docs = [doc() for _ in range(3000)]
    root_p.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(docs[:1500], str(root_p / f"smoke_{vocab_size}"), vocab_size, num_threads=1)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    encoded = [[1] + ids for ids in sp.encode(docs)]
    val = np.concatenate(encoded[:150])
    train = np.concatenate(encoded[150:])
    half = len(train) // 2
    write_shard(data / "fineweb_train_000000.bin", train[:half])
    write_shard(data / "fineweb_train_000001.bin", train[half:])
    write_shard(data / "fineweb_val_000000.bin", val)
    return str(data), str(model)


# -----------------------------------------------------------------------------------------------------
# Code size: the challenge counts the bytes of train_gpt.py; submissions ship it LZMA-compressed, base85-wrapped.
# -----------------------------------------------------------------------------------------------------

WRAPPER_PREFIX = "import lzma as L,base64 as B,linecache as C\n"


class _PortableFStrings(ast.NodeTransformer):
    """f-strings with quotes inside their replacement fields (f"{d['k']}") become "".join([...]) of format() calls:
    Python >= 3.12 unparses them reusing the outer quote, which Python 3.10 and 3.11 cannot parse."""

    def visit_JoinedStr(self, node):
        if not any(isinstance(n, ast.JoinedStr) or isinstance(n, ast.Constant) and isinstance(n.value, str)
                   for v in node.values if isinstance(v, ast.FormattedValue) for n in ast.walk(v.value)):
            return self.generic_visit(node)  # its nested format specs are checked with it: they are its values
        return self.generic_visit(self._as_join(node))

    @classmethod
    def _as_join(cls, node: ast.JoinedStr) -> ast.expr:
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue):  # f"{x!r:>5}" == format(repr(x), ">5")
                value = v.value
                if v.conversion != -1:
                    value = ast.Call(ast.Name({115: "str", 114: "repr", 97: "ascii"}[v.conversion]), [value], [])
                spec = cls._as_join(v.format_spec) if v.format_spec else ast.Constant("")
                v = ast.Call(ast.Name("format"), [value, spec], [])
            parts.append(v)
        return ast.Call(ast.Attribute(ast.Constant(""), "join"), [ast.List(parts)], [])


def minify_source(src: str) -> str:
    """Drop comments, docstrings and formatting by a round trip through the AST (no third-party minifier). The output
    parses on Python 3.10 whichever Python makes it (_PortableFStrings)."""
    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(ast.fix_missing_locations(_PortableFStrings().visit(tree))) + "\n"


def wrap_source(src: str) -> str:
    """Two-line self-extracting script: base85 of a raw LZMA2 stream of the minified source.

    The source is entered in linecache under a made-up file name (mtime None: never checked against a file) and
    compiled under that name, so that inspect.getsource works on its functions, as @triton.jit needs (+96 bytes).
    exec() runs it in the wrapper's own namespace, so __name__ is "__main__" when the wrapper runs as a script.
    """
    payload = lzma.compress(minify_source(src).encode(), format=lzma.FORMAT_RAW,
                            filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    return (WRAPPER_PREFIX + 's=L.decompress(B.b85decode("' + base64.b85encode(payload).decode()
            + '"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]).decode();n="<wrapped>"'
            + ';C.cache[n]=0,None,s.splitlines(1),n;exec(compile(s,n,"exec"))\n')


def unwrap_source(wrapped: str) -> str:
    encoded = wrapped.split('b85decode("', 1)[1].split('")', 1)[0]
    return lzma.decompress(base64.b85decode(encoded), format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2}]).decode()


def counted_code_bytes(script_path: str) -> tuple[int, str]:
    """Bytes of code as the challenge counts them: the file itself if already wrapped, else its wrapped form."""
    src = Path(script_path).read_text(encoding="utf-8")
    if src.startswith(WRAPPER_PREFIX):
        return len(src.encode()), "wrapped file"
    return len(wrap_source(src).encode()), "LZMA-wrapped minified source"


# =====================================================================================================
# 3. Model
# =====================================================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def scaled_rms_norm(x: Tensor, scale: Tensor) -> Tensor:
    """rms_norm(x)·scale (a block's ln_scale). The product in fp32, then rounded once, as a Python-float factor is
    applied (a bf16 multiply would round the factor itself to bf16)."""
    return (rms_norm(x).float() * scale).to(x.dtype)


class RMSNorm(nn.Module):
    """Weightless RMSNorm; a module (not a function) so that GPTQ calibration can hook the final norm's output."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


class CastedLinear(nn.Linear):
    """fp32 master weight, matmul in the activation dtype (bf16 under autocast). No bias anywhere in the model."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """Partial RoPE on the first `dims` channels of each head, half-split pairing.

    The cos/sin tables are buffers built once for `max_len` positions, so fresh model copies (the TTT model, the
    dequantized model) compile to the same graph as the training model.
    """

    def __init__(self, dims: int, base: float, max_len: int):
        super().__init__()
        self.dims = dims
        inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float32) / dims)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, H, D]
        T = x.size(1)
        cos, sin = self.cos[:, :T].to(x.dtype), self.sin[:, :T].to(x.dtype)
        half = self.dims // 2
        a, b, rest = x[..., :half], x[..., half:self.dims], x[..., self.dims:]
        return torch.cat((a * cos + b * sin, b * cos - a * sin, rest), dim=-1)


SDPA_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}  # in order of preference when equally fast


def _pick_attention_backend() -> str:
    """FA3 if importable, else FA4 if importable on Hopper or newer; else on CUDA the fastest SDPA backend that does
    GQA natively (timed); 'math' on CPU."""
    if _fa3_importable():
        return "fa3"
    if not torch.cuda.is_available():
        return "sdpa_math"
    # FA4 is not in the timed race, which picked cuDNN over it: at the probe's size its per-call host work (Python)
    # outweighs its kernels, while in training the host runs ahead of the GPU. There its kernels take 20 ms less per
    # step than cuDNN's (H100, bench/profile_step.py: 717.9 vs 736.2 ms per step before looping, 1,085.8 vs 1,110.6
    # after).
    if _fa4_usable():
        return "fa4"
    # 16 rows: at 4 the timings were within noise and flash was picked on some runs, though at the training shape
    # (48 rows) cuDNN takes 2.40 ms per fwd+bwd and flash 3.43 (H100, bench/attention.py).
    q = torch.randn(16, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(16, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    timings = {}
    warnings.filterwarnings("ignore", message=".*kernel not used because.*")
    warnings.filterwarnings("ignore", message=".*(has been runtime disabled|same num_heads).*")
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                for i in range(13):
                    if i == 3:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
                torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - t0) / 10
        except RuntimeError:
            continue
    return min(timings, key=timings.get) if timings else "sdpa_math"


# FlashAttention-4 (PyPI flash-attn-4: CuTe DSL kernels, Hopper included), as custom ops so that torch.compile keeps a
# block one graph around it: its own autograd.Function would break the graph. Imported on first call.
def _fa4_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out [B, T, H, D], lse [B, H, T] fp32) of q [B, T, H, D], k, v [B, T, Hkv, D], each with a contiguous last
    dimension (fa4_causal)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    return out, lse


def _fa4_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # as the fake says, whatever the inputs' strides


@torch.library.custom_op("pgolf::fa4_causal", mutates_args=())
def _fa4_causal_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    kernel_warmup_wait()
    return _fa4_forward(q, k, v)


@_fa4_causal_op.register_fake
def _fa4_causal_fake(q, k, v):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.size(-1)), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("pgolf::fa4_causal_backward", mutates_args=())
def _fa4_causal_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _fa4_backward(dout, q, k, v, out, lse)


@_fa4_causal_backward_op.register_fake
def _fa4_causal_backward_fake(dout, q, k, v, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])  # the LSE is kept for the backward only


def _fa4_grad(ctx, dout, _dlse):
    return torch.ops.pgolf.fa4_causal_backward(dout.contiguous(), *ctx.saved_tensors)


_fa4_causal_op.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)


def fa4_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FA4 reads any 16-byte-aligned layout whose last dimension is contiguous: v stays a view of the block's fused
    q/k/v GEMM output instead of a copy (a kernel per call)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return torch.ops.pgolf.fa4_causal(q, k, v)[0]


def _fa3_importable() -> bool:
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError:
        return False
    return True


def _fa4_usable() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:  # its Ampere path has no backward
        return False
    # Its kernels compile on first use in each process (~20 s on an H100): keep them on disk for the next run.
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    # Found, not imported: the import takes seconds, and the trainer's first FA4 call does it (kernel_warmup_wait).
    spec = importlib.util.find_spec("flash_attn")
    return spec is not None and any(Path(p, "cute", "interface.py").is_file()
                                    for p in spec.submodule_search_locations or ())


ATTENTION_BACKENDS = ("auto", "fa3", "fa4", *SDPA_BACKENDS)  # what ATTENTION_BACKEND may name
ATTENTION_BACKEND = None  # chosen once per process by configure_attention()
DOC_ATTENTION_BACKEND = None  # likewise, for document-isolated training attention (DOC_ATTENTION below)
_FLEX_ATTENTION = None  # flex_attention, wrapped in torch.compile on CUDA by configure_attention


def configure_attention(backend: str | None = None, doc_backend: str | None = None) -> str:
    """Choose the dense backend (None or 'auto': pick one) and the document-isolated one; returns the dense one."""
    global ATTENTION_BACKEND, DOC_ATTENTION_BACKEND, _FLEX_ATTENTION
    if backend == "fa4" and not _fa4_usable():
        raise RuntimeError("ATTENTION_BACKEND=fa4 needs a Hopper or newer GPU and `import flash_attn.cute` to work "
                           "(pip install flash-attn-4: README, Dependencies); or use ATTENTION_BACKEND=auto")
    if backend in SDPA_BACKENDS and not torch.cuda.is_available():
        raise RuntimeError(f"ATTENTION_BACKEND={backend} needs CUDA; on CPU use ATTENTION_BACKEND=auto")
    if backend == "fa3" and not _fa3_importable():
        raise RuntimeError("ATTENTION_BACKEND=fa3 needs FlashAttention-3's flash_attn_interface, which did not import; "
                           "or use ATTENTION_BACKEND=auto")
    ATTENTION_BACKEND = _pick_attention_backend() if backend in (None, "auto") else backend
    DOC_ATTENTION_BACKEND = doc_backend or _pick_doc_attention_backend()
    if DOC_ATTENTION_BACKEND == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        # Eager flex materializes [B, H, T, T] scores; compiled it is one fused kernel, also inside the compiled model.
        _FLEX_ATTENTION = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    if DOC_ATTENTION_BACKEND == "varlen":
        _configure_torch_varlen()
    return ATTENTION_BACKEND


def causal_attention(q: Tensor, k: Tensor, v: Tensor, doc_mask=None, many_shapes: bool = False) -> Tensor:
    """q: [B, T, H, D]; k, v: [B, T, Hkv, D] -> [B, T, H, D]. GQA without materializing repeated K/V.

    With doc_mask (document_mask(ids) of this forward) a token attends only to earlier tokens of its own document.
    many_shapes (the LoRA adapter steps, thousands of (rows, length) shapes): FA4, which picks and compiles kernel
    variants by shape and was not measured there, gives way to SDPA (flash, by _lora_sdpa_context)."""
    if doc_mask is not None:
        return DOC_ATTENTION[DOC_ATTENTION_BACKEND][1](q, k, v, doc_mask)
    if ATTENTION_BACKEND == "fa3":
        import flash_attn_interface

        out = flash_attn_interface.flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if ATTENTION_BACKEND == "fa4" and not many_shapes:
        return fa4_causal(q, k, v)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return y.transpose(1, 2)


def sdpa_context():
    """Restrict SDPA to the chosen backend (no-op for FA3, FA4 and on CPU)."""
    backend = SDPA_BACKENDS.get(ATTENTION_BACKEND)
    return sdpa_kernel(backend) if backend is not None else nullcontext()


# --- document-isolated attention (training, DOC_ISOLATED_ATTN=1) --------------------------------------------------
# Training rows are windows cut from the token stream: a row holds the tail of one document, whole documents and the
# head of the next. Isolated, a token attends only to earlier tokens of its own document: a BOS-led segment of the
# row (the part before the row's first BOS counts as one). RoPE keeps the row positions; attention sees only position
# differences, so that is the same function as restarting them at each BOS. Evaluation stays dense causal.
# A backend is (build, attend): build(ids [B, T]) makes the mask once per forward and every layer's attend reuses it.
# Both run inside the compiled training graph, so every shape in them is fixed by (B, T).

BOS_ID = 1  # <s>: every document starts with it (ANCHORS 1.8); prepare_data checks that the tokenizer agrees
VARLEN_TOKENS_PER_SLOT = 128  # varlen: one sequence slot per this many tokens, on top of one per row
# On CUDA without FA3 the first of these that this torch has is used. bench/attention.py on an H100 (torch 2.11, 48
# rows of real training data, fwd+bwd per layer call): flex 3.34 ms + 0.29 ms mask build, torch varlen 4.27 ms with
# the fixed-length cu_seqlens (3.51 exact), dense cuDNN 2.40 ms. torch's varlen stays as the tested stand-in for FA3's.
DOC_GPU_BACKENDS = {"flex": "torch.nn.attention.flex_attention", "varlen": "torch.nn.attention.varlen"}


def document_ids(ids: Tensor) -> Tensor:
    """[B, T] -> the document index of every token within its row: the number of BOS tokens up to and including it."""
    return (ids == BOS_ID).cumsum(dim=1)


def sdpa_doc_mask(ids: Tensor) -> Tensor:
    """Boolean [B, 1, T, T]: query t may read key s (s <= t, same document). The CPU and reference path."""
    doc = document_ids(ids)
    causal = torch.ones(ids.size(1), ids.size(1), dtype=torch.bool, device=ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def sdpa_doc_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       enable_gqa=True)
    return y.transpose(1, 2)


def flex_doc_mask(ids: Tensor):
    """FlexAttention BlockMask: blocks wholly outside every document-causal region are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(ids)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    B, T = ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=ids.device)


def flex_doc_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    dtype = v.dtype  # flex does not autocast: give q and k the dtype of v (the projections' output dtype)
    y = _FLEX_ATTENTION(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.transpose(1, 2),
                        block_mask=block_mask, enable_gqa=True)
    return y.transpose(1, 2)


def varlen_cu_seqlens(ids: Tensor) -> Tensor:
    """Sequence boundaries of the flattened batch for varlen kernels: int32, ascending, B + B*T/128 + 1 entries.

    The length is fixed, so the compiled graph keeps its shapes: every row start, the first B*T/128 BOS positions
    inside rows, and B*T for the slots left over (empty sequences). A batch with more documents than slots (a mean
    document under 128 tokens) merges its last documents into their predecessors, never across a row, so no sequence
    exceeds T, the max_seqlen the kernels are given.
    """
    B, T = ids.shape
    n = B * T
    pos = torch.arange(n, device=ids.device)
    inner_bos = (ids.reshape(-1) == BOS_ID) & (pos % T != 0)
    first_bos = torch.where(inner_bos, pos, n).topk(n // VARLEN_TOKENS_PER_SLOT, largest=False).values
    return torch.cat((pos[::T], first_bos, pos.new_full((1,), n))).sort().values.to(torch.int32)


_VARLEN_KWARGS: dict = {}  # causal (and GQA) as this torch's varlen_attn spells them


def _configure_torch_varlen() -> None:
    """torch 2.9 says is_causal=True, 2.10+ window_size=(-1, 0). Its flash kernel takes fewer K/V heads natively;
    from 2.12 varlen_attn wants enable_gqa=True to allow it, before that it has no such argument."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    global _VARLEN_KWARGS
    params = inspect.signature(varlen_attn).parameters
    _VARLEN_KWARGS = dict(window_size=(-1, 0)) if "window_size" in params else dict(is_causal=True)
    if "enable_gqa" in params:
        _VARLEN_KWARGS["enable_gqa"] = True


def varlen_doc_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """The batch packed into one [B*T, heads, D] stream cut at cu_seqlens; causal within each sequence."""
    B, T, H, D = q.shape
    dtype = v.dtype
    q, k, v = (t.reshape(B * T, t.size(2), D).to(dtype) for t in (q, k, v))
    if DOC_ATTENTION_BACKEND == "fa3_varlen":
        import flash_attn_interface

        y = flash_attn_interface.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, T, T, causal=True)
        y = y[0] if isinstance(y, tuple) else y
    else:
        from torch.nn.attention.varlen import varlen_attn

        y = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, T, T, **_VARLEN_KWARGS)
    return y.view(B, T, H, D)


DOC_ATTENTION = {  # name -> (build mask from ids, attend)
    "fa3_varlen": (varlen_cu_seqlens, varlen_doc_attention),
    "varlen": (varlen_cu_seqlens, varlen_doc_attention),
    "flex": (flex_doc_mask, flex_doc_attention),
    "sdpa_mask": (sdpa_doc_mask, sdpa_doc_attention),
}


def _pick_doc_attention_backend() -> str:
    """FA3's varlen kernel with FA3; on CUDA the first of DOC_GPU_BACKENDS this torch has; SDPA with a mask else."""
    if ATTENTION_BACKEND == "fa3":
        import flash_attn_interface

        if hasattr(flash_attn_interface, "flash_attn_varlen_func"):
            return "fa3_varlen"
    if torch.cuda.is_available():
        for name, module in DOC_GPU_BACKENDS.items():
            try:
                __import__(module)
                return name
            except ImportError:
                continue
    return "sdpa_mask"


def document_mask(ids: Tensor):
    """The chosen backend's document-causal mask for a batch of rows, to pass to every causal_attention call."""
    return DOC_ATTENTION[DOC_ATTENTION_BACKEND][0](ids)


ATTN_GATE_WINDOW = 12  # the sparse gate reads this many leading channels of the attention input (#1787)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output y [B, T, H, D] its component along the token's own value v [B, T, Hkv, D]
    (shared by the heads of a GQA group): y - (y·v / |v|²) v.

    The value is broadcast to every head, so both reductions run over the same rows and compile to one kernel with
    the subtraction (forward and backward); normalizing v first compiled to three, ~0.24 ms more per block call at
    the training shape on an H100 (bench/block.py). The |v|² floor is F.normalize's eps, squared.
    """
    B, T, H, D = y.shape
    Hkv = v.size(2)
    yg = y.reshape(B, T, Hkv, H // Hkv, D).float()
    vg = v.unsqueeze(3).expand(B, T, Hkv, H // Hkv, D).float()
    coef = (yg * vg).sum(-1, keepdim=True) / (vg * vg).sum(-1, keepdim=True).clamp_min(1e-24)
    return (yg - coef * vg).to(y.dtype).view(B, T, H, D)


def scaled(x: Tensor, scale: Tensor | None) -> Tensor:
    return x if scale is None else scale.to(x.dtype) * x


def scaled_weight(linear: nn.Linear, scale: Tensor | None) -> Tensor:
    return linear.weight if scale is None else scale[:, None] * linear.weight


def scaled_projection(linear: nn.Linear, x: Tensor, scale: Tensor | None, fold: bool) -> Tensor:
    """scale ⊙ linear(x) (no bias). Folded, one GEMM with diag(scale)·W: the same function, with one rounding fewer,
    and scale's gradient comes from the small weight gradient instead of a reduction over every token (a kernel per
    block call that read two activations). Not folded while GPTQ calibration hooks the module's call."""
    if fold:
        return F.linear(x, scaled_weight(linear, scale).to(x.dtype))
    return scaled(linear(x), scale)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_dims: int, rope_base: float,
                 qk_gain_init: float, xsa: bool, max_len: int, gate: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(rope_dims, rope_base, max_len)
        self.xsa = xsa
        # Sparse head-output gate: g[t, h] = sigmoid(<W_h, u_t[:12]>); zeros make every gate 0.5 at the start.
        self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, ATTN_GATE_WINDOW)) if gate else None

    def forward(self, u: Tensor, doc_mask=None, lora=None, qkv=None, out_scale=None, fold: bool = False,
                gate_in: Tensor | None = None) -> Tensor:
        """qkv: the c_q, c_k, c_v outputs for u when the caller computed them (the block's fused GEMM). out_scale:
        the block's attn_scale, applied to the output (folded into proj's weight with fold: scaled_projection).
        gate_in: a copy of u's first ATTN_GATE_WINDOW channels for the sparse gate (BlockEntry), else it reads u's."""
        B, T, _ = u.shape
        q, k, v = qkv if qkv is not None else (self.c_q(u), self.c_k(u), self.c_v(u))
        if lora is not None:  # test-time LoRA (section 7): per-sequence low-rank corrections, all read from u
            q, k, v = q + lora("q", u), k + lora("k", u), v + lora("v", u)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))  # QK-norm, then partial RoPE
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, doc_mask, many_shapes=lora is not None)
        if self.xsa:
            y = exclusive_self_attention(y, v)
        if self.attn_gate_w is not None:
            gate_in = u[..., :ATTN_GATE_WINDOW] if gate_in is None else gate_in
            gate = torch.sigmoid(F.linear(gate_in, self.attn_gate_w.to(u.dtype)))
            y = y * gate.to(y.dtype)[..., None]
        out = scaled_projection(self.proj, y.reshape(B, T, -1), out_scale, fold)
        return out if lora is None else out + scaled(lora("o", u), out_scale)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, fused: bool = False):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim)
        self.fused = fused

    def runs_fused(self, u: Tensor, lora=None) -> bool:
        aligned = u.size(-1) % 8 == 0 and self.fc.weight.size(0) % 8 == 0  # TMA rows start on 16-byte boundaries
        return self.fused and aligned and fused_step(u, lora, tma=True)

    def forward(self, u: Tensor, lora=None, fc_out=None, out_scale=None, fold: bool = False) -> Tensor:
        """out_scale (the block's mlp_scale) and fold: as in Attention.forward. The fused kernels always fold: they
        take the weights, not the modules."""
        if fc_out is None and self.runs_fused(u, lora):
            return leaky_relu_sq_mlp(u, self.fc.weight.to(u.dtype), scaled_weight(self.proj, out_scale).to(u.dtype))
        h = F.leaky_relu(self.fc(u) if fc_out is None else fc_out, 0.5).square()
        out = scaled_projection(self.proj, h, out_scale, fold)
        return out if lora is None else out + scaled(lora("mlp", u), out_scale)


class Entry(NamedTuple):
    """A block's entry (Block._enter)."""
    x: Tensor  # x_in: the residual stream the block starts from
    u: Tensor  # its normalized copy, attention's input
    u_mlp: Tensor  # u for a parallel block's MLP: u again (split_u) or u
    gate_in: Tensor | None  # the attention gate's copy of u's first channels (fused path)
    x0: Tensor  # x0 for the next block
    passed: Tensor | None  # the block's input x again (pass_x), for the U-Net skip it is


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        dim = hp.model_dim
        self.attn = Attention(dim, hp.num_heads, hp.num_kv_heads, hp.rope_dims, hp.rope_base, hp.qk_gain_init,
                              xsa=layer >= hp.num_layers - hp.xsa_last_n,
                              max_len=max(hp.train_seq_len, hp.eval_seq_len), gate=bool(hp.sparse_attn_gate_enabled))
        self.mlp = MLP(dim, int(hp.mlp_mult * dim), fused=bool(hp.fused_mlp))
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # A buffer, not a Python float: a float would be a constant of the compiled graph, so every layer would
        # compile its own; a tensor is a graph input. Not persistent: the state dict and the artifact are unchanged.
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(layer + 1)), persistent=False)
        self.parallel = 0 <= hp.parallel_residual_start <= layer  # structural: one compiled graph per value
        # Off while GPTQ calibration hooks each linear's input: then every linear is called as its module, neither
        # sharing a GEMM (_input_projections) nor with a branch scale folded in (scaled_projection).
        self.fused_linears = True

    def _input_projections(self, u: Tensor, linears: tuple) -> list[Tensor]:
        """The outputs of linears that read the same input u, as one GEMM: c_q, c_k, c_v (and, in a parallel block,
        fc). Also one GEMM for u's gradient, which otherwise sums one per linear. At the training shape on an H100
        (bench/block.py), forward + backward: 0.11-0.24 ms less per parallel block call over three runs, 0.04-0.08 ms
        per sequential one (at the noise; kept so that both kinds take one path)."""
        out = F.linear(u, torch.cat([m.weight for m in linears]).to(u.dtype))
        return out.split([m.weight.size(0) for m in linears], dim=-1)

    def _enter(self, x: Tensor, x0: Tensor, skip: tuple, lora, pass_x: bool, split_u: bool) -> Entry:
        """block_entry, with the fused backward (BlockEntry) in the steps that take the fused kernels (fused_step)."""
        if fused_step(x, lora):
            gate_cols = ATTN_GATE_WINDOW if self.attn.attn_gate_w is not None else 0
            x_in, u, gate_in, x0, *again = BlockEntry.apply(x, x0, self.resid_mix, self.ln_scale, gate_cols, pass_x,
                                                            split_u, *skip)
            return Entry(x_in, u, again[-1] if split_u else u, gate_in if gate_cols else None, x0,
                         again[0] if pass_x else None)
        x_in, u = block_entry(x, x0, self.resid_mix, self.ln_scale, *skip)
        return Entry(x_in, u, u, None, x0, x.view_as(x) if pass_x else None)

    def forward(self, x: Tensor, x0: Tensor, doc_mask=None, lora=None, skip: tuple = (),
                pass_x: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(output, x0 for the next block, x again with pass_x or None: see BlockEntry). skip: (encoder output, gate,
        weight) for a decoder block that mixes in a U-Net skip first."""
        mlp_fused = self.mlp.runs_fused(x, lora)
        e = self._enter(x, x0, skip, lora, pass_x, split_u=self.parallel and mlp_fused)
        fc_shares_gemm = self.parallel and not mlp_fused  # the fused MLP does its own fc
        fused = None
        if self.fused_linears:
            fused = self._input_projections(e.u, (self.attn.c_q, self.attn.c_k, self.attn.c_v)
                                            + ((self.mlp.fc,) if fc_shares_gemm else ()))
        fold = self.fused_linears  # the branch scales into the output projections
        x_attn = e.x + self.attn(e.u, doc_mask, lora, None if fused is None else fused[:3], self.attn_scale, fold,
                                 e.gate_in)
        if self.parallel:  # GPT-J style: attention and MLP read the same normalized input
            fc_out = fused[3] if fused is not None and fc_shares_gemm else None
            return x_attn + self.mlp(e.u_mlp, lora, fc_out, self.mlp_scale, fold), e.x0, e.passed
        out = x_attn + self.mlp(scaled_rms_norm(x_attn, self.ln_scale), lora, None, self.mlp_scale, fold)
        return out, e.x0, e.passed


def layer_schedule(num_layers: int, loop_start: int, loop_end: int, num_loops: int, looping: bool):
    """(encoder, decoder) physical-layer lists: the virtual depth order split in half (floor)."""
    order = list(range(num_layers))
    if looping and num_loops > 0:
        segment = list(range(loop_start, loop_end + 1))
        order = order[:loop_start] + segment * (num_loops + 1) + order[loop_end + 1:]
    half = len(order) // 2
    return order[:half], order[half:]


# -----------------------------------------------------------------------------------------------------
# Fused softcapped cross-entropy (Triton, training loss only; record #1787). With c the softcap and s = sigmoid(2z/c),
# w = 2c·s equals c·tanh(z/c) + c, and a constant shift leaves softmax and CE unchanged. Forward: one program per row
# streams z over the vocabulary with an online max/sum-exp -> LSE; loss = LSE - w[target]. Backward recomputes s:
# dz = g·(softmax(w) - onehot)·dw/dz, dw/dz = 2c·s(1-s)·(2/c) = 4s(1-s). So z (bf16) is read once per pass and
# neither the softcapped logits nor an fp32 copy of z ([N, V], 3 GB per micro-batch at V = 8192) is materialized.
# -----------------------------------------------------------------------------------------------------

try:  # optional: where Triton is missing (CPU machines, CI) the training loss takes the eager path
    import triton
    import triton.language as tl
except ImportError:
    triton = None
TensorDescriptor = None  # host-side TMA descriptors (Triton >= 3.4) for the fused MLP; without them: the module path
if triton is not None:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        pass

# Vocabulary columns per step of a row's loop and warps per row. H100, [98304, 8192] bf16 (bench/fused_ce.py sweep):
# 2048/4 takes 1.039 ms forward and 2.203 forward+backward, #1787's 1024/4 1.123 and 2.260.
FUSED_CE_BLOCK, FUSED_CE_WARPS = 2048, 4
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter: tests run the kernels


def sm_count(device: torch.device, interpreter: int) -> int:
    """Streaming multiprocessors of a CUDA device, for persistent kernels' grids; `interpreter` on the CPU (Triton's
    interpreter: a few programs, so that each makes several passes)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else interpreter


def fused_kernels_supported(device: torch.device, tma: bool = False) -> bool:
    """Triton kernels run on `device`: CUDA, or the CPU under Triton's interpreter. tma: the kernel also needs
    Triton's TMA descriptors (the fused MLP)."""
    return (triton is not None and (device.type == "cuda" or (TRITON_INTERPRET and device.type == "cpu"))
            and (TensorDescriptor is not None or not tma))


def fused_step(x: Tensor, lora=None, tma: bool = False) -> bool:
    """Steps with gradients (training, and the SGD steps of TTT) take the fused kernels of the block entry and the MLP;
    no-grad scoring, GPTQ calibration (no_grad: its hooks need the linears) and the LoRA adapter steps (whose varying
    shapes would each compile the kernels) do not. Not the train/eval flag: it is no graph guard (a training step may
    follow a validation that left the model in eval mode), whereas grad mode always is one."""
    return lora is None and torch.is_grad_enabled() and fused_kernels_supported(x.device, tma)


if triton is not None:

    @triton.jit
    def _softcap_ce_fwd_kernel(z_ptr, tgt_ptr, loss_ptr, lse_ptr, cap, row_stride,
                               V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * row_stride
        m = float("-inf")
        total = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            w = tl.where(cols < V, 2.0 * cap * tl.sigmoid(z * (2.0 / cap)), float("-inf"))
            m_new = tl.maximum(m, tl.max(w, axis=0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(w - m_new), axis=0)
            m = m_new
        lse = m + tl.log(total)
        z_tgt = tl.load(z_row + tl.load(tgt_ptr + row)).to(tl.float32)
        tl.store(loss_ptr + row, lse - 2.0 * cap * tl.sigmoid(z_tgt * (2.0 / cap)))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _softcap_ce_bwd_kernel(z_ptr, tgt_ptr, lse_ptr, g_ptr, dz_ptr, cap, row_stride,
                               V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row, dz_row = z_ptr + row * row_stride, dz_ptr + row * row_stride
        tgt, lse, g = tl.load(tgt_ptr + row), tl.load(lse_ptr + row), tl.load(g_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            s = tl.sigmoid(z * (2.0 / cap))
            dw = tl.exp(2.0 * cap * s - lse) - tl.where(cols == tgt, 1.0, 0.0)
            tl.store(dz_row + cols, (g * dw * 4.0 * s * (1.0 - s)).to(dz_ptr.dtype.element_ty), mask=cols < V)

    def _fused_ce_launch(kernel, z: Tensor, *args) -> None:
        """One program per row of z. V is a compile-time constant (one vocabulary per run): the loop bounds are known
        and Triton's CPU interpreter needs it so with NumPy >= 2.4."""
        V = z.size(1)
        kernel[(z.size(0),)](z, *args, z.stride(0), V, BLOCK=min(FUSED_CE_BLOCK, triton.next_power_of_2(V)),
                             num_warps=FUSED_CE_WARPS)

    # Custom ops (opaque to torch.compile, which traces them through the fake implementations). Loading the script
    # twice in one process re-registers them; torch.library replaces the earlier definition.
    @torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
    def _softcap_ce_op(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
        """Per-row (loss, logsumexp) in fp32. z: [N, V] pre-softcap logits (bf16 or fp32); targets: [N] in [0, V)."""
        kernel_warmup_wait()
        z, targets = z.contiguous(), targets.contiguous()
        loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        if z.numel():
            _fused_ce_launch(_softcap_ce_fwd_kernel, z, targets, loss, lse, cap)
        return loss, lse

    @_softcap_ce_op.register_fake
    def _softcap_ce_fake(z, targets, cap):
        return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)

    @torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=())
    def _softcap_ce_backward_op(z: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, cap: float) -> Tensor:
        """dz (dtype of z) for per-row loss gradients `grad`."""
        z = z.contiguous()
        dz = torch.empty_like(z)
        if z.numel():
            _fused_ce_launch(_softcap_ce_bwd_kernel, z, targets.contiguous(), lse.contiguous(),
                             grad.float().contiguous(), dz, cap)
        return dz

    @_softcap_ce_backward_op.register_fake
    def _softcap_ce_backward_fake(z, targets, lse, grad, cap):
        return torch.empty_like(z)

    def _softcap_ce_setup_context(ctx, inputs, output):
        z, targets, cap = inputs
        ctx.save_for_backward(z, targets, output[1])
        ctx.mark_non_differentiable(output[1])  # the LSE is kept for the backward only
        ctx.cap = cap

    def _softcap_ce_grad(ctx, grad_loss, grad_lse):
        z, targets, lse = ctx.saved_tensors
        return torch.ops.pgolf.softcap_ce_backward(z, targets, lse, grad_loss, ctx.cap), None, None

    _softcap_ce_op.register_autograd(_softcap_ce_grad, setup_context=_softcap_ce_setup_context)


def softcap_cross_entropy(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-row CE of softmax(cap·tanh(z/cap)) by the fused kernels (needs fused_kernels_supported(z.device))."""
    return torch.ops.pgolf.softcap_ce(z, targets, cap)[0]


# -----------------------------------------------------------------------------------------------------
# Fused LeakyReLU² MLP (Triton, training only; record #1787 fuses the same two places). The activation is memory-bound:
# unfused, the up-projection writes pre = u·W_fcᵀ [N, 2048] and a kernel reads it back to write post = leaky(pre)²;
# backward, the down-projection's input-gradient GEMM writes d post and a kernel reads it and pre to write d pre (and
# post again, for W_proj's gradient). Here the up-projection GEMM writes pre and post from its accumulator, and the
# d post GEMM multiplies by d post/d pre = 2·pre (pre > 0) or 0.5·pre (pre <= 0), reading pre, before it writes d pre.
# Post is kept for the backward instead of recomputed (+0.4 GB of activations per layer call at 98,304 tokens).
# The other three GEMMs stay cuBLAS. Every step with gradients runs it (training, score-first TTT, LoRA TTT's global
# phases); no-grad scoring, GPTQ calibration (its hooks need the linears) and the LoRA adapter steps take the module
# path.
# -----------------------------------------------------------------------------------------------------

# Tile (rows, columns, depth), L2 grouping of row tiles, warps and pipeline stages of both GEMMs. H100, u [98304, 512],
# hidden 2048 (bench/fused_mlp.py sweep, ms up / d pre GEMM): 128x256x64, 8 warps, 4 stages 0.478 / 0.569; 3 stages
# 0.561 / 0.633; non-persistent 0.530 / 0.590; cuBLAS's bare GEMM (no epilogue) 0.354 / 0.346.
FUSED_MLP_TILES = dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4)

if TensorDescriptor is not None:
    @triton.jit
    def _mlp_gemm_kernel(a_desc, b_desc, out_ptr, act_ptr, M, N: tl.constexpr, K: tl.constexpr, UP: tl.constexpr,
                         UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, TILES_EACH: tl.constexpr):
        """A [M, K] times W_fcᵀ (UP; W_fc [N, K]) or W_proj [K, N], then the activation epilogue. UP: out = pre and
        act = leaky(pre)², from pre rounded to out's dtype as the module path rounds it. Else act holds pre and
        out = acc·d post/d pre.

        Persistent: PROGRAMS programs (one per SM) take every PROGRAMS-th output tile, and the flattened loop lets the
        compiler issue the next tile's TMA loads during this tile's epilogue. Loop counts are compile-time constants
        (Triton's CPU interpreter needs them so with NumPy >= 2.4), so every program makes TILES_EACH passes; a pass
        past the last tile redoes it, writing the same values, in the otherwise idle last wave."""
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        group = GROUP_M * tiles_n  # GROUP_M row tiles sweep all column tiles while their A rows sit in L2
        for i in tl.range(0, TILES_EACH, flatten=True):
            tile = tl.minimum(tl.program_id(0) + i * PROGRAMS, tiles_m * tiles_n - 1)
            first_m = (tile // group) * GROUP_M
            group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
            pid_m = first_m + (tile % group) % group_rows
            pid_n = (tile % group) // group_rows
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                a_tile = a_desc.load([pid_m * BM, k])
                b_tile = b_desc.load([pid_n * BN, k]).T if UP else b_desc.load([k, pid_n * BN])
                if UPCAST:  # Triton's CPU interpreter multiplies bf16 tiles as raw integers; fp32 holds them exactly
                    a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
                acc = tl.dot(a_tile, b_tile, acc)
            rows = pid_m * BM + tl.arange(0, BM)
            cols = pid_n * BN + tl.arange(0, BN)
            offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
            inside = (rows[:, None] < M) & (cols[None, :] < N)
            if UP:
                pre = acc.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + offsets, pre, mask=inside)
                h = pre.to(tl.float32)
                h = tl.where(h > 0, h, 0.5 * h)
                tl.store(act_ptr + offsets, (h * h).to(act_ptr.dtype.element_ty), mask=inside)
            else:
                pre = tl.load(act_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                slope = tl.where(pre > 0, 2.0 * pre, 0.5 * pre)
                tl.store(out_ptr + offsets, (acc * slope).to(out_ptr.dtype.element_ty), mask=inside)

    def _mlp_gemm(a: Tensor, w: Tensor, out: Tensor, act: Tensor, up: bool) -> None:
        """out (and act) from a [M, K] and the weight as stored: W_fc [N, K] (up) or W_proj [K, N]."""
        cfg = FUSED_MLP_TILES
        (M, K), N, BM, BN, BK = a.shape, out.size(1), cfg["BM"], cfg["BN"], cfg["BK"]
        tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
        programs = min(sm_count(a.device, 4), tiles)
        _mlp_gemm_kernel[(programs,)](TensorDescriptor.from_tensor(a, [BM, BK]),
                                      TensorDescriptor.from_tensor(w, [BN, BK] if up else [BK, BN]), out, act, M,
                                      N=N, K=K, UP=up, UPCAST=TRITON_INTERPRET, PROGRAMS=programs,
                                      TILES_EACH=triton.cdiv(tiles, programs), **cfg)

    @torch.library.custom_op("pgolf::leaky_relu_sq_mlp", mutates_args=())
    def _leaky_relu_sq_mlp_op(u: Tensor, w_fc: Tensor, w_proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(out, pre, post): out = leaky(u·w_fcᵀ)²·w_projᵀ for u [N, dim]; pre and post are kept for the backward."""
        kernel_warmup_wait()
        u = u.contiguous()
        pre = u.new_empty(u.size(0), w_fc.size(0))
        post = torch.empty_like(pre)
        if u.numel():
            _mlp_gemm(u, w_fc, pre, post, up=True)
        return post @ w_proj.t(), pre, post

    @_leaky_relu_sq_mlp_op.register_fake
    def _leaky_relu_sq_mlp_fake(u, w_fc, w_proj):
        pre = u.new_empty(u.size(0), w_fc.size(0))
        return u.new_empty(u.size(0), w_proj.size(0)), pre, torch.empty_like(pre)

    @torch.library.custom_op("pgolf::leaky_relu_sq_mlp_backward", mutates_args=())
    def _leaky_relu_sq_mlp_backward_op(grad: Tensor, u: Tensor, w_fc: Tensor, w_proj: Tensor, pre: Tensor,
                                       post: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(d u, d w_fc, d w_proj) for the output gradient `grad` [N, dim]."""
        grad = grad.contiguous()
        d_pre = torch.empty_like(pre)
        if grad.numel():
            _mlp_gemm(grad, w_proj, d_pre, pre, up=False)
        return d_pre @ w_fc, d_pre.t() @ u, grad.t() @ post

    @_leaky_relu_sq_mlp_backward_op.register_fake
    def _leaky_relu_sq_mlp_backward_fake(grad, u, w_fc, w_proj, pre, post):
        return torch.empty_like(u), torch.empty_like(w_fc), torch.empty_like(w_proj)

    def _leaky_relu_sq_mlp_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def _leaky_relu_sq_mlp_grad(ctx, grad_out, grad_pre, grad_post):
        return torch.ops.pgolf.leaky_relu_sq_mlp_backward(grad_out, *ctx.saved_tensors)

    _leaky_relu_sq_mlp_op.register_autograd(_leaky_relu_sq_mlp_grad, setup_context=_leaky_relu_sq_mlp_setup_context)


def leaky_relu_sq_mlp(u: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
    """MLP.forward's math by the fused kernels (needs fused_kernels_supported(u.device, tma=True)); weights in u's
    dtype."""
    return torch.ops.pgolf.leaky_relu_sq_mlp(u.reshape(-1, u.size(-1)), w_fc, w_proj)[0].view(*u.shape[:-1], -1)


# -----------------------------------------------------------------------------------------------------
# Fused block-entry backward (Triton, steps with gradients). A block enters through x_in = m0·x + m1·x0 (a decoder
# block with a U-Net skip first mixes x <- g·x + (1-g)·w·skip, g = sigmoid(gate)) and u = RMSNorm(x_in)·ln_scale.
# Inductor computes the input gradients in one kernel, but m0, m1, gate and w get sums over every token of products
# with the gradient that kernel wrote, so a second kernel reads it and the inputs again (and the first, a looped
# reduction, spilled x_in's fp32 normalization to memory and read it back). Here one kernel does all of it: each
# program takes every PROGRAMS-th block of ROWS rows, writes their input gradients and keeps the per-channel sums in
# registers, one row of partial sums per program. The forward stays inductor's (block_entry, traced by BlockEntry).
# -----------------------------------------------------------------------------------------------------

# Rows per block, warps, programs per SM and pipeline stages of the backward kernel, without / with a skip. H100, 98,304
# rows (bench/block_entry.py sweep, ms per call without / with a skip): these 0.323 / 0.460; one row block of 8 rows and
# 8 warps, 4 programs per SM, unpipelined 0.456 / 0.575; inductor's kernels took ~0.37 / ~0.57 (bench/profile_step.py).
BLOCK_ENTRY_TILES = {False: dict(ROWS=2, num_warps=4, PER_SM=4, STAGES=2),
                     True: dict(ROWS=4, num_warps=4, PER_SM=8, STAGES=2)}

if triton is not None:
    @triton.jit
    def _block_entry_bwd_kernel(g_in_ptr, g_u_ptr, g_gate_ptr, g_x0_ptr, g_pass_ptr, g_u2_ptr, x_ptr, x0_ptr,
                                skip_ptr, mix_ptr, ln_ptr, gate_ptr, weight_ptr, gx_ptr, gx0_ptr, gskip_ptr, sums_ptr,
                                n_rows, D: tl.constexpr, GATE_COLS: tl.constexpr, SKIP: tl.constexpr,
                                PASS_X: tl.constexpr, SPLIT_U: tl.constexpr, ROWS: tl.constexpr,
                                PROGRAMS: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr):
        """Gradients of block_entry for g_in (of x_in: the residual path) and g_u (of u; its first GATE_COLS columns
        also get g_gate, the gradient of the attention gate's copy of them, and with SPLIT_U all of them g_u2, the
        MLP's); x0's gradient also adds g_x0, the later blocks', and with PASS_X x's adds g_pass, a U-Net skip's
        (BlockEntry). Per-channel factors are rounded to the activations' dtype as the forward rounds them; the sums go
        to sums_ptr[program, (m0, m1[, gate, w]), D]."""
        cols = tl.arange(0, D)
        act = gx_ptr.dtype.element_ty
        m0 = tl.load(mix_ptr + cols).to(act).to(tl.float32)
        m1 = tl.load(mix_ptr + D + cols).to(act).to(tl.float32)
        ln = tl.load(ln_ptr)
        # Σ g·x, Σ g·x0 and Σ g·skip over rows, g the gradient of x_in: every per-channel gradient is a
        # combination of these with per-channel factors. Row-wise accumulators, summed over their rows once at the
        # end: a sum across rows every iteration would synchronize the warps each time.
        sum_x = tl.zeros([ROWS, D], dtype=tl.float32)
        sum_x0 = tl.zeros([ROWS, D], dtype=tl.float32)
        sum_skip = tl.zeros([ROWS, D], dtype=tl.float32)
        if SKIP:
            sig = tl.sigmoid(tl.load(gate_ptr + cols))
            g = sig.to(act).to(tl.float32)
            w = tl.load(weight_ptr + cols).to(act).to(tl.float32)
        for i in tl.range(0, ITERS, num_stages=STAGES):
            rows = (tl.program_id(0) + i * PROGRAMS) * ROWS + tl.arange(0, ROWS)
            inside = (rows < n_rows)[:, None]
            offsets = rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            x0 = tl.load(x0_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            if SKIP:
                skip = tl.load(skip_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                mixed = g * x + (1.0 - g) * (w * skip)
            else:
                mixed = x
            x_in = m0 * mixed + m1 * x0
            rstd = tl.rsqrt(tl.sum(x_in * x_in, 1) / D + 1.1920928955078125e-07)[:, None]  # F.rms_norm's fp32 eps
            x_hat = x_in * rstd
            g_u = tl.load(g_u_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            if SPLIT_U:
                g_u += tl.load(g_u2_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            if GATE_COLS > 0:
                gate_offsets = rows[:, None].to(tl.int64) * GATE_COLS + cols[None, :]
                g_u += tl.load(g_gate_ptr + gate_offsets, mask=inside & (cols < GATE_COLS)[None, :],
                               other=0.0).to(tl.float32)
            g_hat = g_u * ln
            g_x_in = tl.load(g_in_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            g_x_in += rstd * (g_hat - x_hat * (tl.sum(g_hat * x_hat, 1) / D)[:, None])
            sum_x += g_x_in * x
            sum_x0 += g_x_in * x0
            g_x0 = tl.load(g_x0_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(gx0_ptr + offsets, (m1 * g_x_in + g_x0).to(gx0_ptr.dtype.element_ty), mask=inside)
            g_mixed = m0 * g_x_in
            if SKIP:
                sum_skip += g_x_in * skip
                tl.store(gskip_ptr + offsets, ((1.0 - g) * w * g_mixed).to(gskip_ptr.dtype.element_ty), mask=inside)
                g_mixed = g * g_mixed
            if PASS_X:
                g_mixed += tl.load(g_pass_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(gx_ptr + offsets, g_mixed.to(gx_ptr.dtype.element_ty), mask=inside)
        sums = sums_ptr + tl.program_id(0) * (4 if SKIP else 2) * D + cols
        s_x, s_x0 = tl.sum(sum_x, 0), tl.sum(sum_x0, 0)
        tl.store(sums + D, s_x0)
        if SKIP:  # mixed = g·x + (1-g)·w·skip
            s_skip = tl.sum(sum_skip, 0)
            tl.store(sums, g * s_x + (1.0 - g) * w * s_skip)
            tl.store(sums + 2 * D, m0 * (s_x - w * s_skip) * sig * (1.0 - sig))
            tl.store(sums + 3 * D, m0 * (1.0 - g) * s_skip)
        else:
            tl.store(sums, s_x)

    @torch.library.custom_op("pgolf::block_entry_backward", mutates_args=())
    def _block_entry_backward_op(g_in: Tensor, g_u: Tensor, g_gate: Tensor, g_x0: Tensor, g_pass: Tensor | None,
                                 g_u2: Tensor | None, x: Tensor, x0: Tensor, mix: Tensor, ln: Tensor,
                                 skip: Tensor | None, gate: Tensor | None,
                                 weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(d x (plus g_pass), d x0 (this block's share plus g_x0), d skip, per-channel sums [2 or 4, D]: d mix, then
        d gate and d w with a skip). g_u2: a second gradient of u. Activations [..., D] in one dtype; d skip is empty
        without a skip."""
        D = x.size(-1)
        gx, gx0 = torch.empty_like(x), torch.empty_like(x0)
        gskip = torch.empty_like(skip) if skip is not None else x.new_empty(0)
        rows, cfg = x.numel() // D, BLOCK_ENTRY_TILES[skip is not None]
        blocks = triton.cdiv(rows, cfg["ROWS"])
        programs = max(1, min(blocks, cfg["PER_SM"] * sm_count(x.device, 1)))
        # Every program writes its row of sums; zeros only where no kernel runs, whose sums are then 0.
        sums = (torch.empty if rows else torch.zeros)(programs, 2 if skip is None else 4, D, device=x.device,
                                                      dtype=torch.float32)
        if rows:
            _block_entry_bwd_kernel[(programs,)](
                g_in.contiguous(), g_u.contiguous(), g_gate.contiguous(), g_x0.contiguous(),
                g_pass.contiguous() if g_pass is not None else x, g_u2.contiguous() if g_u2 is not None else x,
                x.contiguous(), x0.contiguous(), skip.contiguous() if skip is not None else x, mix, ln,
                gate if skip is not None else mix, weight if skip is not None else mix, gx, gx0, gskip, sums, rows,
                D=D, GATE_COLS=g_gate.size(-1), SKIP=skip is not None, PASS_X=g_pass is not None,
                SPLIT_U=g_u2 is not None, ROWS=cfg["ROWS"], PROGRAMS=programs, ITERS=triton.cdiv(blocks, programs),
                STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
        return gx, gx0, gskip, sums.sum(0)

    @_block_entry_backward_op.register_fake
    def _block_entry_backward_fake(g_in, g_u, g_gate, g_x0, g_pass, g_u2, x, x0, mix, ln, skip, gate, weight):
        return (torch.empty_like(x), torch.empty_like(x0),
                torch.empty_like(skip) if skip is not None else x.new_empty(0),
                x.new_empty(2 if skip is None else 4, x.size(-1), dtype=torch.float32))


def block_entry(x: Tensor, x0: Tensor, mix: Tensor, ln: Tensor, skip: Tensor | None = None,
                gate: Tensor | None = None, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x_in, u): the residual stream a block starts from and its normalized copy (ln: the block's ln_scale). With a
    U-Net skip (skip, gate, weight), the skip is mixed in first."""
    if skip is not None:
        x = mix_skip(x, skip, gate, weight)
    mix = mix.to(x.dtype)
    x = mix[0] * x + mix[1] * x0
    return x, scaled_rms_norm(x, ln)


class BlockEntry(torch.autograd.Function):
    """block_entry with its backward by the fused kernel. Also returns a copy of u's first `gate_cols` columns for the
    attention gate, so that their gradient reaches the kernel apart instead of as a sum written over all of u's, and
    x0 again (a view), for the next block: the later blocks' gradient of x0 then reaches this block's kernel, which
    adds it to its own, instead of autograd adding each block's in a kernel of its own (a bf16 add per block call).
    The same holds for x with pass_x (x again, for the U-Net skip that x is: an encoder block's input) and for u with
    split_u (u again, for a parallel block's MLP, which reads u beside attention)."""

    @staticmethod
    def forward(ctx, x, x0, mix, ln, gate_cols: int, pass_x: bool, split_u: bool, skip=None, gate=None, weight=None):
        ctx.save_for_backward(x, x0, mix, ln, *(() if skip is None else (skip, gate, weight)))
        ctx.pass_x, ctx.split_u = pass_x, split_u
        x_in, u = block_entry(x, x0, mix, ln, skip, gate, weight)
        again = ((x.view_as(x),) if pass_x else ()) + ((u.view_as(u),) if split_u else ())
        return x_in, u, u[..., :gate_cols].contiguous(), x0.view_as(x0), *again

    @staticmethod
    def backward(ctx, g_in, g_u, g_gate, g_x0, *g_again):
        x, x0, mix, ln, *skip = ctx.saved_tensors
        g_pass = g_again[0] if ctx.pass_x else None
        g_u2 = g_again[-1] if ctx.split_u else None
        gx, gx0, gskip, sums = torch.ops.pgolf.block_entry_backward(g_in, g_u, g_gate, g_x0, g_pass, g_u2, x, x0, mix,
                                                                    ln, *(skip or (None, None, None)))
        if not skip:
            return gx, gx0, sums.view_as(mix), None, None, None, None
        return gx, gx0, sums[:2], None, None, None, None, gskip, sums[2], sums[3]


# Compilation units. GPT.forward is made of these module-level functions, called through a Regions object: eagerly
# (EAGER_REGIONS: COMPILE=0, GPTQ calibration hooks, and inside the whole-model compile of COMPILE_SCOPE=model) or each
# compiled once for the process (COMPILE_SCOPE=blocks). Compiled, a Block runs the graph of its structure (sequential
# or parallel residual, with or without XSA: two structures in the default model, where both kinds of block have XSA;
# see Block's buffers), whatever the layer and whatever the schedule, so switching the depth loop on compiles nothing.
# The embedding (a gather and a norm) stays eager: nothing to fuse. A U-Net skip mix compiles into the graph of the
# block it feeds (run_block_after_skip), and the head + softcap + CE into one: eager they would materialize several
# full-size activations or fp32 logits.

COMPILE_BACKEND = "inductor"  # training compiles; tests put "aot_eager" or a counting backend here


def run_block(block: Block, x: Tensor, x0: Tensor, doc_mask=None, lora=None,
              pass_x: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    return block(x, x0, doc_mask, lora, (), pass_x)


def run_block_after_skip(block: Block, x: Tensor, skip: Tensor, gate: Tensor, weight: Tensor, x0: Tensor,
                         doc_mask=None, lora=None) -> tuple[Tensor, Tensor, None]:
    """A decoder block with the skip mix before it, as one graph: the mixed stream is never written out, and the mix's
    backward fuses into the block's (H100, bench/profile_step.py: kernels 7.2 / 17.4 ms less per step before / after
    looping than a graph of its own). Costs the compile of two more block structures, as the last decoder block gets
    no skip."""
    return block(x, x0, doc_mask, lora, (skip, gate, weight))


def mix_skip(x: Tensor, skip: Tensor, gate: Tensor, weight: Tensor) -> Tensor:
    """U-Net skip: a learned per-channel gate between the stream and the weighted encoder output."""
    g = torch.sigmoid(gate).to(x.dtype)
    return g * x + (1 - g) * (weight.to(x.dtype) * skip)


def head_loss(model: GPT, h: Tensor, targets: Tensor) -> Tensor:
    """Mean training CE. The fused kernels take z as produced (bf16 under autocast), never an fp32 copy."""
    z = model.pre_softcap_logits(h)
    if model.fused_ce and fused_kernels_supported(z.device):
        return softcap_cross_entropy(z.flatten(0, -2), targets.flatten(), model.softcap).mean()
    logits = model.softcap * torch.tanh(z.float() / model.softcap)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class Regions:
    """regions(fn) is fn itself (backend None) or fn compiled once for the process with `backend`: static shapes
    (training, evaluation), or dynamic ones (LoRA TTT: one graph for every row count >= 2 and window length).
    Modules are arguments, never closures, so every block and every model copy share the graphs."""

    def __init__(self, backend=None, dynamic: bool = False):
        self.backend, self.dynamic, self._compiled = backend, dynamic, {}

    def __call__(self, fn):
        if self.backend is None:
            return fn
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=self.dynamic, backend=self.backend)
        return self._compiled[fn]


EAGER_REGIONS = Regions()
_COMPILED_REGIONS: dict = {}

# Graphs of run_block (and of run_block_after_skip) in a full run: 2 block structures x 3 static shapes (training,
# no-grad eval, TTT batch) = 6 by default (up to 4 structures with XSA on some layers only), plus the LoRA TTT's
# dynamic ones (one code object, one cache), past dynamo's default limit of 8 per function, where it stops compiling
# the function; so the limit is raised, with room.
REGION_RECOMPILE_LIMIT = 64


def compiled_regions(backend, dynamic: bool = False) -> Regions:
    """The process-wide compiled regions for a backend: training and evaluation share their graphs."""
    if (backend, dynamic) not in _COMPILED_REGIONS:
        # cache_size_limit: the name every torch 2.x knows (newer ones alias it as recompile_limit)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, REGION_RECOMPILE_LIMIT)
        if dynamic:  # sizes that happen to be equal (64 rows, head_dim 64) must not become a guard and a recompile
            torch.fx.experimental._config.use_duck_shape = False
        _COMPILED_REGIONS[backend, dynamic] = Regions(backend, dynamic)
    return _COMPILED_REGIONS[backend, dynamic]


class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.softcap = hp.logit_softcap
        self.fused_ce = bool(hp.fused_ce)
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        self.blocks = nn.ModuleList(Block(hp, i) for i in range(hp.num_layers))
        self.final_norm = RMSNorm()
        sched = lambda looping: layer_schedule(hp.num_layers, hp.loop_start, hp.loop_end, hp.num_loops, looping)
        self.schedules = {False: sched(False), True: sched(True)}
        enc, dec = self.schedules[hp.num_loops > 0]
        num_skips = min(len(enc), len(dec))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, hp.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, hp.model_dim))
        self.looping = False
        self._init_weights(hp.tied_embed_init_std)

    @torch.no_grad()
    def _init_weights(self, embed_std: float):
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        for name, m in self.named_modules():
            if isinstance(m, CastedLinear):
                if name.endswith(".proj"):  # output projections start at zero: every block begins as identity
                    nn.init.zeros_(m.weight)
                elif min(m.weight.shape) >= 64:
                    nn.init.orthogonal_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=m.weight.size(1) ** -0.5)

    # isolate_docs: attention stops at BOS (training with DOC_ISOLATED_ATTN=1); evaluation passes False.
    # `lora` (test-time training, section 7; None everywhere else): lora.layer(k) is the adapter of virtual layer k
    # (each pass of a looped layer has its own), called as adapter(name, u) -> additive delta; lora.head(h) -> logits.
    def hidden(self, ids: Tensor, *, isolate_docs: bool = False, lora=None, regions: Regions = EAGER_REGIONS) -> Tensor:
        block, block_after_skip = regions(run_block), regions(run_block_after_skip)
        doc_mask = document_mask(ids) if isolate_docs else None  # built once, shared by every layer
        x0 = rms_norm(self.tok_emb(ids))
        # The views are free and keep the arguments of a region distinct objects: a compiled region guards on
        # `x is x0`, so the first block (x = x0) and the first skip (the last encoder output) would otherwise each
        # compile a graph of their own.
        x = x0.view_as(x0)
        encoder, decoder = self.schedules[self.looping]
        # The U-Net skip of an encoder output is the next encoder block's input passed through it (pass_x): its
        # gradient then adds in that block's backward kernel, not in a bf16 add of autograd's (0.08 ms per skip and
        # micro-batch on an H100). The first block's pass-through is unused; the last output enters the decoder.
        skips = []
        for k, i in enumerate(encoder):
            x, x0, passed = block(self.blocks[i], x, x0, doc_mask, None if lora is None else lora.layer(k), True)
            skips += [passed] if k else []
        skips.append(x.view_as(x))
        for k, i in enumerate(decoder):
            adapter = None if lora is None else lora.layer(len(encoder) + k)
            if k < self.skip_weights.size(0) and skips:
                x, x0, _ = block_after_skip(self.blocks[i], x, skips.pop(), self.skip_gates[k], self.skip_weights[k],
                                            x0, doc_mask, adapter)
            else:
                x, x0, _ = block(self.blocks[i], x, x0, doc_mask, adapter)
        return self.final_norm(x)

    def pre_softcap_logits(self, h: Tensor, lora=None) -> Tensor:
        z = F.linear(h, self.tok_emb.weight.to(h.dtype))  # tied head; bf16 under autocast
        return z if lora is None else z + lora.head(h)

    def logits(self, h: Tensor, lora=None) -> Tensor:
        return self.softcap * torch.tanh(self.pre_softcap_logits(h, lora).float() / self.softcap)

    def forward(self, ids: Tensor, targets: Tensor, isolate_docs: bool = False,
                regions: Regions = EAGER_REGIONS) -> Tensor:
        return regions(head_loss)(self, self.hidden(ids, isolate_docs=isolate_docs, regions=regions), targets)


CONTROL_PARAM_NAMES = ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "skip_gates", "attn_gate_w")


def build_model(hp: Hyperparameters, device) -> GPT:
    """bf16 embedding on CUDA (fp32 on CPU); fp32 linear weights and control tensors (they are small and
    sensitive). Initialized on one CPU thread, the same on every machine: at start-up, beside the compile workers and
    the kernel warm-up, MKL's threads spun for 11-17 s over the orthogonal inits (H100 host, 16 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = GPT(hp)
    finally:
        torch.set_num_threads(threads)
    model = model.to(device)
    model.tok_emb.weight.data = model.tok_emb.weight.data.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model


# =====================================================================================================
# 4. Optimizers
# =====================================================================================================

# Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = XX^T. Polar Express (#1787) uses one tuned (a, b, c) per
# iteration; further iterations repeat the last tuple. MUON_POLAR_EXPRESS=0 gives the records' fixed quintic.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int, polar_express: bool) -> Tensor:
    """Approximate orthogonal polar factor of each matrix in a batch [n, rows, cols], in bf16.

    Eager: each iteration is three batched GEMMs whose scalings and sums happen in cuBLAS's fp32 epilogue
    (baddbmm). Compiled, its four matrix shapes took 11.6 s of the compile warm-up on an H100, and it ran slower
    (2.5 vs 2.2 ms per optimizer step)."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] if polar_express else QUINTIC_COEFFS
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # aX + (bA + cA²)X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, MuonEq-R row normalization, batched Newton-Schulz and decoupled weight decay.

    Matrices of one shape form a param group. Each rank orthogonalizes a contiguous share of every group and one
    all-gather per group gives every rank every update, so the work is split without DDP-style duplication.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, backend_steps: int,
                 row_normalize: bool, polar_express: bool, rank: int = 0, world_size: int = 1):
        by_shape: dict = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        groups = [dict(params=ps) for ps in by_shape.values()]
        super().__init__(groups, dict(lr=lr, base_lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.row_normalize, self.polar_express = backend_steps, row_normalize, polar_express
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            share = -(-len(params) // self.world_size)
            mine = params[self.rank * share:(self.rank + 1) * share]
            rows, cols = params[0].shape
            local = torch.zeros(share, rows, cols, device=params[0].device, dtype=torch.bfloat16)
            if mine:
                grads = [p.grad for p in mine]
                bufs = []
                for p in mine:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(self.state[p]["momentum_buffer"])
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                U = torch.stack(torch._foreach_add(grads, bufs, alpha=mu))  # Nesterov
                if self.row_normalize:
                    U = U / U.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
                local[:len(mine)] = newton_schulz(U, self.backend_steps, self.polar_express)
            if self.world_size > 1:
                gathered = torch.empty(share * self.world_size, rows, cols, device=local.device, dtype=local.dtype)
                dist.all_gather_into_tensor(gathered, local)
            else:
                gathered = local
            updates = list(gathered[:len(params)].float().unbind(0))
            torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, updates, alpha=-lr * math.sqrt(max(1.0, rows / cols)))


def build_optimizers(model: GPT, hp: Hyperparameters, rank: int, world_size: int) -> list[torch.optim.Optimizer]:
    """Muon for the block matrices; AdamW for the tied embedding and for the small control tensors."""
    matrices, scalars = [], []
    for name, p in model.blocks.named_parameters():
        (matrices if p.ndim == 2 and not any(c in name for c in CONTROL_PARAM_NAMES) else scalars).append(p)
    scalars += [model.skip_weights, model.skip_gates]
    fused = next(model.parameters()).is_cuda
    adamw = torch.optim.AdamW(
        [dict(params=[model.tok_emb.weight], lr=hp.tied_embed_lr, base_lr=hp.tied_embed_lr, weight_decay=hp.embed_wd),
         dict(params=scalars, lr=hp.scalar_lr, base_lr=hp.scalar_lr, weight_decay=hp.adam_wd)],
        betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=fused)
    muon = Muon(matrices, lr=hp.matrix_lr, momentum=hp.muon_momentum_warmup_start, weight_decay=hp.muon_wd,
                backend_steps=hp.muon_backend_steps, row_normalize=bool(hp.muon_row_normalize),
                polar_express=bool(hp.muon_polar_express), rank=rank, world_size=world_size)
    return [adamw, muon]


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """Constant, then linear warm-down over the last WARMDOWN_FRAC of the budget to a floor of MIN_LR."""
    if frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / max(warmdown_frac, 1e-9), min_lr)


def muon_momentum_at(step: int, hp: Hyperparameters) -> float:
    f = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - f) * hp.muon_momentum_warmup_start + f * hp.muon_momentum


def ema_decay_at(step: int, decay: float) -> float:
    """Warmed-up EMA decay: averages over roughly the last tenth of the steps until it reaches EMA_DECAY.

    With a constant 0.9965 a 165-step run keeps 0.56 of its random initialization in the average; with the warm-up
    the initial weights' share after n steps is prod((1+t)/(10+t)) ~ 9!/n^9, negligible after a few dozen steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """fp32 shadow of the full state dict, updated after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.live = list(model.state_dict().values())
        self.shadow = [t.detach().float().clone() for t in self.live]

    @torch.no_grad()
    def update(self):
        d = ema_decay_at(self.steps, self.decay)
        torch._foreach_lerp_(self.shadow, [t.float() for t in self.live], 1.0 - d)
        self.steps += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for live, shadow in zip(model.state_dict().values(), self.shadow):
            live.copy_(shadow.to(live.dtype))


# =====================================================================================================
# 5. Training loop
# =====================================================================================================

@dataclasses.dataclass
class RunContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    log_path: str | None = None
    metrics_path: str | None = None
    counted_eval_seconds: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, msg: str = "", console: bool = True) -> None:
        """Rank 0 only; every line is flushed to the log file at once so a crash loses nothing."""
        if not self.is_main:
            return
        if console:
            print(msg, flush=True)
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    def metric(self, **record) -> None:
        if self.is_main and self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def all_reduce_max(ctx: RunContext, value: float) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], device=ctx.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def training_regions(hp: Hyperparameters) -> Regions:
    """COMPILE_SCOPE=blocks: the compiled regions (section 3). COMPILE=0 or COMPILE_SCOPE=model (the Trainer then
    compiles the whole model, which traces the eager regions into one graph per layer schedule): the eager ones."""
    if not hp.compile or hp.compile_scope != "blocks":
        return EAGER_REGIONS
    # DDP would otherwise split every region's graph at its gradient-bucket boundaries; the regions are small and
    # the reducer already overlaps each block's all-reduce with the backward of the blocks before it.
    torch._dynamo.config.optimize_ddp = False
    return compiled_regions(COMPILE_BACKEND)


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (all backends): the compile warm-up logs it."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def micro_batching(hp: Hyperparameters, world_size: int) -> tuple[int, int]:
    """(micro-batches per step, sequences per micro-batch): eight micro-batches over all GPUs keep the batch."""
    grad_accum = 8 // world_size
    return grad_accum, hp.train_batch_tokens // (world_size * grad_accum * hp.train_seq_len)


# --- kernel warm-up -----------------------------------------------------------------------------------------------
# FA4's kernels and the fused Triton ones compile on their first call, outside inductor: about 20 s of FA4 and seconds
# of Triton on a fresh H100, on the Python thread that also traces the model's graphs (on a thread of its own, FA4's
# share held the GIL: the model build beside it took 10-14 s instead of 1.1-1.6). Processes of their own compile them
# meanwhile, into the disk caches of FA4 and Triton, where the trainer's first calls find them: one process for FA4,
# one for the Triton kernels, as each has seconds of compiling on its one thread. The first kernel call waits for both.
_KERNEL_WARMUP = {}  # processes, output files and start time of start_kernel_warmup; then the report of the wait
KERNEL_WARMUP_PARTS = ("attention", "triton")
# A warm-up process runs `python3 -c KERNEL_WARMUP_CODE <this script's file, plain or LZMA-wrapped> <part> <device>`
KERNEL_WARMUP_CODE = ("import runpy, sys; "
                      "runpy.run_path(sys.argv[1], run_name='kernel_warmup')['warm_kernels'](*sys.argv[2:])")


def start_kernel_warmup(device: torch.device) -> None:
    """Start warm_kernels for each part, in a process of its own: this script's file, run under another module name."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; with an older one the warm-up's compiles are not found
    if knobs is not None:  # inductor points Triton at a cache of its own at its first graph: one cache for all
        os.environ.setdefault("TRITON_CACHE_DIR", knobs.cache.dir)
    for part in KERNEL_WARMUP_PARTS:
        out = tempfile.TemporaryFile()
        cmd = [sys.executable, "-c", KERNEL_WARMUP_CODE, os.path.abspath(__file__), part, str(device)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        atexit.register(proc.kill)  # a trainer that stops early (bad input) leaves none running; no-op once ended
        _KERNEL_WARMUP[part] = proc, out
    _KERNEL_WARMUP["t0"] = time.perf_counter()


def warm_kernels(part: str, device: str) -> None:
    """A warm-up process, with the trainer's settings (its environment) and a training micro-batch's shapes."""
    hp, device = load_hyperparameters(), torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # "cuda" is the first GPU in a fresh process
        torch.cuda.set_device(device)
    seqs = micro_batching(hp, int(os.environ.get("WORLD_SIZE", "1")))[1]
    (warm_attention if part == "attention" else warm_triton_kernels)(hp, device, seqs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sys.stdout.flush()
    os._exit(0)  # the caches are written; the interpreter's teardown (~1.5 s on an H100 host) would delay the trainer


def warm_attention(hp: Hyperparameters, device: torch.device, seqs: int) -> None:
    """FA4's forward and backward, if ATTENTION_BACKEND picks it (its kernels are chosen by shape, not by strides)."""
    if configure_attention(hp.attention_backend, "sdpa_mask") != "fa4":
        return
    D = hp.model_dim // hp.num_heads
    q = torch.zeros(seqs, hp.train_seq_len, hp.num_heads, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.zeros(seqs, hp.train_seq_len, hp.num_kv_heads, D, device=device, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    causal_attention(q, k, v).sum().backward()


def warm_triton_kernels(hp: Hyperparameters, device: torch.device, seqs: int) -> None:
    """One forward and backward of the model, eager, on random tokens, with SDPA attention (FA4 is the other part's)."""
    configure_attention("sdpa_flash" if device.type == "cuda" else "sdpa_math", "sdpa_mask")
    with device:  # initialized on the GPU: on the CPU it would take the cores from the trainer
        model = build_model(hp, device)
    ids = torch.randint(hp.vocab_size, (seqs, hp.train_seq_len + 1), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
        loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()


def kernel_warmup_wait() -> None:
    """Called by each kernel op: the first call waits for the warm-up processes, as it would compile their kernels."""
    if "t0" not in _KERNEL_WARMUP:
        return
    if ATTENTION_BACKEND == "fa4":  # the trainer's own import of FA4 (seconds) overlaps the warm-up's end
        import flash_attn.cute.interface  # noqa: F401
    t0 = time.perf_counter()
    report = dict(before=t0 - _KERNEL_WARMUP.pop("t0"), failed={})
    for part in KERNEL_WARMUP_PARTS:
        proc, out = _KERNEL_WARMUP.pop(part)
        if proc.wait() != 0:
            out.seek(0)
            report["failed"][part] = proc.returncode, out.read().decode(errors="replace").strip().splitlines()[-3:]
    _KERNEL_WARMUP["report"] = dict(report, waited=time.perf_counter() - t0)


def kernel_warmup_report() -> str | None:
    """A line for the log once the warm-up has been waited for; with the last output of a part that failed (harmless:
    the trainer then compiles those kernels itself)."""
    r = _KERNEL_WARMUP.get("report")
    if r is None:
        return None
    line = f"kernel_warmup: the first kernel call came {r['before']:.1f}s after its start and waited {r['waited']:.1f}s"
    for part, (rc, tail) in r["failed"].items():
        line += f"; WARNING: part {part} exited with {rc} (the trainer compiled its kernels itself): {' | '.join(tail)}"
    return line


class Trainer:
    """Owns the model, its compiled/DDP wrapper, the optimizers, the EMA and the data loader."""

    def __init__(self, hp: Hyperparameters, ctx: RunContext, model: GPT, train_files: list[str]):
        self.hp, self.ctx, self.model, self.train_files = hp, ctx, model, train_files
        self.grad_accum, self.micro_seqs = micro_batching(hp, ctx.world_size)
        compiled, self.regions = model, training_regions(hp)
        if hp.compile and hp.compile_scope == "model":
            compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            compiled = DDP(compiled, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                           broadcast_buffers=False)
        self.train_model = compiled
        self.optimizers = build_optimizers(model, hp, ctx.rank, ctx.world_size)
        self.all_params = list(model.parameters())
        self.new_loader()

    def new_loader(self):
        self.loader = ShuffledSequenceLoader(self.train_files, self.hp.train_seq_len, self.hp.seed, self.ctx.rank,
                                             self.ctx.world_size, self.ctx.device)
        self.batch_ahead = None  # the next micro-batch, drawn before it is needed (see step)

    def step(self, step: int, lr_mul: float, micro_batches: int | None = None) -> Tensor:
        """One optimizer step over grad_accum micro-batches (or `micro_batches`); returns the mean loss (on device,
        not synced)."""
        micro_batches = micro_batches or self.grad_accum
        total = torch.zeros((), device=self.ctx.device)
        for micro in range(micro_batches):
            ahead, self.batch_ahead = self.batch_ahead, None
            x, y = ahead if ahead is not None else self.loader.next_batch(self.micro_seqs)
            last = micro == micro_batches - 1
            sync_ctx = self.train_model.no_sync() if self.ctx.distributed and not last else nullcontext()
            with sync_ctx, self.ctx.autocast(), sdpa_context():
                loss = self.train_model(x, y, bool(self.hp.doc_isolated_attn), self.regions)
            (loss / micro_batches).backward()
            total += loss.detach()
        if self.hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.all_params, self.hp.grad_clip_norm)
        momentum = muon_momentum_at(step, self.hp)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
                if isinstance(opt, Muon):
                    group["momentum"] = momentum
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        # Drawn now, while the GPU still works through this step: drawn after the loss sync that ends a step, it left
        # the GPU idle ~2.3 ms per step on an H100 (bench/profile_step.py). The data order is the same.
        self.batch_ahead = self.loader.next_batch(self.micro_seqs)
        return total / micro_batches

    def compile_warmup(self) -> list[int]:
        """Compile the plain and the looped graphs on training batches, then restore the initial state.

        Real steps are run (so optimizer kernels compile too), each on one micro-batch: the graphs and the activation
        memory are those of a full step, in an eighth of its GPU time. Model and optimizer states are snapshotted
        before and restored after, and the loader restarts, so training proper starts exactly from the initialization.
        Returns the number of graphs each phase compiled (plain, then looped).
        """
        hp, ctx = self.hp, self.ctx
        if hp.warmup_steps <= 0:
            return []
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        phases = [False, True] if hp.num_loops > 0 else [False]
        new_graphs = []
        for looping in phases:
            self.model.looping = looping
            # Compiled regions run the looped schedule on the plain phase's graphs: one step proves it (the log shows
            # +0 graphs) and grows the allocator to the looped activations.
            steps = 1 if looping and self.regions is not EAGER_REGIONS else hp.warmup_steps
            graphs_before = compiled_graph_count()
            for i in range(steps):
                self.step(i, 1.0, micro_batches=1)
                if i + 1 in (1, 2, 3, 4, 5, 6, steps) or (i + 1) % 10 == 0:
                    ctx.log(f"{'loop_warmup_step' if looping else 'warmup_step'}: {i + 1}/{steps}")
            new_graphs.append(compiled_graph_count() - graphs_before)
        self.model.looping = False
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, opt_states):
            opt.load_state_dict(state)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.new_loader()
        ctx.sync()
        return new_graphs


# A step may take this much longer than the last or the mean one. GPU steps vary by about 1%, so the margin costs a
# quarter of a step on average at the end of a run; on a loaded 2-core CPU a test overshot 4,000 ms by 38 ms without it.
STEP_TIME_MARGIN = 1.25


def train(hp: Hyperparameters, ctx: RunContext, trainer: Trainer, budget_ms: float, validate) -> dict:
    """Wallclock-driven training loop. `validate(step, train_ms)` runs a periodic validation (its time is not counted).

    Stops before the step that would cross the budget (predicted from the step times, with STEP_TIME_MARGIN), so the
    counted training time stays within it unless a step runs that much slower than predicted. Returns the step
    count, counted time and the step at which looping switched on.
    """
    model, ema = trainer.model, EMA(trainer.model, hp.ema_decay)
    tokens_per_step = hp.train_batch_tokens
    train_ms, step, loop_step, stop_reason = 0.0, 0, None, "iterations"
    ctx.sync()
    t0 = time.perf_counter()
    while step < hp.iterations:
        frac = train_ms / budget_ms if budget_ms > 0 else step / hp.iterations
        if hp.num_loops > 0 and not model.looping and frac >= hp.enable_looping_at:
            model.looping = True
            loop_step = step
            enc, dec = model.schedules[True]
            ctx.log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{enc} decoder:{dec}")
        loss = trainer.step(step, lr_multiplier(frac, hp.warmdown_frac, hp.min_lr))
        ema.update()
        step += 1
        loss_value = loss.item()  # syncs; the wallclock check below needs a sync anyway
        last_step_ms = 1000 * (time.perf_counter() - t0) - train_ms
        train_ms += last_step_ms
        # The next step costs about as much as the slower of the mean and the last one (looping makes steps slower at
        # once, which the mean would notice late), give or take STEP_TIME_MARGIN. One all-reduce carries its predicted
        # end and, as inf, a non-finite loss on any rank, so the ranks stop together (a rank stopping alone would leave
        # the others waiting in the next step's all-reduce).
        next_step_ms = STEP_TIME_MARGIN * max(train_ms / step, last_step_ms)
        worst_end_ms = all_reduce_max(ctx, train_ms + next_step_ms if math.isfinite(loss_value) else math.inf)
        if not math.isfinite(worst_end_ms):
            ctx.log(f"error: non-finite training loss at step {step} (rank {ctx.rank}: {loss_value}); stopping. Lower "
                    "MATRIX_LR / TIED_EMBED_LR or check the data. The log and metrics so far are kept.")
            raise SystemExit(3)
        if step <= 5 or step % hp.train_log_every == 0:
            tok_s = step * tokens_per_step / (train_ms / 1000)
            ctx.log(f"{step}/{hp.iterations} train_loss: {loss_value:.4f} train_time: {train_ms / 60000:.1f}m "
                    f"tok/s: {tok_s:.0f}")
            ctx.metric(event="train", step=step, train_loss=loss_value, train_time_ms=train_ms, tok_s=tok_s,
                       looping=model.looping)
        if hp.val_loss_every > 0 and step % hp.val_loss_every == 0:
            ctx.sync()
            v0 = time.perf_counter()
            validate(step, train_ms)
            t0 += time.perf_counter() - v0  # validation time is not training time
        if budget_ms > 0 and worst_end_ms > budget_ms:
            stop_reason = "wallclock_cap"
            break
    if stop_reason == "wallclock_cap":
        ctx.log(f"stopping_early: wallclock_cap train_time: {train_ms:.0f}ms step: {step}/{hp.iterations}")
    validate(step, train_ms)
    if ctx.device.type == "cuda":
        ctx.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    ctx.log("ema:applying EMA weights")
    ema.copy_to(model)
    return dict(steps=step, train_ms=train_ms, looping_enabled_step=loop_step)


# =====================================================================================================
# 6. Quantization and artifact
# =====================================================================================================

# Pipeline: collect_hessians (every rank) -> build_artifact (rank 0: GPTQ, container, compression, size autopilot)
# -> atomic_write_bytes -> size_report; load_artifact + dequantize_state_dict rebuild the weights for evaluation.

QUANT_PASSTHROUGH_NUMEL = 65_536  # tensors this small stay fp16: their bytes hardly count, their precision might
EMBED_NAME = "tok_emb.weight"  # tied embedding; its GPTQ Hessian comes from the input of the logit matmul ...
EMBED_HESSIAN_MODULE = "final_norm"  # ... which is the output of this module
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGQA", 1
ARTIFACT_HEADER = struct.Struct("<4sHBBII")  # magic, version, compressor id, chunk count, raw length, crc32
COMPRESSOR_IDS = {"brotli": 1, "lzma": 2}
SHUFFLE_MAGIC, SHUFFLE_STRIDE = b"BSHF", 2
CONTAINER_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# Brotli-11 compresses about 0.4 MB of input per second, so the ~36 MB container takes 65-110 s on one core. The
# shuffled container is cut into this many equal, independent chunks compressed on parallel threads (the brotli and
# lzma bindings release the GIL); the count is fixed, not taken from the core count, so that the artifact's bytes do
# not depend on the machine. Measured (brotli 1.2.1, quality 11, lgwin 22):
#   GPT-shaped stand-in (35.9M params, heavy-tailed rows, real GPTQ), 16-core H100 host: one stream 15,669,368 B in
#   84.5 s; 8 chunks +383 B in 10.8 s; 16 chunks +248 B in 5.0-5.8 s. lzma preset 6 (8 chunks): +5.8% in 5.4 s.
#   Synthetic 36.0 MB payload (int6 Student-t rows, int8 embedding, fp16 scales): one stream 15,704,630 B; 2 chunks
#   +0.008%, 8 chunks +0.013%, 16 chunks +0.019%. A 16 MB window (lgwin 24) gained nothing (+368 B).
COMPRESS_CHUNKS = 16

# Size autopilot. On these tensors brotli-11 is a Huffman coder in effect: its output stays within 0.1% of the
# Huffman code length of each int8 tensor's histogram, while the ratio to the order-0 entropy drifts from 1.008 to
# 1.018 as the clip multiplier goes from 0.8 to 1.5 (brotli at quality 5-9, the other candidate, comes out 13% larger,
# a poor proxy). So the Huffman length, cheap to compute, times a ratio measured on a real compression, predicts it.
AUTOPILOT_PRIOR_RATIO = 0.998  # compressed bytes / estimate before a run measures its own (GPT-shaped stand-in)
AUTOPILOT_SIZE_SLOPE = -0.4  # d log(bytes) / d log(multiplier) near the defaults: the first step's guess
AUTOPILOT_TOLERANCE = 2e-4  # the search stops once the prediction is this close under its goal
AUTOPILOT_SCALE_RANGE = (0.8, 4.0)  # multipliers searched; 0.8 keeps k >= ~10 sigma (a guess, not measured)
AUTOPILOT_MARGIN = 5e-4  # aim this fraction under the byte budget, for the predictor's residual error
AUTOPILOT_SLACK = 3e-3  # a fitting artifact this close to the budget is taken; with more slack, try a finer one
AUTOPILOT_MAX_ROUNDS = 3  # real compressions at most


class ArtifactError(ValueError):
    pass


def clip_group(name: str, hp: Hyperparameters) -> tuple[int, float]:
    """(bits, clip sigmas k) for a quantized tensor: the embedding, attention and MLP matrices can each be tuned."""
    if name == EMBED_NAME:
        return hp.embed_bits, hp.embed_clip_sigmas
    if ".attn." in name and hp.attn_clip_sigmas >= 0:
        return hp.matrix_bits, hp.attn_clip_sigmas
    if ".mlp." in name and hp.mlp_clip_sigmas >= 0:
        return hp.matrix_bits, hp.mlp_clip_sigmas
    return hp.matrix_bits, hp.matrix_clip_sigmas


class _AllowTF32:
    """Allow TF32 matmuls inside the block when `allow` (for bf16/fp16 operands, whose values TF32 holds exactly)."""

    def __init__(self, allow: bool):
        self.allow = allow

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.saved or self.allow

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _gram(x: Tensor) -> Tensor:
    """XᵀX in fp32. bf16 products are exact in fp32, so a bf16 matmul with fp32 output and accumulation is as good
    as TF32 (H100, [98304, 2048]: max error against fp64 49 vs 59) and faster (1.0 ms vs 4.4 ms; plain fp32 16.5 ms)."""
    if x.is_cuda and x.dtype == torch.bfloat16:
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=)
            pass
    with _AllowTF32(x.dtype in (torch.bfloat16, torch.float16)):
        return x.float().T @ x.float()


@torch.no_grad()
def collect_hessians(model: nn.Module, batches) -> tuple[dict[str, Tensor], float]:
    """H = XᵀX per quantized matrix, averaged over batches (and over ranks when distributed); returns (H, seconds).

    X is the input of every nn.Linear with more than QUANT_PASSTHROUGH_NUMEL weights, and for the tied embedding the
    output of final_norm (the embedding's input in the logit matmul). Pass the eager module (hooks do not fire inside a
    compiled graph) with the depth loop set as it will be evaluated: a looped layer accumulates every pass.
    batches: iterable of (x, y) int64 [B, T] on the model's device. Every rank must call this (it all-reduces).
    """
    t0 = time.perf_counter()
    sources = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.numel() > QUANT_PASSTHROUGH_NUMEL:
            sources[m] = (f"{mname}.weight", False)
        elif mname == EMBED_HESSIAN_MODULE:
            sources[m] = (EMBED_NAME, True)
    hessians: dict[str, Tensor] = {}
    last = [None, None]  # (input, XᵀX): c_q, c_k and c_v read one tensor, so their product is computed once

    def hook(module, inputs, output):
        name, use_output = sources[module]
        x = output if use_output else inputs[0]  # the tensor itself: a .detach() would be a new object each call
        if x is not last[0]:
            last[0], last[1] = x, _gram(x.detach().reshape(-1, x.shape[-1]))
        if name not in hessians:
            hessians[name] = torch.zeros_like(last[1])
        hessians[name] += last[1]

    handles = [m.register_forward_hook(hook) for m in sources]
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for b in blocks:  # each linear called on its own, so that its hook sees its input
        b.fused_linears = False
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for x, y in batches:
            model(x, y)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            b.fused_linears = True
        model.train(was_training)
        last.clear()
    if n_batches == 0:
        raise ValueError("collect_hessians: no calibration batches (GPTQ_CALIBRATION_BATCHES must be >= 1)")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for name in sorted(hessians):  # same order on every rank
        if world > 1:
            dist.all_reduce(hessians[name])
        hessians[name] /= n_batches * world
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # so that the time returned includes the queued GPU work
    return hessians, time.perf_counter() - t0


def _scale_from_std(std: Tensor, qmax, clip_sigmas) -> Tensor:
    # The clamp keeps a constant row from dividing by zero; since fp16 flushes 1e-10 to zero, the stored scale is
    # floored again at fp16's smallest subnormal.
    return (clip_sigmas * std / qmax).clamp_min(1e-10).to(torch.float16).clamp_min(FP16_TINY)


def sdclip_scale(W: Tensor, bits: int, clip_sigmas: float) -> Tensor:
    """Per-row fp16 step k·std(row)/q_max: clips at ±k sample standard deviations (SDClip)."""
    return _scale_from_std(W.float().std(dim=-1), 2 ** (bits - 1) - 1, clip_sigmas)


def rtn_quantize(W: Tensor, bits: int, clip_sigmas: float) -> tuple[Tensor, Tensor]:
    """Round-to-nearest with the SDClip scales: (q int8 [rows, cols], scale fp16 [rows])."""
    qmax = 2 ** (bits - 1) - 1
    scale = sdclip_scale(W, bits, clip_sigmas)
    q = torch.clamp(torch.round(W.float() / scale.float()[:, None]), -qmax, qmax)
    return q.to(torch.int8), scale


def _inverse_cholesky_upper(H: Tensor) -> Tensor:
    """Upper U with UᵀU = H⁻¹ for a batch of damped Hessians; one whose factorization fails gets more damping."""
    eye = torch.eye(H.shape[-1], device=H.device, dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        bad = (info > 0) | (info2 > 0) | ~torch.isfinite(U).all(dim=(-2, -1))
        if not bad.any():
            return U
        H = H + bad[:, None, None] * 0.1 * H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
    raise RuntimeError("GPTQ: a Hessian stays singular after damping (NaN or inf activations in calibration?)")


def _gptq_prepare(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched [B, R, C] weights and [B, C, C] Hessians -> (act-ordered weights, U, permutation)."""
    W, H = W.float().clone(), H.float().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)  # a view: writes go into H
    dead = diag == 0  # inputs that were always zero: any weight works, so use 0 and keep H invertible
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    diag.add_(0.01 * diag.mean(-1, keepdim=True))
    # Act-order: the inputs with the most energy go first, while the most columns remain to absorb their error.
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    W = W.gather(2, perm[:, None, :].expand_as(W))
    H = H.gather(1, perm[:, :, None].expand_as(H)).gather(2, perm[:, None, :].expand_as(H))
    return W, _inverse_cholesky_upper(H), perm


def _gptq_sweep(W: Tensor, U: Tensor, perm: Tensor, scale: Tensor, qmax: Tensor, block_size: int = 128) -> Tensor:
    """GPTQ column sweep over a batch: W [B, R, C] act-ordered, U its inverse-Hessian factor, scale/qmax [B, R].

    Each column is rounded and its error, divided by U's diagonal, is pushed onto the not-yet-quantized columns of
    the block at once; whole blocks push theirs onto later columns with one matmul. The loop is over columns only:
    rows and the batch of matrices are vectorized. Returns q (float, exact integers) in the original column order.
    """
    W = W.clone()
    B, R, C = W.shape
    s = scale.float()
    lim = qmax.to(s)
    Q = torch.empty_like(W)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1, U1 = W[:, :, i1:i2], U[:, i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        for j in range(i2 - i1):
            w = W1[:, :, j]
            q = torch.clamp(torch.round(w / s), -lim, lim)
            Q[:, :, i1 + j] = q
            err = (w - q * s) / U1[:, j, j, None]
            E1[:, :, j] = err
            W1[:, :, j + 1:].baddbmm_(err[:, :, None], U1[:, j:j + 1, j + 1:], alpha=-1)
        if i2 < C:
            W[:, :, i2:].baddbmm_(E1, U[:, i1:i2, i2:], alpha=-1)
    return Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand_as(Q))


def gptq_quantize(W: Tensor, H: Tensor, bits: int, clip_sigmas: float, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ of one matrix [rows, cols] with Hessian [cols, cols]: (q int8, scale fp16 [rows]), same scales as RTN."""
    W = W.to(H.device)
    scale = sdclip_scale(W, bits, clip_sigmas)
    Wp, U, perm = _gptq_prepare(W[None], H[None])
    q = _gptq_sweep(Wp, U, perm, scale[None], torch.full(scale[None].shape, 2.0 ** (bits - 1) - 1, device=H.device),
                    block_size)
    return q[0].to(torch.int8), scale


@dataclasses.dataclass
class _GptqBatch:
    """Same-shape matrix stacks quantized together; rows of matrices that share one Hessian are stacked into one."""
    W: Tensor  # [B, R, C] act-ordered, dead columns zeroed
    U: Tensor  # [B, C, C]
    perm: Tensor  # [B, C]
    row_std: Tensor  # [B, R] of the original rows
    qmax: Tensor  # [B, R]
    sigmas: Tensor  # [B, R]
    pieces: list  # (batch index, first row, last row, name, original shape, bits)


def is_attn_gate(name: str, t: Tensor) -> bool:
    """The sparse attention gates (num_heads x 12 per layer) take the per-row int8 path, not fp16 passthrough."""
    return name.endswith(".attn_gate_w") and t.is_floating_point() and t.ndim == 2 and 32 <= t.numel() <= 8192


def rowmax_int8_quantize(W: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8, no clipping: scale = max|W_r|/127 (fp16), q = round(W/scale) in [-127, 127]."""
    scale = (W.float().abs().amax(dim=1) / 127).clamp_min(1e-10).to(torch.float16).clamp_min(FP16_TINY)
    q = torch.clamp(torch.round(W.float() / scale.float()[:, None]), -127, 127)
    return q.to(torch.int8), scale


@dataclasses.dataclass
class QuantPlan:
    """Everything about quantizing a state dict that does not depend on the clip multiplier, computed once so that
    the size autopilot can re-run the sweep for each multiplier it tries."""
    passthrough: dict  # name -> stored tensor
    rtn: list  # (name, 2-D weight, bits, k): large matrices that have no Hessian
    batches: list
    gates: dict = dataclasses.field(default_factory=dict)  # name -> attention gate weight, for rowmax_int8_quantize


def plan_quantization(state_dict: dict[str, Tensor], hessians: dict[str, Tensor], hp: Hyperparameters) -> QuantPlan:
    """Sort tensors into passthrough / RTN / GPTQ and factor the Hessians, batching matrices of one shape."""
    passthrough, rtn, units, gates = {}, [], [], {}  # unit: [H, [(name, W2d, bits, k), ...]] for matrices sharing H
    for name, t in state_dict.items():
        t = t.detach()
        if is_attn_gate(name, t):
            gates[name] = t.cpu()
        elif not t.is_floating_point():
            passthrough[name] = t.cpu()
        elif t.numel() <= QUANT_PASSTHROUGH_NUMEL or t.ndim != 2:
            passthrough[name] = t.to(device="cpu", dtype=torch.float16)
        elif name not in hessians:
            rtn.append((name, t, *clip_group(name, hp)))
        else:
            H = hessians[name]
            piece = (name, t.to(H.device), *clip_group(name, hp))
            # equal Hessians (c_q, c_k, c_v) see the same inputs: GPTQ treats rows independently, so stack them
            unit = next((u for u in units if u[0].shape == H.shape and torch.equal(u[0], H)), None)
            if unit is None:
                units.append([H, [piece]])
            else:
                unit[1].append(piece)
    by_shape: dict[tuple, list] = {}
    for H, pieces in units:
        rows = sum(p[1].shape[0] for p in pieces)
        by_shape.setdefault((rows, H.shape[0]), []).append((H, pieces))
    batches = []
    for group in by_shape.values():
        W = torch.stack([torch.cat([p[1].float() for p in pieces]) for _, pieces in group])
        Wp, U, perm = _gptq_prepare(W, torch.stack([H for H, _ in group]))
        qmax, sigmas, spans = torch.empty(W.shape[:2]), torch.empty(W.shape[:2]), []
        for b, (_, pieces) in enumerate(group):
            r0 = 0
            for name, w, bits, k in pieces:
                r1 = r0 + w.shape[0]
                qmax[b, r0:r1], sigmas[b, r0:r1] = 2 ** (bits - 1) - 1, k
                spans.append((b, r0, r1, name, tuple(w.shape), bits))
                r0 = r1
        batches.append(_GptqBatch(Wp, U, perm, W.std(dim=-1), qmax.to(W.device), sigmas.to(W.device), spans))
    return QuantPlan(passthrough, rtn, batches, gates)


def quantize_with_plan(plan: QuantPlan, clip_scale: float = 1.0) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, meta) with every clip sigma multiplied by clip_scale; tensors stay on the device they were made on."""
    tensors, meta = {}, {}
    for name, t in plan.passthrough.items():
        tensors[name], meta[name] = t, f"passthrough ({str(t.dtype).removeprefix('torch.')})"
    for name, w, bits, k in plan.rtn:
        tensors[name + ".q"], tensors[name + ".scale"] = rtn_quantize(w, bits, k * clip_scale)
        meta[name] = f"rtn (int{bits})"
    for name, w in plan.gates.items():
        tensors[name + ".q"], tensors[name + ".scale"] = rowmax_int8_quantize(w)
        meta[name] = "rowmax (int8)"
    for b in plan.batches:
        scale = _scale_from_std(b.row_std, b.qmax, b.sigmas * clip_scale)
        q = _gptq_sweep(b.W, b.U, b.perm, scale, b.qmax).to(torch.int8)
        for i, r0, r1, name, shape, bits in b.pieces:
            tensors[name + ".q"], tensors[name + ".scale"] = q[i, r0:r1].reshape(shape), scale[i, r0:r1]
            meta[name] = f"gptq (int{bits})"
    return tensors, meta


def quantize_state_dict(state_dict: dict[str, Tensor], hessians: dict[str, Tensor], hp: Hyperparameters,
                        clip_scale: float = 1.0) -> tuple[dict[str, Tensor], dict[str, str]]:
    """GPTQ every large 2-D float tensor that has a Hessian (RTN if it has none), per-row int8 for the attention
    gates, fp16 for other small floats, the rest as is. Returns CPU tensors: '<name>.q' int8 and '<name>.scale' fp16 per quantized matrix, '<name>' otherwise,
    and meta: name -> tag, e.g. 'gptq (int6)', 'passthrough (float16)'."""
    tensors, meta = quantize_with_plan(plan_quantization(state_dict, hessians, hp), clip_scale)
    return {k: v.cpu() for k, v in tensors.items()}, meta


def dequantize_state_dict(tensors: dict[str, Tensor], meta: dict[str, str],
                          template_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights for load_state_dict: q·scale per row, each tensor in the template's dtype, device and shape."""
    missing = sorted(set(template_state_dict) - set(meta))
    extra = sorted(set(meta) - set(template_state_dict))
    if missing or extra:
        raise ArtifactError(f"artifact does not match the model: missing {missing[:5]}, unexpected {extra[:5]} "
                            "(built with other model settings? use the same NUM_LAYERS/MODEL_DIM/... as training)")
    out = {}
    for name, ref in template_state_dict.items():
        tag = meta[name]
        if tag.startswith(("gptq", "rtn", "rowmax")):
            w = tensors[name + ".q"].float() * tensors[name + ".scale"].float()[:, None]
        elif tag.startswith("passthrough"):
            w = tensors[name]
        else:
            raise ArtifactError(f"artifact: tensor {name} has unknown tag {tag!r} (written by a newer script?)")
        if tuple(w.shape) != tuple(ref.shape):
            raise ArtifactError(f"artifact: {name} has shape {tuple(w.shape)}, the model expects {tuple(ref.shape)}")
        out[name] = w.to(device=ref.device, dtype=ref.dtype)
    return out


def describe_quantization(meta: dict[str, str]) -> list[str]:
    """'Quantized weights:' then one line per tag with the short names (layer indices dropped)."""
    by_tag: dict[str, set] = {}
    for name, tag in meta.items():
        by_tag.setdefault(tag, set()).add(".".join(p for p in name.split(".") if not p.isdigit()))
    return ["Quantized weights:"] + [f"  {tag}: {', '.join(sorted(names))}" for tag, names in sorted(by_tag.items())]


# --- container: JSON header + raw little-endian tensor bytes; no pickle, so loading a file from anyone is safe -----

def serialize_tensors(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """u32 header length, JSON header (meta, [name, dtype, shape, offset, nbytes] per tensor), payload.

    Same-dtype tensors sit together (the compressor sees one statistic at a time) and each starts at a multiple of
    its item size, so the stride-2 byte shuffle lines up the low and high bytes of every fp16 value."""
    if sys.byteorder != "little":
        raise RuntimeError("the artifact format is little-endian; this machine is big-endian")
    entries, chunks, offset = [], [], 0
    for name in sorted(tensors, key=lambda n: (str(tensors[n].dtype), n)):
        t = tensors[name].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in CONTAINER_DTYPES:
            raise ValueError(f"serialize_tensors: {name} has dtype {dtype}, not one of {sorted(CONTAINER_DTYPES)}")
        pad = -offset % t.element_size()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        chunks += [b"\0" * pad, data]
        offset += pad
        entries.append([name, dtype, list(t.shape), offset, len(data)])
        offset += len(data)
    header = json.dumps({"meta": meta, "tensors": entries}, separators=(",", ":")).encode()
    header += b" " * (-(4 + len(header)) % 8)
    return struct.pack("<I", len(header)) + header + b"".join(chunks)


def deserialize_tensors(buf: bytes, source: str = "artifact") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Inverse of serialize_tensors, checking every length and extent against the buffer."""
    def fail(what):
        raise ArtifactError(f"{source}: corrupt tensor container: {what}. Rebuild the artifact with train_gpt.py.")

    if len(buf) < 4:
        fail(f"{len(buf)} bytes, too short for the header length")
    (hlen,) = struct.unpack_from("<I", buf)
    if 4 + hlen > len(buf):
        fail(f"header length {hlen} runs past the end ({len(buf)} bytes)")
    try:
        header = json.loads(buf[4:4 + hlen])
        meta, entries = dict(header["meta"]), list(header["tensors"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"unreadable JSON header ({e})")
    payload = memoryview(buf)[4 + hlen:]
    tensors = {}
    for entry in entries:
        try:
            name, dtype_name, shape, offset, nbytes = entry
            dtype = CONTAINER_DTYPES[dtype_name]
            shape, offset, nbytes = [int(d) for d in shape], int(offset), int(nbytes)
        except (ValueError, KeyError, TypeError):
            fail(f"bad tensor entry {str(entry)[:200]}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or nbytes != math.prod(shape) * itemsize or offset < 0 \
                or offset + nbytes > len(payload):
            fail(f"tensor {name}: shape {shape} x {dtype_name} at offset {offset} (+{nbytes} bytes) does not fit "
                 f"the {len(payload)}-byte payload")
        data = bytearray(payload[offset:offset + nbytes])
        flat = torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(shape)
    return tensors, meta


def byte_shuffle(data: bytes, stride: int = SHUFFLE_STRIDE) -> bytes:
    """'BSHF' + stride byte + the bytes at offsets 0, s, 2s, ... then 1, 1+s, ...: groups high and low bytes."""
    a = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(a[i::stride].tobytes() for i in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    if not data.startswith(SHUFFLE_MAGIC):
        return data
    stride, body = data[4], np.frombuffer(data, dtype=np.uint8, offset=5)
    if stride < 2:
        return body.tobytes()
    out, pos = np.empty_like(body), 0
    for i in range(stride):
        n = len(range(i, len(body), stride))
        out[i::stride] = body[pos:pos + n]
        pos += n
    return out.tobytes()


def _codec(compressor: str):
    """(compress, decompress) for one chunk."""
    if compressor == "brotli":
        import brotli

        return (lambda b: brotli.compress(b, quality=11)), brotli.decompress
    if compressor == "lzma":
        return (lambda b: lzma.compress(b, preset=6)), lzma.decompress
    raise ValueError(f"COMPRESSOR={compressor!r}: use brotli or lzma")


def _parallel_map(fn, items: list) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


def compress_container(raw: bytes, compressor: str, chunks: int = COMPRESS_CHUNKS) -> bytes:
    """File bytes: fixed header, chunk lengths, then the byte-shuffled container compressed as independent chunks.

    The crc32 covers everything after the fixed header, so a flipped byte is caught before any decompression."""
    shuffled = byte_shuffle(raw)
    step = -(-len(shuffled) // chunks)
    parts = _parallel_map(_codec(compressor)[0], [shuffled[i:i + step] for i in range(0, len(shuffled), step)])
    body = struct.pack(f"<{len(parts)}I", *map(len, parts)) + b"".join(parts)
    return ARTIFACT_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, COMPRESSOR_IDS[compressor], len(parts),
                                len(shuffled), zlib.crc32(body)) + body


def pack_artifact(tensors: dict[str, Tensor], meta: dict[str, str], compressor: str) -> bytes:
    return compress_container(serialize_tensors(tensors, meta), compressor)


def unpack_artifact(data: bytes, source: str = "artifact") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Check header, length and crc32, decompress, unshuffle, parse. Errors say what is wrong and what to do."""
    again = "copy the file again, or rebuild it by rerunning training"
    hsize = ARTIFACT_HEADER.size
    if len(data) < hsize:
        raise ArtifactError(f"{source}: truncated: {len(data)} bytes, shorter than the {hsize}-byte header; {again}")
    magic, version, comp_id, n_chunks, raw_len, crc = ARTIFACT_HEADER.unpack_from(data)
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"{source}: not a train_gpt.py artifact (magic {magic!r}, expected {ARTIFACT_MAGIC!r}); "
                            "ARTIFACT_PATH must name the .ptz file a training run wrote")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"{source}: artifact format version {version}, this script reads version "
                            f"{ARTIFACT_VERSION}; evaluate it with the train_gpt.py that wrote it")
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    if comp_id not in names:
        raise ArtifactError(f"{source}: unknown compressor id {comp_id} in the header (corrupt file?); {again}")
    table_end = hsize + 4 * n_chunks
    if len(data) < table_end:
        raise ArtifactError(f"{source}: truncated inside the chunk table ({len(data)} bytes); {again}")
    sizes = struct.unpack_from(f"<{n_chunks}I", data, hsize)
    if len(data) != table_end + sum(sizes):
        raise ArtifactError(f"{source}: truncated or padded: the header promises {table_end + sum(sizes)} bytes, "
                            f"the file has {len(data)}; {again}")
    if zlib.crc32(data[hsize:]) != crc:
        raise ArtifactError(f"{source}: checksum mismatch (crc32 {zlib.crc32(data[hsize:]):08x}, header says "
                            f"{crc:08x}): the file is corrupt; {again}")
    bounds = np.cumsum((table_end,) + sizes).tolist()
    decompress = _codec(names[comp_id])[1]
    try:
        shuffled = b"".join(_parallel_map(decompress, [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))
    except Exception as e:  # brotli.error / lzma.LZMAError: the checksum passed, so the writer was at fault
        raise ArtifactError(f"{source}: {names[comp_id]} stream does not decompress ({e}); {again}") from e
    if len(shuffled) != raw_len:
        raise ArtifactError(f"{source}: decompressed to {len(shuffled)} bytes, header says {raw_len}; {again}")
    return deserialize_tensors(byte_unshuffle(shuffled), source)


def load_artifact(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, meta) from an artifact file, verified; never unpickles."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror}); check ARTIFACT_PATH") from e
    return unpack_artifact(data, str(path))


# --- size: the rule, the report and the autopilot ---------------------------------------------------------------------

def _huffman_bits(counts: list[int]) -> int:
    """Total length in bits of a Huffman code for symbols with these counts: every merge adds a bit to its members."""
    import heapq

    heap = [c for c in counts if c > 0]
    if len(heap) < 2:
        return sum(heap)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def estimate_compressed_bytes(tensors: dict[str, Tensor]) -> float:
    """Huffman-coded size of each int8 tensor's values plus the raw bytes of the others (scales: ~1% of the total)."""
    total = 0.0
    for t in tensors.values():
        if t.dtype == torch.int8:
            total += _huffman_bits(torch.bincount(t.reshape(-1).int() + 128, minlength=256).tolist()) / 8
        else:
            total += t.numel() * t.element_size()
    return total


def size_report(artifact_path: str, script_path: str, compressor: str,
                autopilot: bool) -> tuple[int, list[str], bool]:
    """(bytes_total, log lines, fits): bytes_total = size of the artifact file + counted bytes of the code.

    Over SIZE_CAP_BYTES the last line says so loudly and what to change (autopilot: the size search was on, so no clip
    multiplier in its range fitted)."""
    model_bytes = os.path.getsize(artifact_path)
    code_bytes, how = counted_code_bytes(script_path)
    total = model_bytes + code_bytes
    lines = [f"Serialized model quantized+{compressor}: {model_bytes} bytes",
             f"Code size: {code_bytes} bytes ({how})",
             f"Total submission size quantized+{compressor}: {total} bytes"]
    fits = total <= SIZE_CAP_BYTES
    if not fits:
        lines.append(f"!!! SIZE CAP EXCEEDED: {total:,} bytes is {total - SIZE_CAP_BYTES:,} over the "
                     f"{SIZE_CAP_BYTES:,}-byte cap; this artifact is NOT a valid submission. " +
                     ("Even the widest clipping the size search tries did not fit: rerun with fewer MATRIX_BITS / "
                      "EMBED_BITS or a smaller model." if autopilot else
                      f"Rerun with SIZE_TARGET_BYTES={SIZE_CAP_BYTES - 10_000} (autopilot) or larger *_CLIP_SIGMAS."))
    return total, lines, fits


def _search_clip_scale(predict, goal: float, lo: float, hi: float, tried: list[float]) -> float:
    """Smallest multiplier in [lo, hi] whose predict(m) (falling with m) is <= goal, within AUTOPILOT_TOLERANCE.

    Secant steps on log(bytes) against log(m) from the closest fitting and non-fitting points so far, kept inside
    that bracket; starts from the points in tried (predict is expected to cache them). Returns hi if nothing fits."""
    over, under = {}, {}
    todo = list(tried)
    for _ in range(len(todo) + 12):
        m = todo.pop() if todo else m
        p = predict(m)
        (under if p <= goal else over)[m] = p
        if todo:
            continue
        a, b = max(over, default=None), min(under, default=None)  # largest too big, smallest fitting
        close = b is not None and (under[b] >= goal * (1 - AUTOPILOT_TOLERANCE) or (a is not None and b < a * 1.001))
        if b is not None and (b <= lo or close):
            return b
        if b is None and a >= hi:
            return hi
        if a is not None and b is not None:
            slope, ref = math.log(under[b] / over[a]) / math.log(b / a), b
        else:
            slope, ref = AUTOPILOT_SIZE_SLOPE, a if b is None else b
        m = ref * (goal * (1 - AUTOPILOT_TOLERANCE / 2) / predict(ref)) ** (1 / slope)
        if a is not None and b is not None:  # never closer than a tenth of the bracket to its ends, so it shrinks
            la, lb = math.log(a), math.log(b)
            m = math.exp(min(max(math.log(m), la + 0.1 * (lb - la)), lb - 0.1 * (lb - la)))
        m = min(max(m, lo), hi)
    return min(under, default=hi)


def build_artifact(state_dict: dict[str, Tensor], hessians: dict[str, Tensor], hp: Hyperparameters,
                   code_bytes: int, log=print) -> tuple[bytes, dict]:
    """Quantize and compress the model: (file bytes, info). Rank 0 only; the caller writes the bytes atomically.

    With SIZE_TARGET_BYTES > 0 the clip multiplier m (every *_CLIP_SIGMAS times m; larger m = coarser steps = fewer
    bytes) is searched so that file + code_bytes lands just under the target: a search on the predicted size, a real
    compression to check, and the predictor recalibrated on it while the result is over the target or further under
    it than AUTOPILOT_SLACK."""
    t0 = time.perf_counter()
    plan = plan_quantization(state_dict, hessians, hp)
    info = {"plan_seconds": time.perf_counter() - t0, "code_bytes": code_bytes, "compress_seconds": 0.0}
    cache = {}  # multiplier -> (tensors, meta, estimate); the estimate does not depend on the calibration ratio

    def quantized(m):
        if m not in cache:
            tensors, meta = quantize_with_plan(plan, m)
            cache[m] = (tensors, meta, estimate_compressed_bytes(tensors))
        return cache[m]

    def compress(tensors, meta):
        t = time.perf_counter()
        blob = pack_artifact(tensors, meta, hp.compressor)
        info["compress_seconds"] += time.perf_counter() - t
        return blob

    if hp.size_target_bytes <= 0:
        tensors, meta, _ = quantized(1.0)
        log("\n".join(describe_quantization(meta)))
        blob = compress(tensors, meta)
        info.update(clip_scale=1.0, model_bytes=len(blob), seconds=time.perf_counter() - t0)
        return blob, info

    budget = hp.size_target_bytes - code_bytes
    lo, hi = AUTOPILOT_SCALE_RANGE
    ratio, best, rounds = AUTOPILOT_PRIOR_RATIO, None, []
    for rnd in range(AUTOPILOT_MAX_ROUNDS):
        goal = budget * (1 - AUTOPILOT_MARGIN * (rnd + 1))  # a little more careful after each miss
        m = _search_clip_scale(lambda x: ratio * quantized(x)[2], goal, lo, hi, list(cache) or [1.0])
        tensors, meta, est = quantized(m)
        blob = compress(tensors, meta)
        rounds.append((m, est * ratio, len(blob)))
        log(f"size_autopilot: round {rnd + 1} clip_scale:{m:.4f} predicted:{est * ratio:.0f} actual:{len(blob)} "
            f"budget:{budget} (target {hp.size_target_bytes} - code {code_bytes}) quantizations:{len(cache)}")
        ratio = len(blob) / est
        if len(blob) <= budget and (best is None or m < best[0]):
            best = (m, blob, meta)
        if len(blob) <= budget and (budget - len(blob) <= AUTOPILOT_SLACK * budget or m <= lo):
            break
    if best is None:
        log(f"size_autopilot: nothing in clip_scale {lo}..{hi} fits {budget} bytes; keeping the last try")
        best = (m, blob, meta)
    m, blob, meta = best
    log("\n".join(describe_quantization(meta)))
    log(f"size_autopilot: chose clip_scale:{m:.4f} model_bytes:{len(blob)} total:{len(blob) + code_bytes}")
    info.update(clip_scale=m, model_bytes=len(blob), rounds=rounds, quantizations=len(cache),
                seconds=time.perf_counter() - t0)
    return blob, info


# =====================================================================================================
# 7. Evaluation
# =====================================================================================================

# One scorer serves all three evaluations. A "window" is EVAL_SEQ_LEN input tokens starting at a global position ws;
# it scores its targets from in-window position `score_from` on. Target i (0-based) is the prediction of token i+1
# from tokens 0..i, so a stream of N+1 tokens has N targets, and target i lies at in-window position i - ws.
#   plain   (ANCHORS 2.3): windows at 0, T, 2T, ..., each scored in full; context never crosses a block.
#   sliding (2.4): a window every EVAL_STRIDE tokens; the first is scored in full, the others only their last
#                  stride positions, so every target after the first window sees T - stride tokens of context.
#   TTT     (6.1): the sliding windows, grouped into chunks; each chunk is scored, then trained on.
# Sharing the scorer makes "sliding at stride T == plain" and "TTT at lr 0 == sliding" true by construction; the
# tests check both, plus exact coverage, causality under TTT, and 1-rank == 2-rank results.
# TTT_MODE=lora_phased (6.2) scores per document instead, with its own windows and per-document adapters: see
# "phased LoRA TTT" below. It shares the sums, the byte counting and the coverage check.
# `ctx` is the RunContext of section 5: rank, world_size, device, log (rank 0 only), sync, autocast, and the running
# total counted_eval_seconds.

SLIDING_BATCH_WINDOWS = 32  # windows per forward in sliding and TTT scoring, as in the records
TTT_SEQS_PER_FORWARD = 32  # TTT training micro-batch per rank; a chunk with more sequences accumulates gradients
EVAL_COMPILE_BACKEND = "inductor"  # tests put a counting backend here to prove the timed phases never recompile
PROGRESS_FRACTIONS = (0.05, 0.25, 0.5, 0.75)  # where long phases log elapsed time and a projection from real batches


@dataclasses.dataclass
class EvalResult:
    label: str | None
    counted: bool  # on the eval clock (ctx.counted_eval_seconds)
    val_loss: float
    val_bpb: float
    tokens: int  # targets scored, all ranks
    bytes: int  # bytes credited to them
    expected_tokens: int  # targets in the stream
    expected_bytes: int  # byte-table total over the stream
    exactly_once: bool  # every target was scored by exactly one window on exactly one rank
    seconds: float
    target_losses: Tensor | None = None  # float64 [expected_tokens]: CE of target i (token i+1), when asked for

    @property
    def covered(self) -> bool:
        return self.exactly_once and self.tokens == self.expected_tokens and self.bytes == self.expected_bytes


@dataclasses.dataclass
class EvalTimings:
    """Measured by eval_warmup (off the eval clock): its own duration and steady-state step times."""
    warmup_seconds: float
    plain_batch: float
    sliding_batch: float
    ttt_step: float  # one TTT epoch on a typical chunk, without the optimizer step (~1 ms); 0 if TTT is off
    lora_step_short: float = 0.0  # lora_phased: one adapter step of a full batch at window TTT_CHUNK_SIZE ...
    lora_step_long: float = 0.0  # ... and at window EVAL_SEQ_LEN (forward, backward, AdamW); 0 in other modes


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def sliding_window_starts(n_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Window starts every `stride` tokens, for as long as a window still has an unscored target."""
    starts = np.arange(0, n_targets, stride, dtype=np.int64)
    return starts[(starts == 0) | (starts + seq_len - stride < n_targets)]


def sliding_score_from(starts: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    return np.where(starts == 0, 0, seq_len - stride).astype(np.int64)


@dataclasses.dataclass
class TTTChunk:
    index: int
    first_window: int  # the chunk scores sliding windows [first_window, end_window) ...
    end_window: int
    train_start: int  # ... then trains on targets [train_start, train_start + train_seqs * EVAL_SEQ_LEN)
    train_seqs: int


def ttt_plan(n_targets: int, hp: Hyperparameters) -> list[TTTChunk]:
    """Score-first schedule: chunk c scores the windows whose first scored target lies in [c*C, (c+1)*C), C =
    TTT_CHUNK_TOKENS, then trains on whole EVAL_SEQ_LEN sequences of targets that are scored and not yet trained on
    (a remainder waits for the next chunk). The last chunk is not trained on. With the defaults chunk c trains on
    exactly the 16 sequences it has just scored."""
    T, stride, C = hp.eval_seq_len, hp.eval_stride, hp.ttt_chunk_tokens
    starts = sliding_window_starts(n_targets, T, stride)
    first_scored = starts + sliding_score_from(starts, T, stride)
    n_chunks = _ceil_div(n_targets, C)
    chunk_of = np.minimum(first_scored // C, n_chunks - 1)  # non-decreasing, so chunks are contiguous window ranges
    bounds = np.searchsorted(chunk_of, np.arange(n_chunks + 1))
    plan, scored_end, trained_end = [], 0, 0
    for c in range(n_chunks):
        w0, w1 = int(bounds[c]), int(bounds[c + 1])
        if w1 > w0:
            scored_end = min(int(starts[w1 - 1]) + T, n_targets)
        seqs = (scored_end - trained_end) // T if c < n_chunks - 1 else 0
        # The legality condition itself: nothing is trained on before it has been scored.
        assert trained_end + seqs * T <= scored_end
        plan.append(TTTChunk(c, w0, w1, trained_end, seqs))
        trained_end += seqs * T
    return plan


def _ttt_lr(hp: Hyperparameters, chunk: int, n_chunks: int) -> float:
    return hp.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))


def _plain_batch_rows(hp: Hyperparameters) -> int:
    # VAL_BATCH_TOKENS is the global batch of 8 GPUs, as TRAIN_BATCH_TOKENS is (fewer GPUs accumulate), so a forward
    # has the same rows, and the same memory, on any world size: 524,288 / 8 / 2048 = 32.
    return max(1, hp.val_batch_tokens // (8 * hp.eval_seq_len))


def _all_reduce(t: Tensor, ctx: RunContext) -> Tensor:
    if ctx.world_size > 1:
        dist.all_reduce(t)
    return t


def _rank_share(n: int, ctx: RunContext) -> tuple[int, int]:
    return n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size


def _window_ce(model: nn.Module, h: Tensor, y: Tensor, lo: int) -> Tensor:
    logits = model.logits(h)[:, lo:]
    return F.cross_entropy(logits.float().flatten(0, 1), y[:, lo:].flatten(), reduction="none").view(y.shape[0], -1)


def _window_losses(model: nn.Module, x: Tensor, y: Tensor, lo: int, regions: Regions = EAGER_REGIONS) -> Tensor:
    """fp32 CE of in-window positions lo..T-1. The head is compiled with the CE, so the fp32 logits are fused in."""
    return regions(_window_ce)(model, model.hidden(x, regions=regions), y, lo)


def _train_loss(model: nn.Module, x: Tensor, y: Tensor, regions: Regions = EAGER_REGIONS) -> Tensor:
    return model(x, y, regions=regions)


_COMPILED: dict = {}


def _compiled(fn, hp: Hyperparameters, dynamic: bool = False):
    """fn (model, ...) as evaluation runs it. COMPILE_SCOPE=blocks: with the process-wide compiled regions (section
    3), the static ones shared with training. COMPILE_SCOPE=model: one compiled wrapper of the whole fn per process.
    dynamic=True (graphs for all sizes of the inputs' dimensions, as the LoRA TTT needs) always takes regions of its
    own: the whole LoRA step as one dynamic-shape graph had not compiled after 300 s on an H100. Either way the model
    is an argument, not a closure, so every copy of the architecture (quantized model, TTT copy) runs the graphs
    compiled in eval_warmup."""
    if not hp.compile:
        return fn
    if hp.compile_scope == "blocks" or dynamic:
        return functools.partial(fn, regions=compiled_regions(EVAL_COMPILE_BACKEND, dynamic))
    key = (fn, EVAL_COMPILE_BACKEND)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True, backend=EVAL_COMPILE_BACKEND)
    return _COMPILED[key]


class _Windows:
    """A rank's windows in segments (one per TTT chunk; one for plain and sliding), each padded to whole batches
    and uploaded once: a host-to-device copy per batch would stall the GPU queue. Padding rows score nothing."""

    def __init__(self, segments: list[tuple[np.ndarray, np.ndarray]], batch: int, seq_len: int, device):
        starts, score_from, lo, self.segments = [], [], [], []
        for seg_starts, seg_from in segments:
            pad = -len(seg_starts) % batch
            starts.append(np.concatenate([seg_starts, np.zeros(pad, np.int64)]))
            score_from.append(np.concatenate([seg_from, np.full(pad, seq_len, np.int64)]))
            first = len(lo)
            lo += score_from[-1].reshape(-1, batch).min(axis=1).tolist()  # CE is computed from here on
            self.segments.append((first, len(lo)))
        self.batch, self.lo = batch, lo
        self.starts = torch.from_numpy(np.concatenate(starts or [np.zeros(0, np.int64)])).to(device)
        self.score_from = torch.from_numpy(np.concatenate(score_from or [np.zeros(0, np.int64)])).to(device)


class _ScoreSums:
    """One evaluation's running sums on this rank, kept on the device so the loop never waits for the host; plus a
    hit count per target, which turns "every target scored exactly once" from a promise into a checked fact."""

    def __init__(self, n_targets: int, device, keep_losses: bool):
        self.n = n_targets
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.bytes = torch.zeros((), dtype=torch.int64, device=device)
        self.hits = torch.zeros(n_targets, dtype=torch.int32, device=device)
        self.losses = torch.zeros(n_targets, dtype=torch.float64, device=device) if keep_losses else None

    def add(self, ce: Tensor, scored: Tensor, target: Tensor, nbytes: Tensor) -> None:
        ce = torch.where(scored, ce, 0.0)
        self.loss += ce.sum(dtype=torch.float64)
        self.tokens += scored.sum()
        self.bytes += (nbytes * scored).sum()
        index = target.clamp(max=self.n - 1).flatten()  # unscored positions add zero wherever they point
        self.hits.scatter_add_(0, index, scored.flatten().to(torch.int32))
        if self.losses is not None:
            self.losses.scatter_add_(0, index, ce.flatten().double())


def _score_batches(model, tokens, windows: _Windows, batches: range, tables, sums: _ScoreSums, hp, ctx,
                   on_batch=None) -> None:
    """Score the given batches of windows under no_grad with the model's current weights."""
    T, B, n = hp.eval_seq_len, windows.batch, tokens.numel() - 1
    fn = _compiled(_window_losses, hp)
    offsets = torch.arange(T + 1, device=tokens.device)
    model.eval()
    with torch.no_grad():
        for b in batches:
            rows = slice(b * B, (b + 1) * B)
            starts, score_from, lo = windows.starts[rows], windows.score_from[rows], windows.lo[b]
            seq = tokens[(starts[:, None] + offsets).clamp_(max=n)]  # past the stream's end: never scored
            x, y = seq[:, :-1], seq[:, 1:]
            with ctx.autocast(), sdpa_context():
                ce = fn(model, x, y, lo)
            pos = offsets[lo:T]
            target = starts[:, None] + pos
            scored = (pos >= score_from[:, None]) & (target < n)
            # The in-window previous token is the stream's previous token, so bytes match the stream's byte total;
            # a byte sidecar is read at the target token's own stream position, target + 1.
            sums.add(ce, scored, target, count_target_bytes(x[:, lo:], y[:, lo:], tables, (target + 1).clamp(max=n)))
            if on_batch is not None:
                on_batch(b + 1)


class _Progress:
    """At a few fractions of a long phase, rank 0 logs elapsed time and the phase time it projects from the real
    batches done so far (one device sync each)."""

    def __init__(self, label: str | None, total: int, t0: float, ctx: RunContext):
        self.label, self.total, self.t0, self.ctx = label, total, t0, ctx
        self.marks = sorted({max(1, round(f * total)) for f in PROGRESS_FRACTIONS}) if label and total else []

    def tick(self, done: int) -> None:
        if not self.marks or done < self.marks[0]:
            return
        self.marks = [m for m in self.marks if m > done]
        if self.ctx.rank == 0:
            self.ctx.sync()
            elapsed = time.perf_counter() - self.t0
            self.ctx.log(f"{self.label}:progress {done}/{self.total} elapsed:{elapsed:.1f}s "
                         f"projected:{elapsed * self.total / done:.0f}s")


def _start_clock(model: nn.Module, hp: Hyperparameters, ctx: RunContext) -> float:
    if ctx.world_size > 1:
        dist.barrier()
    ctx.sync()
    t0 = time.perf_counter()
    return t0


def _on_device(val_tokens: Tensor, tables, ctx: RunContext):
    return val_tokens.to(ctx.device), ByteTables(*tables).to(ctx.device)


def _finish(sums: _ScoreSums, tokens, tables, label, counted, t0, ctx) -> EvalResult:
    totals = _all_reduce(torch.stack([sums.loss, sums.tokens.double(), sums.bytes.double()]), ctx)
    _all_reduce(sums.hits, ctx)
    if sums.losses is not None:
        _all_reduce(sums.losses, ctx)
    loss_sum, n_tokens, n_bytes = totals.tolist()
    positions = torch.arange(1, tokens.numel(), device=tokens.device)
    expected_bytes = int(count_target_bytes(tokens[:-1], tokens[1:], tables, positions).sum())
    exactly_once = bool((sums.hits == 1).all())
    val_loss = loss_sum / max(n_tokens, 1)
    val_bpb = loss_sum / (math.log(2) * max(n_bytes, 1))
    ctx.sync()
    seconds = time.perf_counter() - t0
    result = EvalResult(label, counted, val_loss, val_bpb, int(n_tokens), int(n_bytes), sums.n, expected_bytes,
                        exactly_once, seconds, sums.losses.cpu() if sums.losses is not None else None)
    if counted:
        ctx.counted_eval_seconds += seconds
    if label:
        ctx.log(f"{label} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{1000 * seconds:.0f}ms")
        ctx.log(f"coverage {label} val_tokens:{result.tokens} val_bytes:{result.bytes} "
                f"expected_tokens:{result.expected_tokens} expected_bytes:{expected_bytes} "
                f"exactly_once:{int(exactly_once)}")
        if not result.covered:
            ctx.log(f"ERROR coverage {label}: the scored targets are not exactly the validation stream; "
                    "this val_bpb is not a valid result")
    return result


def eval_val(model: nn.Module, val_tokens: Tensor, tables, hp: Hyperparameters, ctx: RunContext,
             label: str | None = "quantized", counted: bool = True, return_losses: bool = False) -> EvalResult:
    """Non-overlapping eval (ANCHORS 2.3): EVAL_SEQ_LEN blocks, each target with context from its own block only.
    Blocks are split contiguously over ranks; a final partial block is scored too, so no target is dropped.
    label=None logs nothing (periodic validation); counted=False keeps the time off the eval clock."""
    t0 = _start_clock(model, hp, ctx)
    tokens, tables = _on_device(val_tokens, tables, ctx)
    n, T = tokens.numel() - 1, hp.eval_seq_len
    lo, hi = _rank_share(_ceil_div(n, T), ctx)
    starts = np.arange(lo, hi, dtype=np.int64) * T
    windows = _Windows([(starts, np.zeros_like(starts))], _plain_batch_rows(hp), T, ctx.device)
    sums = _ScoreSums(n, ctx.device, return_losses)
    _score_batches(model, tokens, windows, range(len(windows.lo)), tables, sums, hp, ctx)
    return _finish(sums, tokens, tables, label, counted, t0, ctx)


def eval_val_sliding(model: nn.Module, val_tokens: Tensor, tables, hp: Hyperparameters, ctx: RunContext,
                     label: str | None = "quantized_sliding_window", counted: bool = True,
                     return_losses: bool = False) -> EvalResult:
    """Sliding-window eval (ANCHORS 2.4), windows split contiguously over ranks, SLIDING_BATCH_WINDOWS per forward."""
    t0 = _start_clock(model, hp, ctx)
    tokens, tables = _on_device(val_tokens, tables, ctx)
    n, T, stride = tokens.numel() - 1, hp.eval_seq_len, hp.eval_stride
    all_starts = sliding_window_starts(n, T, stride)
    lo, hi = _rank_share(len(all_starts), ctx)
    starts = all_starts[lo:hi]
    windows = _Windows([(starts, sliding_score_from(starts, T, stride))], SLIDING_BATCH_WINDOWS, T, ctx.device)
    sums = _ScoreSums(n, ctx.device, return_losses)
    progress = _Progress(label, len(windows.lo), t0, ctx)
    _score_batches(model, tokens, windows, range(len(windows.lo)), tables, sums, hp, ctx, on_batch=progress.tick)
    return _finish(sums, tokens, tables, label, counted, t0, ctx)


def _ttt_accumulate_grads(model, tokens, chunk: TTTChunk, hp: Hyperparameters, ctx: RunContext) -> None:
    """Backward of this rank's share of the chunk's mean CE. Each micro-batch's mean is weighted by its share of the
    chunk's sequences, so the sum over micro-batches and ranks is the chunk mean on any world size."""
    T = hp.eval_seq_len
    fn = _compiled(_train_loss, hp)
    lo, hi = _rank_share(chunk.train_seqs, ctx)
    model.train()
    for s0 in range(lo, hi, TTT_SEQS_PER_FORWARD):
        rows = min(TTT_SEQS_PER_FORWARD, hi - s0)
        a = chunk.train_start + s0 * T
        x, y = tokens[a:a + rows * T].view(rows, T), tokens[a + 1:a + 1 + rows * T].view(rows, T)
        with ctx.autocast(), sdpa_context():
            loss = fn(model, x, y)
        (loss * (rows / chunk.train_seqs)).backward()
    model.eval()


def _reduce_and_clip_grads(params: list[Tensor], max_norm: float, ctx: RunContext) -> None:
    """Sum the ranks' gradients in one collective over a flat fp32 buffer (one per tensor costs ~100 latencies per
    step), then clip by global norm as clip_grad_norm_ does."""
    grads = [p.grad for p in params]
    flat = _all_reduce(torch.cat([g.flatten().float() for g in grads]), ctx)
    if max_norm > 0:
        flat.mul_((max_norm / (flat.norm() + 1e-6)).clamp(max=1.0))
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def eval_val_ttt(model: nn.Module, val_tokens: Tensor, tables, hp: Hyperparameters, ctx: RunContext,
                 label: str | None = "quantized_ttt", counted: bool = True, return_losses: bool = False) -> EvalResult:
    """Legal score-first TTT (ANCHORS 6.1) over the sliding windows. Every window of a chunk is scored under no_grad
    before that chunk trains the model (SGD with momentum, TTT_EPOCHS steps, cosine lr over chunks, clipping,
    gradients summed over ranks). Trains `model` in place: pass a copy that is not needed afterwards."""
    t0 = _start_clock(model, hp, ctx)
    tokens, tables = _on_device(val_tokens, tables, ctx)
    n, T, stride = tokens.numel() - 1, hp.eval_seq_len, hp.eval_stride
    plan = ttt_plan(n, hp)
    all_starts = sliding_window_starts(n, T, stride)
    all_from = sliding_score_from(all_starts, T, stride)
    segments = []
    for chunk in plan:
        lo, hi = _rank_share(chunk.end_window - chunk.first_window, ctx)
        window_range = slice(chunk.first_window + lo, chunk.first_window + hi)
        segments.append((all_starts[window_range], all_from[window_range]))
    windows = _Windows(segments, SLIDING_BATCH_WINDOWS, T, ctx.device)
    sums = _ScoreSums(n, ctx.device, return_losses)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # persistent zero grads: ranks without sequences in a chunk still contribute to the all-reduce
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    if label:
        ctx.log(f"ttt:start chunks={len(plan)} ttt_lr={hp.ttt_lr} ttt_epochs={hp.ttt_epochs}")
    progress = _Progress(label, len(plan), t0, ctx)
    for chunk, (b0, b1) in zip(plan, windows.segments):
        _score_batches(model, tokens, windows, range(b0, b1), tables, sums, hp, ctx)  # weights of chunks < this one
        if chunk.train_seqs:
            for group in optimizer.param_groups:
                group["lr"] = _ttt_lr(hp, chunk.index, len(plan))
            for _ in range(hp.ttt_epochs):
                optimizer.zero_grad(set_to_none=False)
                _ttt_accumulate_grads(model, tokens, chunk, hp, ctx)
                _reduce_and_clip_grads(params, hp.ttt_grad_clip, ctx)
                optimizer.step()
        progress.tick(chunk.index + 1)
    for p in params:
        p.grad = None
    return _finish(sums, tokens, tables, label, counted, t0, ctx)


# --- phased LoRA TTT (ANCHORS 6.2) ------------------------------------------------------------------------------------
# Every document is scored on its own: its windows never reach outside it, and it has its own adapters, trained only
# on its own chunks after they were scored. Information passes between documents only from documents whose scoring
# has finished: the global phases train the base weights on them, and with TTT_WARM_START_A=1 a lane hands its
# adapters' A matrices (trained on the batch it just finished) to its next batch.
# The work is planned up front, with no communication: batches are dealt to TTT_LANES lanes (what each GPU of an
# 8-GPU run does, balanced by estimated cost), and lane l runs on rank l % world_size. So every world size computes
# what 8 GPUs compute, and every rank knows when a phase starts.

TTT_LANES = 8  # the largest world size (validate_hyperparameters: WORLD_SIZE divides 8)
LORA_TARGETS = ("q", "k", "v", "o", "mlp")  # adapted per virtual layer; plus one adapter on the logits
LORA_BETAS, LORA_EPS = (0.0, 0.999), 1e-10
FULL_VAL_TARGETS, FULL_SCALE_GPUS = 40_540_160, 8  # sp8192 validation set on a record machine (ANCHORS 2.4)


def document_starts(tokens: np.ndarray) -> np.ndarray:
    """First token of every document: each BOS, and position 0 whatever it holds, so that the documents tile all
    targets. A BOS as the stream's final token starts nothing: it is the previous document's last target."""
    bos = np.flatnonzero(tokens[:-1] == BOS_ID)
    return np.union1d([0], bos).astype(np.int64)


@dataclasses.dataclass
class LoRABatch:
    index: int  # position in ascending-length order; the global phases prefer low indices (short documents)
    docs: np.ndarray  # document ids, ascending length


@dataclasses.dataclass
class LoRASegment:
    """Batches scored between two phases, per lane in processing order; then SGD on global_docs (if any)."""
    lanes: list[list[LoRABatch]]
    scored_docs: int  # documents scored once this and all earlier segments are done
    global_docs: np.ndarray


@dataclasses.dataclass
class LoRAPlan:
    starts: np.ndarray  # document i predicts targets [starts[i], starts[i] + preds[i]), i.e. tokens up to and
    preds: np.ndarray  # including the next document's BOS
    batches: list[LoRABatch]
    segments: list[LoRASegment]
    boundaries: list[int]  # scored-document counts that start a phase


# Window lengths are padded to a multiple of this: on the GPU inductor specializes a dynamic-shape graph on whether a
# dimension is a multiple of 8 (aligned kernels), so an odd document length compiled new graphs on the eval clock.
LORA_LENGTH_ALIGN = 8


def lora_chunk_steps(preds: np.ndarray, hp: Hyperparameters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each chunk index of a batch (preds ascending): rows of the forward (the documents still running, at least
    2: one row would compile a second graph), its padded window length (a multiple of LORA_LENGTH_ALIGN, or
    EVAL_SEQ_LEN, and at least 2, likewise), and whether an adapter step follows (some document has a later chunk)."""
    C, T, longest = hp.ttt_chunk_size, hp.eval_seq_len, int(preds[-1])
    chunk_end = (np.arange(_ceil_div(longest, C)) + 1) * C
    running = len(preds) - np.searchsorted(preds, chunk_end - C, side="right")
    length = np.minimum(_ceil_div(np.minimum(chunk_end, longest), LORA_LENGTH_ALIGN) * LORA_LENGTH_ALIGN, T)
    return np.maximum(running, 2), np.maximum(length, 2), chunk_end < longest


def _lora_batch_cost(preds: np.ndarray, hp: Hyperparameters, step: float, per_token: float) -> float:
    rows, length, _ = lora_chunk_steps(preds, hp)
    return float(len(rows) * step + per_token * (rows * length).sum())


def lora_ttt_plan(starts: np.ndarray, n_targets: int, hp: Hyperparameters) -> LoRAPlan:
    """Sort documents by length, cut into TTT_BATCH_SIZE batches, process longest first. A phase starts once the
    documents scored reach a boundary (PREFIX_DOCS*k/NUM_PHASES; those not below the document count are dropped, and
    so is a phase with nothing left to score); it trains on the `boundary` scored documents that come first in
    ascending-length order. Within a segment, each batch goes to the lane with the least estimated work."""
    preds = np.diff(np.append(starts, n_targets))
    assert starts[0] == 0 and (preds > 0).all() and preds.sum() == n_targets  # documents tile the targets
    order = np.argsort(preds, kind="stable")
    N, C, phases = hp.ttt_batch_size, hp.ttt_chunk_size, hp.phased_ttt_num_phases
    batches = [LoRABatch(j, order[j * N:(j + 1) * N]) for j in range(_ceil_div(len(order), N))]
    bounds = sorted({hp.phased_ttt_prefix_docs * k // phases for k in range(1, phases + 1)}) if phases else []
    bounds = [b for b in bounds if 0 < b < len(starts)]
    todo = batches[::-1]
    segments, scored, used = [], [], []
    for boundary in bounds + [None]:
        segment = []
        while todo and (boundary is None or len(scored) < boundary):
            segment.append(todo.pop(0))
            scored.extend(range(segment[-1].index * N, segment[-1].index * N + len(segment[-1].docs)))
        if boundary is not None and not todo:
            boundary = None  # everything is scored: a phase would help nothing
        global_docs = order[np.sort(scored)[:boundary]] if boundary is not None else np.zeros(0, np.int64)
        lanes, load = [[] for _ in range(TTT_LANES)], [0.0] * TTT_LANES
        for batch in segment:
            lane = min(range(TTT_LANES), key=lambda i: (load[i], i))
            lanes[lane].append(batch)
            load[lane] += _lora_batch_cost(preds[batch.docs], hp, step=N * C, per_token=1.0)
        segments.append(LoRASegment(lanes, len(scored), global_docs))
        if boundary is not None:
            used.append(boundary)
        if not todo:
            break
    return LoRAPlan(starts, preds, batches, segments, used)


class BatchedLoRA(nn.Module):
    """fp32 adapters for TTT_BATCH_SIZE document slots: per virtual layer one for each of q, k, v, o, mlp, plus
    one for the logits. delta(u) = (u Aᵀ) Bᵀ · alpha/rank with A ~ U(±1/√in) and B = 0, so a reset adapter changes
    nothing. A forward of n rows uses the last n slots (a batch's documents sit at the end, longest last, and the
    documents still running are always a suffix)."""

    def __init__(self, model: GPT, hp: Hyperparameters, device):
        super().__init__()
        dim, r, N = hp.model_dim, hp.ttt_lora_rank, hp.ttt_batch_size
        layers = sum(len(part) for part in model.schedules[model.looping])
        kv = hp.num_kv_heads * (dim // hp.num_heads)
        outs = dict(zip(LORA_TARGETS, (dim, kv, kv, dim, dim)))
        self.A = nn.ParameterDict({t: nn.Parameter(torch.empty(layers, N, r, dim, device=device)) for t in outs})
        self.B = nn.ParameterDict({t: nn.Parameter(torch.zeros(layers, N, outs[t], r, device=device)) for t in outs})
        self.head_A = nn.Parameter(torch.empty(N, r, dim, device=device))
        self.head_B = nn.Parameter(torch.zeros(N, hp.vocab_size, r, device=device))
        self.scale, self.bound = hp.ttt_lora_alpha / r, dim ** -0.5

    @torch.no_grad()
    def reset(self, seed: int | None) -> None:
        """B to zero; A drawn from `seed`, or kept (seed None)."""
        for B in [*self.B.values(), self.head_B]:
            B.zero_()
        if seed is not None:
            generator = torch.Generator(device=self.head_A.device).manual_seed(seed)
            for A in [*self.A.values(), self.head_A]:
                A.uniform_(-self.bound, self.bound, generator=generator)

    def rows(self, n: int) -> "_LoRARows":
        return _LoRARows(self, n)


class LoRAAdapter:
    """One virtual layer's adapters for the rows of a forward: adapter(name, u) = (u Aᵀ) Bᵀ · alpha/rank with
    A[name] [rows, r, in] and B[name] [rows, out, r]. The tensors are attributes, not closure cells: a compiled block
    guards on their shapes only, so every layer's adapter runs the same graph."""

    def __init__(self, A: dict, B: dict, scale: float):
        self.A, self.B, self.scale = A, B, scale

    def __call__(self, name: str, u: Tensor) -> Tensor:
        return torch.bmm(torch.bmm(u, self.A[name].transpose(1, 2)), self.B[name].transpose(1, 2)) * self.scale


class _LoRARows:
    """The last n slots of a BatchedLoRA, in the interface GPT.hidden and GPT.logits take."""

    def __init__(self, lora: BatchedLoRA, n: int):
        self.lora, self.n = lora, n

    def layer(self, k: int) -> LoRAAdapter:
        n, lora = self.n, self.lora
        return LoRAAdapter({t: A[k, -n:] for t, A in lora.A.items()}, {t: B[k, -n:] for t, B in lora.B.items()},
                           lora.scale)

    def head(self, h: Tensor) -> Tensor:
        return LoRAAdapter({"head": self.lora.head_A[-self.n:]}, {"head": self.lora.head_B[-self.n:]},
                           self.lora.scale)("head", h)


def _lora_chunk_losses(model: GPT, lora: BatchedLoRA, x: Tensor, sel: Tensor, y_sel: Tensor,
                       regions: Regions = EAGER_REGIONS) -> Tensor:
    """fp32 CE at the window positions sel [rows, C] (a row's chunk is the end of its window): the LM head runs on
    those positions only, not on the whole window."""
    adapters = lora.rows(x.size(0))
    h = model.hidden(x, lora=adapters, regions=regions)
    h = h.gather(1, sel.unsqueeze(-1).expand(-1, -1, h.size(-1)))
    return F.cross_entropy(model.logits(h, adapters).flatten(0, 1), y_sel.flatten(), reduction="none").view_as(y_sel)


def _lora_sdpa_context():
    """cuDNN attention builds a plan for every new shape (tens of ms each), and the adapter steps run thousands of
    (rows, length) shapes: they use PyTorch's flash kernel instead, as with FA4 (causal_attention's many_shapes).
    FA3 and the CPU path are unchanged."""
    if ATTENTION_BACKEND in ("sdpa_cudnn", "fa4"):
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    return sdpa_context()


def _lora_optimizer(lora: BatchedLoRA, hp: Hyperparameters, ctx: RunContext) -> torch.optim.Optimizer:
    return torch.optim.AdamW(lora.parameters(), lr=hp.ttt_lora_lr, betas=LORA_BETAS, eps=LORA_EPS,
                             weight_decay=hp.ttt_weight_decay, fused=ctx.device.type == "cuda")


def _lora_step(model, lora, optimizer, tokens, slot_start, slot_preds, ci: int, rows: int, length: int,
               trains: bool, tables, sums: _ScoreSums, hp: Hyperparameters, ctx: RunContext) -> None:
    """Chunk ci of the last `rows` slots: one forward over each document's window (its last <= EVAL_SEQ_LEN tokens
    up to the chunk's end, right-padded with zeros), the chunk's predictions scored, then, if `trains`, one AdamW
    step on the same forward: the mean CE of each document's chunk, summed over documents that have a later chunk.
    Everything here is computed on the device from the slots' (start, predictions); no host round trip."""
    C, T, device = hp.ttt_chunk_size, hp.eval_seq_len, tokens.device
    start, preds = slot_start[-rows:], slot_preds[-rows:]
    lo = ci * C
    end = torch.where(preds > lo, preds.clamp(max=lo + C), 0)  # rows without this chunk get an empty window
    first = (end - T).clamp(min=0)
    width = end - first
    pos = torch.arange(length, device=device)
    target = start[:, None] + first[:, None] + pos  # window position p predicts stream token target + 1
    inside = pos < width[:, None]
    x = torch.where(inside, tokens[target.clamp(max=tokens.numel() - 2)], 0)
    y = torch.where(inside, tokens[(target + 1).clamp(max=tokens.numel() - 1)], 0)
    count = (end - lo).clamp(min=0)  # this chunk's predictions per row: the last `count` window positions
    sel = (width[:, None] - C + torch.arange(C, device=device)).clamp(min=0)
    scored = torch.arange(C, device=device) >= (C - count)[:, None]
    x_sel, y_sel = x.gather(1, sel), y.gather(1, sel)
    with ctx.autocast(), _lora_sdpa_context():
        ce = _compiled(_lora_chunk_losses, hp, dynamic=True)(model, lora, x, sel, y_sel)
    tgt = target.gather(1, sel)  # a byte sidecar is read at the target token's own stream position, tgt + 1
    sums.add(ce.detach(), scored, tgt, count_target_bytes(x_sel, y_sel, tables,
                                                          (tgt + 1).clamp(max=tokens.numel() - 1)))  # score first
    if trains:
        weight = scored * ((preds > lo + C) / count.clamp(min=1))[:, None]
        (ce * weight).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _lora_batch(model, lora, tokens, slot_start, slot_preds, preds: np.ndarray, tables, sums: _ScoreSums,
                hp: Hyperparameters, ctx: RunContext) -> None:
    """One batch (its documents' predictions `preds`, ascending), chunk by chunk, with fresh optimizer state."""
    optimizer = _lora_optimizer(lora, hp, ctx)
    for ci, (rows, length, trains) in enumerate(zip(*lora_chunk_steps(preds, hp))):
        _lora_step(model, lora, optimizer, tokens, slot_start, slot_preds, ci, int(rows), int(length), bool(trains),
                   tables, sums, hp, ctx)


def _lora_seed(hp: Hyperparameters, *key: int) -> int:
    return int(np.random.SeedSequence([hp.seed, *key]).generate_state(1)[0])


def _batch_slots(plan: LoRAPlan, hp: Hyperparameters, device) -> tuple[Tensor, Tensor]:
    """[batches, TTT_BATCH_SIZE] document starts and predictions, each batch's documents in its last slots (empty
    slots predict nothing); uploaded once."""
    N = hp.ttt_batch_size
    start, preds = np.zeros((len(plan.batches), N), np.int64), np.zeros((len(plan.batches), N), np.int64)
    for b in plan.batches:
        start[b.index, N - len(b.docs):], preds[b.index, N - len(b.docs):] = plan.starts[b.docs], plan.preds[b.docs]
    return torch.from_numpy(start).to(device), torch.from_numpy(preds).to(device)


def _global_chunks(n_tokens: int, hp: Hyperparameters) -> tuple[int, int]:
    """(chunks trained, sequences per chunk) of a phase over n_tokens tokens: TTT_CHUNK_TOKENS chunks of whole
    EVAL_SEQ_LEN sequences, the last chunk not trained on (as in the record)."""
    per_chunk = max(1, hp.ttt_chunk_tokens // hp.eval_seq_len)
    return max(_ceil_div((n_tokens - 1) // hp.eval_seq_len, per_chunk) - 1, 0), per_chunk


def _global_sgd(model: GPT, tokens: Tensor, plan: LoRAPlan, docs: np.ndarray, hp: Hyperparameters,
                ctx: RunContext) -> int:
    """A phase: SGD of all base weights on scored documents, concatenated (each with its final target token),
    cosine lr over the chunks, each chunk's sequences split over ranks and the gradients summed (the chunk mean)
    and clipped, as in score-first TTT. Returns the number of chunks trained."""
    T = hp.eval_seq_len
    index = np.concatenate([np.arange(s, s + p + 1) for s, p in zip(plan.starts[docs], plan.preds[docs])])
    stream = tokens[torch.from_numpy(index).to(tokens.device)]
    n_chunks, per_chunk = _global_chunks(len(index), hp)
    params = list(model.parameters())
    model.requires_grad_(True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.SGD(params, lr=hp.global_ttt_lr, momentum=hp.ttt_momentum)
    for c in range(n_chunks):  # cosine over all chunks, the untrained last one included, as in the record
        for group in optimizer.param_groups:
            group["lr"] = hp.global_ttt_lr * 0.5 * (1.0 + math.cos(math.pi * c / n_chunks))
        optimizer.zero_grad(set_to_none=False)
        _ttt_accumulate_grads(model, stream, TTTChunk(c, 0, 0, c * per_chunk * T, per_chunk), hp, ctx)
        _reduce_and_clip_grads(params, hp.ttt_grad_clip, ctx)
        optimizer.step()
    for p in params:
        p.grad = None
    model.requires_grad_(False)
    return n_chunks


def _sums_now(sums: _ScoreSums) -> list[float]:
    return torch.stack([sums.loss, sums.tokens.double(), sums.bytes.double()]).tolist()


def _log_lora_batch(batch: LoRABatch, plan: LoRAPlan, before: list[float], after: list[float], after_phase: bool,
                    elapsed: float, ctx: RunContext) -> None:
    """The record's `ttp:` line: this batch's and this rank's running loss and bpb, document lengths in tokens."""
    (loss0, tokens0, bytes0), (loss, tokens, nbytes) = before, after
    preds = plan.preds[batch.docs]
    ctx.log(f"ttp: b{batch.index + 1}/{len(plan.batches)} bl:{(loss - loss0) / max(tokens - tokens0, 1):.4f} "
            f"bb:{(loss - loss0) / (math.log(2) * max(nbytes - bytes0, 1)):.4f} rl:{loss / max(tokens, 1):.4f} "
            f"rb:{loss / (math.log(2) * max(nbytes, 1)):.4f} dl:{preds[0] + 1}-{preds[-1] + 1} gd:{int(after_phase)} "
            f"t:{elapsed:.1f}s")


def eval_val_lora_ttt(model: GPT, val_tokens: Tensor, tables, hp: Hyperparameters, ctx: RunContext,
                      label: str | None = "quantized_ttt_phased", counted: bool = True,
                      return_losses: bool = False) -> EvalResult:
    """Phased, document-independent LoRA TTT (ANCHORS 6.2) following lora_ttt_plan. The base weights are frozen
    except in the global phases. Trains `model` in place: pass a copy that is not needed afterwards."""
    graphs = compiled_graph_count()  # to report a compile on the clock
    t0 = _start_clock(model, hp, ctx)
    tokens, tables = _on_device(val_tokens, tables, ctx)
    n = tokens.numel() - 1
    plan = lora_ttt_plan(document_starts(val_tokens.cpu().numpy()), n, hp)
    slot_start, slot_preds = _batch_slots(plan, hp, ctx.device)
    sums = _ScoreSums(n, ctx.device, return_losses)
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    lora = BatchedLoRA(model, hp, ctx.device)
    phases, verbose = len(plan.boundaries), bool(label) and ctx.is_main
    prefix = plan.boundaries[-1] if phases else 0
    if label:
        docs = len(plan.starts)
        ctx.log(f"ttt_phased: total_docs:{docs} prefix_docs:{prefix} suffix_docs:{docs - prefix} "
                f"num_phases:{phases} boundaries:{plan.boundaries} batches:{len(plan.batches)} lanes:{TTT_LANES} "
                f"lora_rank:{hp.ttt_lora_rank} chunk:{hp.ttt_chunk_size} lora_lr:{hp.ttt_lora_lr} "
                f"global_lr:{hp.global_ttt_lr}")
    for k, segment in enumerate(plan.segments):
        for lane in range(ctx.rank, TTT_LANES, ctx.world_size):
            for i, batch in enumerate(segment.lanes[lane]):
                lora.reset(_lora_seed(hp, k, batch.index) if i == 0 or not hp.ttt_warm_start_a else None)
                before = _sums_now(sums) if verbose else None
                _lora_batch(model, lora, tokens, slot_start[batch.index], slot_preds[batch.index],
                            plan.preds[batch.docs], tables, sums, hp, ctx)
                if verbose:  # this rank's batches only; one device sync per batch
                    _log_lora_batch(batch, plan, before, _sums_now(sums), k > 0, time.perf_counter() - t0, ctx)
        if len(segment.global_docs):
            if label:
                ctx.log(f"ttpp: phase:{k + 1}/{phases} pd:{segment.scored_docs} gd:{len(segment.global_docs)} "
                        f"t:{time.perf_counter() - t0:.1f}s")
            chunks = _global_sgd(model, tokens, plan, segment.global_docs, hp, ctx)
            if label:
                ctx.log(f"tttg: chunks:{chunks} lr:{hp.global_ttt_lr} t:{time.perf_counter() - t0:.1f}s")
                ctx.log(f"ttpr: phase:{k + 1}/{phases} t:{time.perf_counter() - t0:.1f}s")
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
    compiled = compiled_graph_count() - graphs
    if label and compiled:
        ctx.log(f"WARNING ttt_phased: {compiled} graph(s) compiled on the eval clock; eval_warmup should have "
                "compiled them all (a shape specialization: please report)")
    return _finish(sums, tokens, tables, label, counted, t0, ctx)


def _mean_seconds(fn, ctx: RunContext, repeats: int = 2) -> float:
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    ctx.sync()
    return (time.perf_counter() - t0) / repeats


def eval_warmup(model: nn.Module, hp: Hyperparameters, ctx: RunContext) -> EvalTimings:
    """Compile every shape the evaluations use, then time steady-state steps for log_eval_projection. Random tokens
    only, never validation tokens; no optimizer step on the model (lora_phased steps a throwaway adapter set), so
    the weights are untouched. Not on the eval clock. Set the model's mode (looping) first: the graphs are
    specialized to it."""
    t0 = time.perf_counter()
    device, T, stride, B = ctx.device, hp.eval_seq_len, hp.eval_stride, SLIDING_BATCH_WINDOWS
    rows = _plain_batch_rows(hp)
    typical_chunk_seqs = hp.ttt_chunk_tokens // T if hp.ttt_enabled else 0
    # Long enough for one plain batch, two sliding batches (the first scores from 0, later ones from T - stride)
    # and one typical TTT chunk.
    n = max(rows * T, 2 * B * stride + T, typical_chunk_seqs * T)
    generator = torch.Generator().manual_seed(hp.seed)
    tokens = torch.randint(0, hp.vocab_size, (n + 1,), generator=generator).to(device)
    tables = (torch.zeros(hp.vocab_size, dtype=torch.int16, device=device),
              torch.zeros(hp.vocab_size, dtype=torch.bool, device=device),
              torch.zeros(hp.vocab_size, dtype=torch.bool, device=device))
    sums = _ScoreSums(n, device, keep_losses=False)
    plain_starts = np.arange(rows, dtype=np.int64) * T
    plain = _Windows([(plain_starts, np.zeros_like(plain_starts))], rows, T, device)
    slide_starts = sliding_window_starts(n, T, stride)[:2 * B]
    slide = _Windows([(slide_starts, sliding_score_from(slide_starts, T, stride))], B, T, device)

    def score(windows, batches):
        return lambda: _score_batches(model, tokens, windows, batches, tables, sums, hp, ctx)

    score(slide, range(len(slide.lo)))()
    sliding_batch = _mean_seconds(score(slide, range(len(slide.lo) - 1, len(slide.lo))), ctx)
    score(plain, range(1))()
    plain_batch = _mean_seconds(score(plain, range(1)), ctx)
    ttt_step = 0.0
    if typical_chunk_seqs:
        params = [p for p in model.parameters() if p.requires_grad]
        chunk = TTTChunk(0, 0, 0, 0, typical_chunk_seqs)
        for p in params:
            p.grad = torch.zeros_like(p)

        def ttt_epoch():  # as in eval_val_ttt, without the optimizer step
            for p in params:
                p.grad.zero_()
            _ttt_accumulate_grads(model, tokens, chunk, hp, ctx)
            _reduce_and_clip_grads(params, hp.ttt_grad_clip, ctx)

        ttt_epoch()
        ttt_step = _mean_seconds(ttt_epoch, ctx)
        for p in params:
            p.grad = None
    lora_short = lora_long = 0.0
    if hp.ttt_enabled and hp.ttt_mode == "lora_phased":
        lora_short, lora_long = _lora_warmup(model, hp, ctx, generator)
    model.eval()
    timings = EvalTimings(time.perf_counter() - t0, plain_batch, sliding_batch, ttt_step, lora_short, lora_long)
    lora = (f" lora_step:{1000 * lora_short:.1f}ms@{hp.ttt_batch_size}x{max(hp.ttt_chunk_size, 2)} "
            f"{1000 * lora_long:.1f}ms@{hp.ttt_batch_size}x{T}" if lora_long else "")
    ctx.log(f"eval_warmup: compiled and timed on random tokens (no validation data) in {timings.warmup_seconds:.1f}s, "
            f"not on the eval clock; plain_batch:{1000 * plain_batch:.1f}ms sliding_batch:{1000 * sliding_batch:.1f}ms "
            f"ttt_step:{1000 * ttt_step:.1f}ms" + lora)
    return timings


def _lora_warmup(model: GPT, hp: Hyperparameters, ctx: RunContext, generator) -> tuple[float, float]:
    """Compile the adapter step (graphs with dynamic shapes for every row count >= 2 and window length), then
    time it on a full batch at window TTT_CHUNK_SIZE and at window EVAL_SEQ_LEN. Random tokens and a throwaway
    adapter set; the base weights are frozen meanwhile, as in eval_val_lora_ttt (the graph depends on that)."""
    N, C, T, device = hp.ttt_batch_size, hp.ttt_chunk_size, hp.eval_seq_len, ctx.device
    P = T + 2 * C  # a full window with a later chunk
    tokens = torch.randint(0, hp.vocab_size, (N * P + 1,), generator=generator).to(device)
    tables = (torch.zeros(hp.vocab_size, dtype=torch.int16, device=device),
              torch.zeros(hp.vocab_size, dtype=torch.bool, device=device),
              torch.zeros(hp.vocab_size, dtype=torch.bool, device=device))
    slot_start = torch.arange(N, device=device) * P
    slot_preds = torch.full((N,), P, device=device)
    rows, length, trains = lora_chunk_steps(np.full(N, P), hp)
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    lora = BatchedLoRA(model, hp, device)
    lora.reset(hp.seed)
    optimizer = _lora_optimizer(lora, hp, ctx)
    sums = _ScoreSums(N * P, device, keep_losses=False)

    def step(ci: int, n_rows: int | None = None):
        return lambda: _lora_step(model, lora, optimizer, tokens, slot_start, slot_preds, ci, n_rows or int(rows[ci]),
                                  int(length[ci]), bool(trains[ci]), tables, sums, hp, ctx)

    full = _ceil_div(T, C) - 1  # the first chunk whose window is EVAL_SEQ_LEN long
    for warm in (step(full), step(0), step(1, 2)):  # the last: a shape unlike the others, to catch specialization
        warm()
    short, long = _mean_seconds(step(0), ctx), _mean_seconds(step(full), ctx)
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
    return short, long


def _lora_plan_seconds(plan: LoRAPlan, timings: EvalTimings, hp: Hyperparameters, world: int,
                       share: float) -> float:
    """Per segment the slowest rank's batches, an adapter step costing a + b*rows*length (fitted to eval_warmup's
    two timings), plus the phase's SGD chunks at `share` times the measured TTT step."""
    N, short_len = hp.ttt_batch_size, max(hp.ttt_chunk_size, 2)
    per_token = max(timings.lora_step_long - timings.lora_step_short, 0.0) / (N * max(hp.eval_seq_len - short_len, 1))
    step = max(timings.lora_step_short - per_token * N * short_len, 0.0)
    total = 0.0
    for segment in plan.segments:
        loads = [0.0] * world
        for lane, batches in enumerate(segment.lanes):
            loads[lane % world] += sum(_lora_batch_cost(plan.preds[b.docs], hp, step, per_token) for b in batches)
        total += max(loads)
        if len(segment.global_docs):
            total += _global_chunks(int((plan.preds[segment.global_docs] + 1).sum()), hp)[0] * timings.ttt_step * share
    return total


def _projected_seconds(n_targets: int, starts: np.ndarray, timings: EvalTimings, hp: Hyperparameters, world: int,
                       measured_world: int) -> tuple[float, float]:
    """(sliding, TTT) seconds on `world` GPUs from step times measured on `measured_world` GPUs: scoring batches
    keep their size; a TTT training step's share of a chunk shrinks with the GPU count."""
    T, stride, B, share = hp.eval_seq_len, hp.eval_stride, SLIDING_BATCH_WINDOWS, measured_world / world
    sliding = ttt = 0.0
    if hp.sliding_window_enabled:
        windows = len(sliding_window_starts(n_targets, T, stride))
        sliding = _ceil_div(_ceil_div(windows, world), B) * timings.sliding_batch
    if hp.ttt_enabled and hp.ttt_mode == "lora_phased":
        ttt = _lora_plan_seconds(lora_ttt_plan(starts, n_targets, hp), timings, hp, world, share)
    elif hp.ttt_enabled:
        for chunk in ttt_plan(n_targets, hp):
            batches = _ceil_div(_ceil_div(chunk.end_window - chunk.first_window, world), B)
            ttt += batches * timings.sliding_batch
            ttt += hp.ttt_epochs * timings.ttt_step * share if chunk.train_seqs else 0.0
    return sliding, ttt


def _full_scale(starts: np.ndarray, n_targets: int) -> tuple[np.ndarray, int]:
    """This stream's documents repeated to about the size of the full validation set: (starts, targets)."""
    preds = np.tile(np.diff(np.append(starts, n_targets)), max(1, round(FULL_VAL_TARGETS / n_targets)))
    return np.concatenate([[0], np.cumsum(preds)[:-1]]), int(preds.sum())


def _warn_over_budget(what: str, total: float, sliding: float, ttt: float, hp: Hyperparameters,
                      ctx: RunContext) -> None:
    budget = hp.eval_budget_seconds
    if total <= budget:
        return
    advice = []
    if hp.sliding_window_enabled and hp.ttt_enabled:
        advice.append(f"SLIDING_WINDOW_ENABLED=0 (the TTT score is the one reported; saves ~{sliding:.0f}s)")
    if hp.sliding_window_enabled or (hp.ttt_enabled and hp.ttt_mode == "score_first"):  # what the stride drives
        advice.append(f"a larger EVAL_STRIDE (now {hp.eval_stride}; window cost scales with 1/stride)")
    if hp.ttt_enabled and hp.ttt_mode == "lora_phased":
        advice += [f"a larger TTT_CHUNK_SIZE (now {hp.ttt_chunk_size}; fewer adapter steps)",
                   f"fewer PHASED_TTT_NUM_PHASES (now {hp.phased_ttt_num_phases})"]
    elif hp.ttt_enabled:
        advice.append(f"fewer TTT_EPOCHS (now {hp.ttt_epochs})")
    if hp.ttt_enabled:
        advice.append(f"TTT_ENABLED=0 (saves ~{ttt:.0f}s)")
    ctx.log("!" * 100 + f"\nWARNING {what}: ~{total:.0f}s exceeds EVAL_BUDGET_SECONDS={budget:.0f}s by "
            f"~{total - budget:.0f}s. Set " + ", or ".join(advice) + "\n" + "!" * 100)


def log_eval_projection(n_targets: int, timings: EvalTimings, hp: Hyperparameters, ctx: RunContext,
                        val_tokens: Tensor | None = None) -> float:
    """Project the phases still to come (sliding if enabled, TTT if enabled) from eval_warmup's step times times the
    batches, chunks and adapter steps a rank will run; add the time already counted; warn loudly over budget. Then
    the same for the full validation set on 8 GPUs (lora_phased: this stream's documents, repeated), so a run on
    one GPU and a part of the set tells whether the record setting fits. val_tokens: the stream (lora_phased needs
    its documents; without it the stream counts as one document)."""
    W = ctx.world_size
    starts = document_starts(val_tokens.cpu().numpy()) if val_tokens is not None else np.zeros(1, np.int64)
    sliding, ttt = _projected_seconds(n_targets, starts, timings, hp, W, W)
    total = ctx.counted_eval_seconds + sliding + ttt
    budget = hp.eval_budget_seconds
    ctx.log(f"eval_projection: sliding ~{sliding:.0f}s ttt ~{ttt:.0f}s total ~{total:.0f}s budget {budget:.0f}s")
    _warn_over_budget("eval_projection", total, sliding, ttt, hp, ctx)
    full_starts, n_full = _full_scale(starts, n_targets)
    f_sliding, f_ttt = _projected_seconds(n_full, full_starts, timings, hp, FULL_SCALE_GPUS, W)
    f_counted = ctx.counted_eval_seconds * n_full / n_targets * W / FULL_SCALE_GPUS
    f_total = f_counted + f_sliding + f_ttt
    mode = hp.ttt_mode if hp.ttt_enabled else "off"
    ctx.log(f"eval_projection_full_scale: targets:{n_full} gpus:{FULL_SCALE_GPUS} counted ~{f_counted:.0f}s sliding "
            f"~{f_sliding:.0f}s ttt({mode}) ~{f_ttt:.0f}s total ~{f_total:.0f}s budget {budget:.0f}s")
    _warn_over_budget("eval_projection_full_scale", f_total, f_sliding, f_ttt, hp, ctx)
    return total


def log_eval_summary(results: list[EvalResult], hp: Hyperparameters, ctx: RunContext,
                     timings: EvalTimings | None = None) -> float:
    """One line with every phase's time; the budget applies to the counted total."""
    def name(r):
        return (r.label or "unlabelled").replace(" ", "_")

    counted = " ".join(f"{name(r)}:{r.seconds:.1f}s" for r in results if r.counted)
    uncounted = [f"{name(r)}:{r.seconds:.1f}s" for r in results if not r.counted]
    if timings is not None:
        uncounted.insert(0, f"eval_warmup:{timings.warmup_seconds:.1f}s")
    total = ctx.counted_eval_seconds
    ctx.log(f"eval_summary: {counted} total_eval_time:{total:.1f}s budget:{hp.eval_budget_seconds:.0f}s "
            f"(not counted: {' '.join(uncounted) or 'nothing'})")
    if total > hp.eval_budget_seconds:
        ctx.log(f"WARNING eval_summary: counted evaluation took {total:.1f}s, over EVAL_BUDGET_SECONDS="
                f"{hp.eval_budget_seconds:.0f}s; see the eval_projection advice")
    return total


# =====================================================================================================
# 8. Main
# =====================================================================================================

def caseops_reason(sp, hp: Hyperparameters) -> str | None:
    """Why val_bpb needs the byte sidecar, if it does: the piece table counts an operator piece as 3 bytes of text
    that the original never had, and cannot see escapes."""
    if caseops_operator_ids(sp):
        return (f"the tokenizer {hp.tokenizer_path} has the CaseOps operator pieces U+E001..U+E004, whose original "
                "bytes its piece table cannot give")
    return None


def data_fingerprint(train_files: list[str], val_files: list[str]) -> dict:
    """The shards a run read, by names and sizes (no reads), for summary.json: the records tooling checks that every
    seed had the same data, where DATA_PATH itself may differ between machines."""
    def digest(files):
        lines = sorted(f"{Path(f).name}:{os.path.getsize(f)}\n" for f in files)
        return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]

    return dict(train_shards=len(train_files), train=digest(train_files), val=digest(val_files))


def prepare_data(hp: Hyperparameters, ctx_rank: int):
    """Find and check shards and tokenizer before any GPU work; make the smoke data if asked to."""
    if hp.smoke and "DATA_PATH" not in os.environ and "DATA_DIR" not in os.environ:
        root = os.path.join(tempfile.gettempdir(), "parameter_golf_smoke")
        done = os.path.join(root, f"smoke_sp{hp.vocab_size}", "fineweb_val_000000.bin")
        if ctx_rank == 0:
            make_smoke_data(root, hp.vocab_size)
        while not os.path.exists(done):  # other ranks wait for rank 0 (no process group exists yet)
            time.sleep(0.2)
        hp.data_path = os.path.join(root, f"smoke_sp{hp.vocab_size}")
        hp.tokenizer_path = os.path.join(root, f"smoke_{hp.vocab_size}.model")
        hp.val_files = os.path.join(hp.data_path, "fineweb_val_*.bin")
    train_files = find_shards(os.path.join(hp.data_path, "fineweb_train_*.bin"), "training", hp.vocab_size)
    val_files = find_shards(hp.val_files, "validation", hp.vocab_size)
    sp = load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    by_bos = [f for f, on in (("DOC_ISOLATED_ATTN=1", hp.doc_isolated_attn),
                              ("TTT_MODE=lora_phased", hp.ttt_enabled and hp.ttt_mode == "lora_phased")) if on]
    if by_bos and sp.bos_id() != BOS_ID:  # else the whole stream would be one document
        raise SystemExit(f"tokenizer error: {hp.tokenizer_path} has bos_id {sp.bos_id()}, but {' and '.join(by_bos)} "
                         f"find documents by BOS id {BOS_ID} (the challenge recipe); use such a tokenizer, or set "
                         "DOC_ISOLATED_ATTN=0 / TTT_MODE=score_first")
    val_tokens = load_validation_tokens(val_files, hp.eval_seq_len)
    tables = ByteTables(*(torch.from_numpy(t) for t in build_byte_tables(sp, hp.vocab_size)),
                        sidecar=load_validation_bytes(val_files, val_tokens.numel(), caseops_reason(sp, hp)))
    for what, toks in (("validation", val_tokens.numpy()), (f"training ({train_files[0]})", read_shard(train_files[0]))):
        top = int(np.max(toks))
        if top >= hp.vocab_size:
            raise SystemExit(f"data error: {what} tokens go up to id {top} but VOCAB_SIZE={hp.vocab_size}: the shards "
                             "were made with another tokenizer; set VOCAB_SIZE/TOKENIZER_PATH/DATA_PATH consistently")
    if tables.sidecar is not None and bool((tables.sidecar[tables.boundary[val_tokens]] != 0).any()):
        raise SystemExit(f"data error: the byte sidecars of {hp.val_files} credit bytes to BOS/control tokens, so they "
                         "do not line up with the tokens; rebuild them with data/build_shards.py --caseops")
    return train_files, val_files, val_tokens, tables


def setup_distributed() -> RunContext:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return RunContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def log_compile_cache(hp: Hyperparameters, ctx: RunContext) -> None:
    """Where inductor keeps its on-disk caches (FX graphs, AOTAutograd, autotuning, Triton kernels): a second run on
    the same machine finds its graphs there and starts faster (README: compile cache)."""
    if not hp.compile:
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        path = cache_dir()  # TORCHINDUCTOR_CACHE_DIR, else /tmp/torchinductor_<user>
    except ImportError:
        path = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_<user>")
    state = "warm" if os.path.isdir(path) and any(os.scandir(path)) else "empty"
    ctx.log(f"compile_cache: {path} ({state}; TORCHINDUCTOR_CACHE_DIR moves it) "
            f"fx_graph_cache:{int(torch._inductor.config.fx_graph_cache)} "
            f"autograd_cache:{int(torch._functorch.config.enable_autograd_cache)}")


def log_bytecode_cache(ctx: RunContext) -> None:
    kept = BYTECODE_CACHE
    if kept and kept.compiled_s is None:
        ctx.log(f"python_bytecode: torch has none beside its sources; found in {kept.folder} (PYTHONPYCACHEPREFIX; "
                "README: compile cache)")
    elif kept:
        ctx.log(f"python_bytecode: torch had no compiled bytecode; compiled torch, Triton and SymPy into {kept.folder} "
                f"in {kept.compiled_s:.1f}s (PYTHONPYCACHEPREFIX; README: compile cache)")
    elif not bytecode_cached(torch.__file__):
        ctx.log("python_bytecode: WARNING torch has no compiled bytecode and the cache folder is not writable, so every "
                "process compiles torch's sources (~16 s of the cold start on an H100 host); set PYTHONPYCACHEPREFIX "
                "to a writable folder (README: compile cache)")


def dry_run(hp: Hyperparameters) -> None:
    with torch.device("meta"):
        model = GPT(hp)
    print(format_hyperparameters(hp))
    print(f"model_params:{sum(p.numel() for p in model.parameters())}")
    enc, dec = model.schedules[hp.num_loops > 0]
    print(f"layer_schedule: encoder:{enc} decoder:{dec}")
    print("dry_run: configuration valid; exiting before data and GPU")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def calibration_batches(hp: Hyperparameters, ctx: RunContext, train_files: list[str], n: int, micro_seqs: int):
    """Training batches for the GPTQ Hessians (never validation data), from a loader of their own."""
    loader = ShuffledSequenceLoader(train_files, hp.train_seq_len, hp.seed + 1, ctx.rank, ctx.world_size, ctx.device)
    return [loader.next_batch(micro_seqs) for _ in range(n)]


def calibration_batches_per_rank(hp: Hyperparameters, ctx: RunContext) -> int:
    """GPTQ_CALIBRATION_BATCHES is the total: the Hessians are averaged over ranks, so each rank does its share."""
    return -(-hp.gptq_calibration_batches // ctx.world_size)


def measure_gptq_reserve(hp: Hyperparameters, ctx: RunContext, model: GPT, train_files, micro_seqs: int) -> float:
    """Seconds to reserve for Hessian collection: one calibration batch timed (after one untimed), times the count.

    Calibration reads training data, so it counts against the training budget; measuring it replaces the records'
    hand-set guess (12 s) and adapts to the GPU count, the batch size and GPTQ_CALIBRATION_BATCHES.
    """
    if hp.gptq_reserve_seconds >= 0:
        ctx.log(f"gptq:reserve set by GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds:.1f}s")
        return hp.gptq_reserve_seconds
    looping, model.looping = model.looping, hp.num_loops > 0
    batches = calibration_batches(hp, ctx, train_files, 2, micro_seqs)
    collect_hessians(model, batches[:1])
    _, per_batch = collect_hessians(model, batches[1:])
    model.looping = looping
    n = calibration_batches_per_rank(hp, ctx)
    reserve = 1.15 * per_batch * n + 1.0  # 15% + 1 s for loader and all-reduce jitter
    ctx.log(f"gptq:measured {per_batch:.3f}s per calibration batch x {n} batches per rank")
    return all_reduce_max(ctx, reserve)


def load_quantized_model(hp: Hyperparameters, ctx: RunContext, path: str) -> GPT:
    """A fresh model with the artifact's dequantized weights, looping on (all evaluations run looped)."""
    tensors, meta = load_artifact(path)
    model = build_model(hp, ctx.device)
    model.load_state_dict(dequantize_state_dict(tensors, meta, model.state_dict()))
    model.looping = hp.num_loops > 0
    return model


def evaluate_artifact(hp: Hyperparameters, ctx: RunContext, path: str, val_tokens, tables, summary: dict) -> None:
    """Quantized, sliding-window and TTT (TTT_MODE: score-first or phased LoRA) evaluations of the artifact, TTT on
    a fresh copy."""
    results = []

    def record(r: EvalResult) -> None:  # into summary.json at once: a later evaluation that fails loses nothing
        results.append(r)
        summary["evals"][r.label] = dict(val_loss=r.val_loss, val_bpb=r.val_bpb, eval_time_s=r.seconds,
                                         val_tokens=r.tokens, val_bytes=r.bytes, expected_tokens=r.expected_tokens,
                                         covered=r.covered)
        write_summary(hp, ctx, summary)

    model = load_quantized_model(hp, ctx, path)
    timings = eval_warmup(model, hp, ctx)
    record(eval_val(model, val_tokens, tables, hp, ctx, label="quantized"))
    log_eval_projection(val_tokens.numel() - 1, timings, hp, ctx, val_tokens)
    if hp.sliding_window_enabled:
        record(eval_val_sliding(model, val_tokens, tables, hp, ctx, label="quantized_sliding_window"))
    if hp.ttt_enabled:
        del model
        model = load_quantized_model(hp, ctx, path)
        if hp.ttt_mode == "lora_phased":
            record(eval_val_lora_ttt(model, val_tokens, tables, hp, ctx, label="quantized_ttt_phased"))
        else:
            record(eval_val_ttt(model, val_tokens, tables, hp, ctx, label="quantized_ttt"))
    summary["eval_time_s"] = log_eval_summary(results, hp, ctx, timings)
    final = results[-1]
    summary.update(final_label=final.label, val_loss=final.val_loss, val_bpb=final.val_bpb,
                   ttt=dict(mode=hp.ttt_mode if hp.ttt_enabled else "off", score_before_update=True))


def write_summary(hp: Hyperparameters, ctx: RunContext, summary: dict) -> None:
    if ctx.is_main:
        atomic_write_bytes(os.path.join(hp.artifact_dir, "summary.json"), json.dumps(summary, indent=2).encode())


def train_and_quantize(hp, ctx, train_files, val_tokens, tables, script, artifact_path, summary) -> None:
    seed_everything(hp.seed)
    model = build_model(hp, ctx.device)
    ctx.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    trainer = Trainer(hp, ctx, model, train_files)
    ctx.log(f"grad_accum_steps:{trainer.grad_accum} micro_batch_seqs:{trainer.micro_seqs}")
    STARTUP.mark("model")
    t_warm = time.perf_counter()
    graphs = trainer.compile_warmup()
    STARTUP.mark("compile_warmup")
    ctx.log(f"compile_warmup: {time.perf_counter() - t_warm:.1f}s graphs per phase (plain, looped): {graphs} "
            f"COMPILE={hp.compile} COMPILE_SCOPE={hp.compile_scope}")
    warmup_report = kernel_warmup_report()
    if warmup_report:
        ctx.log(warmup_report)
    reserve_s = measure_gptq_reserve(hp, ctx, model, train_files, trainer.micro_seqs)
    STARTUP.mark("gptq_reserve")
    budget_ms = hp.max_wallclock_seconds * 1000 - reserve_s * 1000 if hp.max_wallclock_seconds > 0 else 0.0
    ctx.log(f"gptq:reserving {reserve_s:.1f}s, effective={budget_ms:.0f}ms")
    if hp.max_wallclock_seconds > 0 and budget_ms <= 0:  # train() would read a budget <= 0 as "no cap"
        raise SystemExit(f"config error: the measured GPTQ reserve of {reserve_s:.1f}s leaves no training time in "
                         f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}; raise it or lower "
                         "GPTQ_CALIBRATION_BATCHES")

    stop = {}  # the last validate call is the final validation, which train() runs right after its loop stops

    def validate(step: int, train_ms: float):
        stop["t"] = time.perf_counter()
        r = eval_val(model, val_tokens, tables, hp, ctx, label=None, counted=False)
        ctx.log(f"{step}/{hp.iterations} val_loss: {r.val_loss:.4f} val_bpb: {r.val_bpb:.4f}")
        ctx.metric(event="val", step=step, val_loss=r.val_loss, val_bpb=r.val_bpb, train_time_ms=train_ms)

    ctx.log(f"startup: {STARTUP.line()}")
    ctx.log(f"training_start: {STARTUP.last - PROCESS_START:.1f}s after launch")
    stats = train(hp, ctx, trainer, budget_ms, validate)
    trained_t = time.perf_counter()
    if ctx.is_main:  # the pre-quantization (EMA) model is kept whatever happens next
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write_bytes(os.path.join(hp.artifact_dir, "final_model.pt"), buf.getvalue())
        ctx.log(f"Serialized model: {buf.tell()} bytes")
    model.looping = hp.num_loops > 0  # as every later evaluation runs, even if training stopped before the switch
    pre = eval_val(model, val_tokens, tables, hp, ctx, label="pre-quantization post-ema", counted=False)
    summary["evals"][pre.label] = dict(val_loss=pre.val_loss, val_bpb=pre.val_bpb, eval_time_s=pre.seconds)
    ctx.log("GPTQ:collecting Hessians from calibration data...")
    calib_t0 = time.perf_counter()
    hessians, _ = collect_hessians(model, calibration_batches(hp, ctx, train_files,
                                                              calibration_batches_per_rank(hp, ctx), trainer.micro_seqs))
    calib_s = time.perf_counter() - calib_t0
    counted_s = stats["train_ms"] / 1000 + calib_s
    ctx.log(f"GPTQ:collected {len(hessians)} Hessians in {calib_s:.1f}s (reserved {reserve_s:.1f}s); "
            f"counted training time {counted_s:.1f}s of {hp.max_wallclock_seconds:.0f}s")
    if hp.max_wallclock_seconds > 0 and counted_s > hp.max_wallclock_seconds:
        ctx.log(f"WARNING: training + calibration took {counted_s:.1f}s, over MAX_WALLCLOCK_SECONDS="
                f"{hp.max_wallclock_seconds:.0f}s; set GPTQ_RESERVE_SECONDS higher or GPTQ_CALIBRATION_BATCHES lower")
    summary.update(steps=stats["steps"], looping_enabled_step=stats["looping_enabled_step"], train_time_s=counted_s,
                   gptq_hessian_s=calib_s, gptq_reserve_s=reserve_s)
    if ctx.is_main:
        t0 = time.perf_counter()
        code_bytes, _ = counted_code_bytes(script)
        blob, info = build_artifact(model.state_dict(), hessians, hp, code_bytes, log=ctx.log)
        atomic_write_bytes(artifact_path, blob)
        ctx.log(f"artifact: quantize+compress {time.perf_counter() - t0:.1f}s (compress {info['compress_seconds']:.1f}s) "
                f"clip_scale:{info['clip_scale']:.4f}")
        summary["quantization_s"] = time.perf_counter() - t0
        summary["post_training_s"] = time.perf_counter() - stop["t"]
        ctx.log(f"post_training: {summary['post_training_s']:.1f}s from training stop to artifact written "
                f"(final_val+ema:{trained_t - stop['t']:.1f}s serialize+pre_quant_eval:{calib_t0 - trained_t:.1f}s "
                f"hessians:{calib_s:.1f}s quantize+compress:{summary['quantization_s']:.1f}s)")
    write_summary(hp, ctx, summary)
    if ctx.distributed:
        dist.barrier()


def main() -> None:
    hp = load_hyperparameters()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_hyperparameters(hp, world)
    if hp.dry_run:
        dry_run(hp)
        return
    if hp.eval_only and not os.path.isfile(hp.artifact_path):
        raise SystemExit(f"config error: ARTIFACT_PATH={hp.artifact_path} does not exist")
    train_files, val_files, val_tokens, byte_tables = prepare_data(hp, int(os.environ.get("RANK", "0")))
    STARTUP.mark("data")
    if torch.cuda.is_available() and not hp.eval_only:  # first: it has seconds of work before training's first kernel
        start_kernel_warmup(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        STARTUP.mark("kernel_warmup")
    ctx = setup_distributed()
    STARTUP.mark("distributed")
    if hp.compile and ctx.device.type == "cuda":
        # Inductor starts its compile workers at its first graph, and they take seconds to start: now, they are ready
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
        STARTUP.mark("compile_workers")
    os.makedirs(hp.artifact_dir, exist_ok=True)
    ctx.log_path = os.path.join(hp.artifact_dir, "train.log")
    ctx.metrics_path = os.path.join(hp.artifact_dir, "metrics.jsonl")
    ctx.log(format_hyperparameters(hp))
    ctx.log(f"train_shards: {len(train_files)}")
    ctx.log(f"val_tokens: {val_tokens.numel() - 1}")
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    dense = configure_attention(hp.attention_backend)
    STARTUP.mark("attention_probe")
    ctx.log(f"world_size:{ctx.world_size} device:{gpu} torch:{torch.__version__} python:{sys.version.split()[0]} "
            f"attention:{dense} doc_attention:{DOC_ATTENTION_BACKEND if hp.doc_isolated_attn else 'off'}")
    log_compile_cache(hp, ctx)
    log_bytecode_cache(ctx)
    ctx.log(f"fused_ce:{int(bool(hp.fused_ce) and fused_kernels_supported(ctx.device))} "
            f"fused_mlp:{int(bool(hp.fused_mlp) and fused_kernels_supported(ctx.device, tma=True))} "
            f"triton:{triton.__version__ if triton is not None else 'missing'}")
    sidecar = byte_tables.sidecar is not None
    ctx.log(f"val_byte_accounting: {'per-token byte sidecars fineweb_val_bytes_*' if sidecar else 'tokenizer piece table'}")
    tables = byte_tables.to(ctx.device)
    summary = dict(seed=hp.seed, run_id=hp.run_id, world_size=ctx.world_size, gpu=gpu, torch_version=torch.__version__,
                   python_version=sys.version.split()[0], attention=dense, hyperparameters=dataclasses.asdict(hp),
                   data=data_fingerprint(train_files, val_files), evals={})
    script = os.path.abspath(__file__)
    artifact_path = hp.artifact_path if hp.eval_only else os.path.join(hp.artifact_dir, "final_model.int6.ptz")
    if hp.eval_only:
        ctx.log(f"EVAL_ONLY=1: evaluating {artifact_path} without training")
    else:
        train_and_quantize(hp, ctx, train_files, val_tokens, tables, script, artifact_path, summary)
    total, lines, fits = size_report(artifact_path, script, hp.compressor, hp.size_target_bytes > 0)
    for line in lines:
        ctx.log(line)
    summary.update(artifact_bytes=os.path.getsize(artifact_path), code_bytes=total - os.path.getsize(artifact_path),
                   total_bytes=total, size_cap_ok=fits)
    write_summary(hp, ctx, summary)
    evaluate_artifact(hp, ctx, artifact_path, val_tokens, tables, summary)
    write_summary(hp, ctx, summary)
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
