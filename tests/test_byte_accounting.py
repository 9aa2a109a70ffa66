"""val_bpb byte accounting: counted bytes equal the UTF-8 length of the decoded text."""
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import shared_file


def doc_bytes(sp, tables, text):
    ids = torch.tensor([sp.bos_id()] + sp.encode(text))
    counted = int(tg.count_target_bytes(ids[:-1], ids[1:], tables).sum())
    return counted, len(sp.decode(ids[1:].tolist()).encode("utf-8"))


@pytest.mark.parametrize("name,vocab", [("fineweb_1024_bpe", 1024), ("fineweb_8192_bpe", 8192)])
def test_counts_equal_decoded_utf8_on_real_validation_docs(name, vocab):
    sp = tg.load_tokenizer(str(shared_file("tokenizers", f"{name}.model")), vocab)
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, vocab))
    lines = shared_file("fineweb_val_prefix", "docs.jsonl").read_text().splitlines()
    total_counted = total_true = 0
    for line in lines:
        counted, true = doc_bytes(sp, tables, json.loads(line)["text"])
        assert counted == true
        total_counted += counted
        total_true += true
    assert total_counted == total_true > 1_000_000


def test_sp1024_shard_matches_official_tokens():
    """The official sp1024 val prefix shard: bytes over the whole stream equal the docs' UTF-8 bytes."""
    sp = tg.load_tokenizer(str(shared_file("tokenizers", "fineweb_1024_bpe.model")), 1024)
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, 1024))
    tokens = torch.from_numpy(tg.read_shard(shared_file("fineweb_val_prefix", "fineweb_val_sp1024_000000.bin")).astype(np.int64))
    bos = (tokens == 1).nonzero().flatten().tolist()
    stream = tokens[:bos[-1]]  # the 901 complete documents
    counted = int(tg.count_target_bytes(stream[:-1], stream[1:], tables).sum())
    docs = shared_file("fineweb_val_prefix", "docs.jsonl").read_text().splitlines()
    assert counted == sum(len(json.loads(d)["text"].encode("utf-8")) for d in docs)


def _train_tiny(tmp_path, texts, vocab, name):
    return spm.SentencePieceProcessor(model_file=tg.train_sentencepiece(texts, str(tmp_path / name), vocab, num_threads=1))


def test_byte_fallback_pieces_count_one_byte_each(tmp_path):
    texts = ["the cat sat on the mat and the dog ran to the cat"] * 200
    sp = _train_tiny(tmp_path, texts, 300, "bf")
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(sp, 300))
    text = "the cat ate a crêpe in Zürich 東京 🙂"
    ids = sp.encode(text)
    byte_ids = [i for i in ids if sp.is_byte(i)]
    assert len(byte_ids) >= 10  # the non-ASCII characters fell back to bytes
    assert all(int(tables[0][i]) == 1 for i in byte_ids)
    counted, true = doc_bytes(sp, tables, text)
    assert counted == true == len(text.encode("utf-8"))


def test_control_and_unknown_pieces_are_zero_byte_boundaries(smoke_data):
    sp = tg.load_tokenizer(smoke_data[1], 512)
    base, leading, boundary = tg.build_byte_tables(sp, 512)
    for t in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()):
        assert boundary[t] and base[t] == 0 and not leading[t]
    spaced = next(i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1)
    tables = tuple(torch.from_numpy(t) for t in (base, leading, boundary))
    after_bos = tg.count_target_bytes(torch.tensor([1]), torch.tensor([spaced]), tables)
    after_word = tg.count_target_bytes(torch.tensor([spaced]), torch.tensor([spaced]), tables)
    assert int(after_word) == int(after_bos) + 1  # the leading space is not there at the start of a document


def test_tokenizer_without_standalone_space_piece_is_refused(tmp_path):
    sp = _train_tiny(tmp_path, ["abcabcabdabd" * 20, "xyzzyxxyz" * 20] * 50, 280, "nospace")
    assert sp.piece_to_id("\u2581") == sp.unk_id()
    with pytest.raises(SystemExit, match="no standalone"):
        tg.build_byte_tables(sp, 280)
