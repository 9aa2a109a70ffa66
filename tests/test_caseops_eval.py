"""val_bpb from a per-token byte sidecar (train_gpt.py sections 2 and 7; ANCHORS 2.6): the same evaluations as
the piece-table path when the sidecar holds the table's counts, read at the right positions, and required, with a
clear error, for a CaseOps tokenizer."""
import copy
import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from caseops_helpers import synthetic_doc, train_tiny_tokenizers
from eval_helpers import lora_hp, make_ctx, make_model, smoke_hp, smoke_stream, stream_bytes, tg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import build_shards  # noqa: E402

EVALUATIONS = (tg.eval_val, tg.eval_val_sliding, tg.eval_val_ttt, tg.eval_val_lora_ttt)


def eval_hp(evaluate) -> tg.Hyperparameters:
    """Awkward geometry: partial blocks, chunks, windows (LoRA TTT: its own small looped config)."""
    overrides = dict(eval_stride=48, ttt_chunk_tokens=1000)
    return lora_hp(**overrides) if evaluate is tg.eval_val_lora_ttt else smoke_hp(**overrides)


def table_sidecar(tokens: torch.Tensor, tables) -> torch.Tensor:
    """The piece-table counts written as a sidecar, with numpy: position p holds token p's bytes given token p - 1;
    position 0 (BOS) holds 0."""
    base, leading, boundary = (t.numpy() for t in tables)
    prev, tgt = tokens[:-1].numpy(), tokens[1:].numpy()
    counts = np.zeros(len(tokens), dtype=np.int32)
    counts[1:] = base[tgt] + (leading[tgt] & ~boundary[prev])
    return torch.from_numpy(counts)


@pytest.mark.parametrize("evaluate", EVALUATIONS, ids=lambda f: f.__name__)
def test_sidecar_of_table_counts_gives_the_same_bpb(smoke_data, evaluate):
    hp = eval_hp(evaluate)
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=1500)
    model = make_model(hp)
    with_sidecar = tg.ByteTables(*tables, sidecar=table_sidecar(tokens, tables))
    a = evaluate(copy.deepcopy(model), tokens, tables, hp, make_ctx(), return_losses=True)
    b = evaluate(copy.deepcopy(model), tokens, with_sidecar, hp, make_ctx(), return_losses=True)
    assert a.covered and b.covered
    nbytes = stream_bytes(tokens, tables)
    assert (b.tokens, b.bytes, b.expected_bytes) == (a.tokens, a.bytes, a.expected_bytes) == (1500, nbytes, nbytes)
    assert b.val_bpb == a.val_bpb and b.val_loss == a.val_loss
    assert torch.equal(a.target_losses, b.target_losses)


@pytest.mark.parametrize("evaluate", EVALUATIONS, ids=lambda f: f.__name__)
def test_sidecar_is_read_at_the_target_tokens_position(smoke_data, evaluate):
    """Target i is token i + 1, so of the positions 0..n only 1..n are ever credited: a count at position 0 (the
    first BOS) is never used and the one at position n (the last target) always is."""
    hp = eval_hp(evaluate)
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=700)
    n = len(tokens) - 1
    ends = torch.zeros(n + 1, dtype=torch.int32)
    ends[0], ends[n] = 1000, 7
    result = evaluate(make_model(hp), tokens, tg.ByteTables(*tables, sidecar=ends), hp, make_ctx(), label=None)
    assert (result.bytes, result.expected_bytes) == (7, 7) and result.covered
    counts = torch.from_numpy(np.random.default_rng(0).integers(0, 9, n + 1).astype(np.int32))
    result = evaluate(make_model(hp), tokens, tg.ByteTables(*tables, sidecar=counts), hp, make_ctx(), label=None)
    assert result.bytes == result.expected_bytes == int(counts[1:].sum()) and result.covered


def test_count_target_bytes_with_a_sidecar_needs_positions():
    tables = tg.ByteTables(torch.ones(4, dtype=torch.int16), torch.zeros(4, dtype=torch.bool),
                           torch.zeros(4, dtype=torch.bool), sidecar=torch.tensor([0, 5, 6], dtype=torch.int32))
    prev, tgt = torch.tensor([1, 2]), torch.tensor([2, 3])
    assert tg.count_target_bytes(prev, tgt, tables, torch.tensor([1, 2])).tolist() == [5, 6]
    assert tg.count_target_bytes(prev, tgt, tables[:3]).tolist() == [1, 1]  # a plain tuple: the piece table
    with pytest.raises(ValueError, match="positions"):
        tg.count_target_bytes(prev, tgt, tables)


# ---------------------------------------------------------------------------------------------------------------
# prepare_data: CaseOps data built by data/build_shards.py --caseops
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops_data")
    toks = train_tiny_tokenizers(root, 400)
    rng = random.Random(3)
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": synthetic_doc(rng)}) + "\n" for _ in range(160)))
    build_shards.main(["--input", str(corpus), "--out", str(root / "out"), "--tokenizer", toks["caseops"],
                       "--caseops", "--num-val-docs", "60", "--chunk-tokens", "1500", "--workers", "1"])
    data = root / "out" / "datasets" / "fineweb10B_sp400_lossless_caps_caseops_v1_reserved"
    return data, toks


def caseops_hp(data: Path, tokenizer: str, **overrides) -> tg.Hyperparameters:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    return smoke_hp(**{"smoke": 0, "vocab_size": sp.get_piece_size(), "data_path": str(data),
                       "tokenizer_path": tokenizer, "val_files": str(data / "fineweb_val_*.bin"), **overrides})


def copy_dataset(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in src.glob("fineweb_*.bin"):
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_prepare_data_loads_the_sidecar_and_eval_uses_it(caseops_data):
    data, toks = caseops_data
    hp = caseops_hp(data, toks["caseops"])
    train_files, val_files, val_tokens, tables = tg.prepare_data(hp, 0)
    sidecars = sorted(data.glob("fineweb_val_bytes_*.bin"))
    assert len(val_files) == len(sidecars) > 1 and not any("_bytes_" in f for f in val_files + train_files)
    whole = np.concatenate([tg.read_shard(p) for p in sidecars])
    assert torch.equal(tables.sidecar, torch.from_numpy(whole[:len(val_tokens)].astype(np.int32)))
    result = tg.eval_val(make_model(hp), val_tokens, tables, hp, make_ctx())
    assert result.covered and result.bytes == int(tables.sidecar[1:].sum())
    # The piece table credits every operator piece with its 3 UTF-8 bytes; the sidecar only the escaped literal
    # ones, and agrees with the table on every other token.
    table_bytes = tg.eval_val(make_model(hp), val_tokens, tables[:3], hp, make_ctx()).bytes
    markers = np.isin(val_tokens[1:].numpy(), [4, 5, 6, 7]) & (tables.sidecar[1:].numpy() == 0)
    assert markers.sum() > 100 and table_bytes - result.bytes == 3 * int(markers.sum())


def test_caseops_tokenizer_without_sidecar_is_refused(caseops_data, tmp_path):
    data, toks = caseops_data
    bare = copy_dataset(data, tmp_path / "bare")
    for p in bare.glob("fineweb_val_bytes_*.bin"):
        p.unlink()
    with pytest.raises(SystemExit, match=r"CaseOps operator pieces.*build_shards.py --caseops"):
        tg.prepare_data(caseops_hp(bare, toks["caseops"]), 0)
    # VAL_FILES named otherwise cannot have a sidecar: the same error, saying why
    odd = tmp_path / "odd.bin"
    odd.write_bytes((data / "fineweb_val_000000.bin").read_bytes())
    with pytest.raises(SystemExit, match="only a val shard named fineweb_val_"):
        tg.prepare_data(caseops_hp(bare, toks["caseops"], val_files=str(odd)), 0)


def test_broken_sidecars_are_refused(caseops_data, tmp_path):
    data, toks = caseops_data
    partial = copy_dataset(data, tmp_path / "partial")
    sorted(partial.glob("fineweb_val_bytes_*.bin"))[-1].unlink()
    with pytest.raises(SystemExit, match=r"1 of \d+ validation shards have no byte sidecar"):
        tg.prepare_data(caseops_hp(partial, toks["caseops"]), 0)

    short = copy_dataset(data, tmp_path / "short")
    first = short / "fineweb_val_bytes_000000.bin"
    tg.write_shard(first, tg.read_shard(first)[:-1])
    with pytest.raises(SystemExit, match="counts but .* tokens: they were not built together"):
        tg.prepare_data(caseops_hp(short, toks["caseops"]), 0)

    shifted = copy_dataset(data, tmp_path / "shifted")
    first = shifted / "fineweb_val_bytes_000000.bin"
    counts = np.array(tg.read_shard(first))
    tg.write_shard(first, np.roll(counts, 1))  # one position late: BOS now gets the bytes of a document's end
    with pytest.raises(SystemExit, match="credit bytes to BOS"):
        tg.prepare_data(caseops_hp(shifted, toks["caseops"]), 0)


def test_standard_tokenizer_needs_no_sidecar(smoke_data):
    data, tokenizer = smoke_data
    hp = dataclasses.replace(smoke_hp(smoke=0), data_path=data, tokenizer_path=tokenizer,
                             val_files=str(Path(data) / "fineweb_val_*.bin"))
    *_, tables = tg.prepare_data(hp, 0)
    assert isinstance(tables, tg.ByteTables) and tables.sidecar is None
