"""Shared fixtures for the evaluation tests: smoke data, byte tables, a small causal model."""
from __future__ import annotations

import dataclasses
import glob
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402

# The test machines have 2 shared cores; a second intra-op thread makes these tiny ops several times slower.
torch.set_num_threads(1)


def smoke_hp(**overrides) -> tg.Hyperparameters:
    """SMOKE=1 config (T=128, stride 32, TTT chunks of 1024) with a learning rate big enough to move the scores."""
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    return dataclasses.replace(hp, **{"ttt_lr": 0.05, "ttt_epochs": 2, **overrides})


def smoke_stream(root: str, hp: tg.Hyperparameters, n_targets: int | None = None):
    """(val tokens, byte tables as torch tensors) from make_smoke_data, optionally cut to n_targets targets."""
    data, model_path = tg.make_smoke_data(root, hp.vocab_size)
    tokens = tg.load_validation_tokens(sorted(glob.glob(os.path.join(data, "fineweb_val_*.bin"))), hp.eval_seq_len)
    if n_targets is not None:
        tokens = tokens[:n_targets + 1].clone()
    sp = tg.load_tokenizer(model_path, hp.vocab_size)
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, hp.vocab_size))
    return tokens, tables


def stream_bytes(tokens: torch.Tensor, tables) -> int:
    """Byte total of a stream straight from the tables, with numpy, independent of the code under test."""
    base, leading, boundary = (t.numpy() for t in tables)
    prev, tgt = tokens[:-1].numpy(), tokens[1:].numpy()
    return int(base[tgt].astype(np.int64).sum() + (leading[tgt] & ~boundary[prev]).sum())


class TinyCausalLM(nn.Module):
    """Embedding + one causal self-attention block + MLP, with the GPT's interface (forward_logits, model(x, y)).
    causal=False makes the deliberately leaky model of the negative control."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int = 32, heads: int = 2, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        h = self.tok(x) + self.pos[:T]
        q, k, v = self.qkv(F.rms_norm(h, (h.shape[-1],))).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, -1))
        h = h + self.mlp(F.rms_norm(h, (h.shape[-1],)))
        logits = self.head(F.rms_norm(h, (h.shape[-1],)))
        return 30.0 * torch.tanh(logits / 30.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.forward_logits(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def make_model(hp: tg.Hyperparameters, seed: int = 0, causal: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCausalLM(hp.vocab_size, hp.eval_seq_len, causal=causal)


class LogLines(list):
    """A ctx.log that keeps the lines."""

    def __call__(self, msg: str) -> None:
        self.append(msg)


def make_ctx(**kw) -> tg.EvalContext:
    return tg.EvalContext(log=LogLines(), **kw)
