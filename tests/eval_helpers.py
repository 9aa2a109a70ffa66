"""Shared pieces of the evaluation tests: the smoke GPT, its validation stream and byte tables, a log-capturing
RunContext."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import train_gpt as tg

# The test machines have 2 shared cores; a second intra-op thread makes these small ops several times slower.
torch.set_num_threads(1)


def smoke_hp(**overrides) -> tg.Hyperparameters:
    """SMOKE=1 config (T=128, stride 32, TTT chunks of 1024, 1 epoch) with a TTT lr big enough to move the scores."""
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    return dataclasses.replace(hp, **{"ttt_lr": 0.05, **overrides})


def smoke_stream(data: tuple[str, str], hp: tg.Hyperparameters, n_targets: int | None = None):
    """(val tokens, byte tables as torch tensors) of the smoke data, optionally cut to n_targets targets."""
    data_path, tokenizer_path = data
    tokens = tg.load_validation_tokens(sorted(glob.glob(os.path.join(data_path, "fineweb_val_*.bin"))),
                                       hp.eval_seq_len)
    if n_targets is not None:
        tokens = tokens[:n_targets + 1].clone()
    sp = tg.load_tokenizer(tokenizer_path, hp.vocab_size)
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, hp.vocab_size))
    return tokens, tables


def stream_bytes(tokens: torch.Tensor, tables) -> int:
    """Byte total of a stream straight from the tables, with numpy, independent of the code under test."""
    base, leading, boundary = (t.numpy() for t in tables)
    prev, tgt = tokens[:-1].numpy(), tokens[1:].numpy()
    return int(base[tgt].astype(np.int64).sum() + (leading[tgt] & ~boundary[prev]).sum())


def make_model(hp: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """The smoke GPT with its depth loop on, as evaluated after training. Its output projections start at zero,
    which would make every block the identity, so all weights get a little noise."""
    tg.configure_attention("sdpa_math")
    torch.manual_seed(seed)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.looping = True
    return model


def lookahead_attention(q, k, v, doc_mask=None, many_shapes=False):
    """The model's attention without its causal mask: the deliberately leaky model of a negative control."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return y.transpose(1, 2)


class LogLines(list):
    def __call__(self, msg: str = "", console: bool = True) -> None:
        self.append(msg)


def make_ctx(rank: int = 0, world_size: int = 1) -> tg.RunContext:
    """A CPU RunContext whose log keeps its lines in ctx.log (a list). Every rank logs, so rank 0 filters here."""
    ctx = tg.RunContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    ctx.log = LogLines() if rank == 0 else (lambda msg="", console=True: None)
    return ctx


def lora_hp(**overrides) -> tg.Hyperparameters:
    """TTT_MODE=lora_phased at test scale on a smaller looped GPT (4 layers, the second run twice, the last two
    parallel: 5 virtual layers): batches of 4 documents, 16-prediction chunks, windows of 64 tokens (so long
    documents slide), phases after 4 and 8 scored documents, global SGD chunks of 2 sequences."""
    return smoke_hp(**{"ttt_mode": "lora_phased", "num_layers": 4, "loop_start": 1, "loop_end": 1, "num_loops": 1,
                       "xsa_last_n": 4, "parallel_residual_start": 2, "eval_seq_len": 64, "ttt_batch_size": 4,
                       "ttt_chunk_size": 16, "ttt_lora_rank": 4, "ttt_lora_alpha": 6.0, "ttt_lora_lr": 0.01,
                       "phased_ttt_prefix_docs": 8, "phased_ttt_num_phases": 2, "ttt_chunk_tokens": 128,
                       "global_ttt_lr": 0.01, **overrides})


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, out_dir: str):
    """A gloo process group for one spawned test rank. On success the ranks meet at a barrier and the rank's process
    ends there, exit code 0, without tearing gloo down: its teardown can kill a rank with SIGABRT ("terminate called
    without an active exception"), seen twice in CI, once after that barrier was added. On failure the group is
    destroyed and the error propagates (the spawn reports it)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))  # a lost rank fails the test, not CI
    try:
        yield
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
