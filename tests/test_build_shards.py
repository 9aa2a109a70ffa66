"""data/build_shards.py on small generated corpora (and, when ../shared is there, the real validation prefix)."""
import json
import lzma
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "data"))
import build_shards  # noqa: E402
import train_gpt  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"
VOCAB = 320
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she all one there been their has would more will we when who no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(5, 60))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        if rng.random() < 0.2:
            words.append(rng.choice(["café", "Zürich", "東京", "naïve"]))
        text = " ".join(words).capitalize() + "."
        if i % 7 == 3:
            text += "\n\nSecond paragraph,   spaced  out."
        docs.append(text)
    docs[5] = ""  # an empty document is still a document: [BOS] alone
    return docs


def write_jsonl(path: Path, docs: list[str], xz: bool = False) -> Path:
    data = "".join(json.dumps({"text": d, "source": "test"}) + "\n" for d in docs).encode()
    path.write_bytes(lzma.compress(data) if xz else data)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(120)
    return {"docs": docs, "jsonl": write_jsonl(root / "docs.jsonl", docs),
            "xz": write_jsonl(root / "docs.jsonl.xz", docs, xz=True)}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tokenizer trained from the jsonl by build_shards itself (also the tokenizer the other tests reuse)."""
    out = tmp_path_factory.mktemp("trained")
    build_shards.main(["--input", str(corpus["jsonl"]), "--out", str(out), "--vocab-size", str(VOCAB),
                       "--tokenizer-train-docs", "80", "--num-val-docs", "10", "--chunk-tokens", "400",
                       "--workers", "1"])
    return out


def build(corpus_file, out, *extra, tokenizer=None, workers=1):
    argv = ["--input", str(corpus_file), "--out", str(out), "--workers", str(workers), *extra]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    return build_shards.main(argv)


def shard_files(out: Path, vocab: int = VOCAB) -> list[Path]:
    d = out / "datasets" / f"fineweb10B_sp{vocab}"
    return sorted(d.glob("fineweb_val_*.bin")) + sorted(d.glob("fineweb_train_*.bin"))


def expected_streams(model: Path, docs: list[str], num_val: int):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    per_doc = [[1] + ids for ids in sp.encode(docs)]
    flat = lambda seqs: np.array([t for s in seqs for t in s], dtype=np.uint16)  # noqa: E731
    return flat(per_doc[:num_val]), flat(per_doc[num_val:])


def chunks(stream: np.ndarray, size: int) -> list[np.ndarray]:
    return [stream[i:i + size] for i in range(0, len(stream), size)]


def test_trained_tokenizer_follows_the_recipe(trained):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    assert model.is_file() and model.with_suffix(".vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.is_byte(4) and sp.id_to_piece(4) == "<0x00>", "byte fallback pieces follow the specials"
    assert sp.encode("12") == sp.encode("1") + sp.encode("2"), "digits are split"
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["tokenizer_specs"][0]["tokenizer_train_docs"] == 80
    assert manifest["tokenizers"][0]["model_path"] == f"tokenizers/fineweb_{VOCAB}_bpe.model"
    assert not list((trained / "tokenizers").glob(".tmp_*")), "no training leftovers"


@pytest.mark.parametrize("fmt", ["jsonl", "xz"])
def test_split_bos_and_flush_rules(corpus, trained, tmp_path, fmt):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    num_val, chunk = 13, 97
    build(corpus[fmt], tmp_path, "--num-val-docs", str(num_val), "--chunk-tokens", str(chunk), tokenizer=model)
    val, train = expected_streams(model, corpus["docs"], num_val)
    files = shard_files(tmp_path)
    got = {p.name: np.array(train_gpt.read_shard(p)) for p in files}
    want = {f"fineweb_val_{i:06d}.bin": c for i, c in enumerate(chunks(val, chunk))}
    want.update({f"fineweb_train_{i:06d}.bin": c for i, c in enumerate(chunks(train, chunk))})
    assert sorted(got) == sorted(want)
    for name, tokens in want.items():
        assert np.array_equal(got[name], tokens), name
    # the last val shard is short (flushed at the switch) and train starts a fresh shard; the final one is partial
    assert len(val) % chunk and len(got[f"fineweb_val_{len(chunks(val, chunk)) - 1:06d}.bin"]) == len(val) % chunk
    assert len(got["fineweb_train_000000.bin"]) == chunk
    stream = np.concatenate([got[p.name] for p in files])
    assert (stream == 1).sum() == len(corpus["docs"]), "one BOS per document"
    assert not (stream == 2).any(), "no EOS"
    assert (tmp_path / "tokenizers" / f"fineweb_{VOCAB}_bpe.model").read_bytes() == model.read_bytes()


def test_plain_and_xz_inputs_give_identical_shards(corpus, trained, tmp_path):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    for fmt in ("jsonl", "xz"):
        build(corpus[fmt], tmp_path / fmt, "--num-val-docs", "4", "--chunk-tokens", "300", tokenizer=model)
    a, b = shard_files(tmp_path / "jsonl"), shard_files(tmp_path / "xz")
    assert [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_val_buffer_exactly_full_at_switch_and_no_val(corpus, trained, tmp_path):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    val, train = expected_streams(model, corpus["docs"], 9)
    build(corpus["jsonl"], tmp_path / "exact", "--num-val-docs", "9", "--chunk-tokens", str(len(val)), tokenizer=model)
    names = [p.name for p in shard_files(tmp_path / "exact")]
    assert names[:2] == ["fineweb_val_000000.bin", "fineweb_train_000000.bin"], "no empty shard at the switch"
    build(corpus["jsonl"], tmp_path / "noval", "--num-val-docs", "0", "--chunk-tokens", "100000", tokenizer=model)
    (only,) = shard_files(tmp_path / "noval")
    assert only.name == "fineweb_train_000000.bin"
    assert np.array_equal(train_gpt.read_shard(only), np.concatenate(expected_streams(model, corpus["docs"], 0)))


def test_manifest_fields(corpus, trained, tmp_path):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    build(corpus["xz"], tmp_path, "--num-val-docs", "11", "--chunk-tokens", "500", tokenizer=model)
    m = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("version", "num_docs", "num_val_docs", "shuffle_seed", "shard_size", "append_eos", "docs_jsonl",
                "docs_meta", "tokenizer_specs", "tokenizers", "datasets"):
        assert key in m, key
    assert (m["num_docs"], m["num_val_docs"], m["shard_size"], m["append_eos"]) == (120, 11, 500, False)
    assert set(m["docs_meta"]) >= {"remote_repo_id", "remote_root", "num_docs", "docs_sha256", "source_manifest"}
    (tok,) = m["tokenizers"]
    assert set(tok) >= {"name", "kind", "vocab_size", "bos_id", "eos_id", "recommended_bigram_vocab_size",
                        "source_spec", "model_path", "vocab_path"}
    assert (tok["vocab_size"], tok["bos_id"], tok["eos_id"]) == (VOCAB, 1, 2)
    assert (tmp_path / tok["model_path"]).is_file() and (tmp_path / tok["vocab_path"]).is_file()
    (ds,) = m["datasets"]
    assert ds["name"] == f"fineweb10B_sp{VOCAB}" and ds["path"] == f"datasets/fineweb10B_sp{VOCAB}"
    assert ds["recommended_bigram_vocab_size"] == math.ceil(VOCAB / 128) * 128 * 5
    assert ds["train_glob"] == f"datasets/fineweb10B_sp{VOCAB}/fineweb_train_*.bin"
    files = shard_files(tmp_path)
    val_files = [p for p in files if "_val_" in p.name]
    tokens = {s: sum(train_gpt.read_shard_header(p) for p in files if f"_{s}_" in p.name) for s in ("val", "train")}
    assert ds["stats"] == {"docs_total": 120, "docs_val": 11, "docs_train": 109, "files_total": len(files),
                           "files_val": len(val_files), "files_train": len(files) - len(val_files),
                           "tokens_total": tokens["val"] + tokens["train"], "tokens_val": tokens["val"],
                           "tokens_train": tokens["train"]}


def mtimes(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_is_idempotent_and_changes_rebuild(corpus, trained, tmp_path, capsys):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    args = ("--num-val-docs", "5", "--chunk-tokens", "200")
    build(corpus["jsonl"], tmp_path, *args, tokenizer=model)
    before = mtimes(tmp_path)
    capsys.readouterr()
    build(corpus["jsonl"], tmp_path, *args, tokenizer=model, workers=2)  # worker count is not an input
    assert "up to date" in capsys.readouterr().out
    assert mtimes(tmp_path) == before, "nothing rewritten"

    first_count = len(shard_files(tmp_path))
    build(corpus["jsonl"], tmp_path, "--num-val-docs", "5", "--chunk-tokens", "1000", tokenizer=model)
    assert len(shard_files(tmp_path)) < first_count, "stale shards of the old chunk size are gone"

    victim = shard_files(tmp_path)[-1]
    victim.write_bytes(victim.read_bytes()[:-2])
    build(corpus["jsonl"], tmp_path, "--num-val-docs", "5", "--chunk-tokens", "1000", tokenizer=model)
    train_gpt.read_shard_header(victim)


def test_trained_tokenizer_is_kept_on_rerun(corpus, trained, capsys):
    before = mtimes(trained)
    build_shards.main(["--input", str(corpus["jsonl"]), "--out", str(trained), "--vocab-size", str(VOCAB),
                       "--tokenizer-train-docs", "80", "--num-val-docs", "10", "--chunk-tokens", "400"])
    assert "up to date" in capsys.readouterr().out and mtimes(trained) == before


def test_deterministic_across_worker_counts(corpus, trained, tmp_path, monkeypatch):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    monkeypatch.setattr(build_shards, "BATCH_CHARS", 700)  # many small encoding tasks, so workers interleave
    for w in (1, 2):
        build(corpus["xz"], tmp_path / f"w{w}", "--num-val-docs", "17", "--chunk-tokens", "250", tokenizer=model,
              workers=w)
    a, b = shard_files(tmp_path / "w1"), shard_files(tmp_path / "w2")
    assert len(a) > 3 and [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_refuses_to_mix_with_shards_it_did_not_write(corpus, trained, tmp_path):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    foreign = tmp_path / "datasets" / f"fineweb10B_sp{VOCAB}" / "fineweb_train_000077.bin"
    train_gpt.write_shard(foreign, np.array([1, 5, 6]))
    with pytest.raises(SystemExit, match="did not write"):
        build(corpus["jsonl"], tmp_path, "--num-val-docs", "0", "--chunk-tokens", "1000", tokenizer=model)
    build(corpus["jsonl"], tmp_path, "--num-val-docs", "0", "--chunk-tokens", "1000", "--overwrite", tokenizer=model)
    assert not foreign.exists()


def test_bad_input_line_is_reported(tmp_path, trained):
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: no string \"text\" field"):
        build(bad, tmp_path / "out", "--num-val-docs", "0", tokenizer=model)


def test_lone_surrogate_in_input_becomes_a_replacement_character(tmp_path, trained):
    """Valid JSON may escape half a surrogate pair; SentencePiece cannot encode it, so it is tokenized as U+FFFD."""
    model = trained / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "broken \\ud83d emoji"}\n{"text": "broken \\ufffd emoji"}\n')
    build(docs, tmp_path / "out", "--num-val-docs", "0", tokenizer=model)
    tokens = train_gpt.read_shard(shard_files(tmp_path / "out")[0])
    first, second = np.split(tokens, np.flatnonzero(tokens == 1)[1:])
    assert first.tolist() == second.tolist()


@pytest.mark.skipif(not (SHARED / "fineweb_val_prefix" / "docs.jsonl").is_file(), reason="needs ../shared/data")
def test_reproduces_the_published_sp8192_validation_tokens(tmp_path):
    """The 901 validation docs with the republished sp8192 model give the shared val shard byte for byte."""
    build(SHARED / "fineweb_val_prefix" / "docs.jsonl", tmp_path, "--num-val-docs", "901",
          tokenizer=SHARED / "tokenizers" / "fineweb_8192_bpe.model", workers=2)
    (val,) = shard_files(tmp_path, 8192)
    assert val.read_bytes() == (SHARED / "fineweb_val_prefix" / "fineweb_val_sp8192_000000.bin").read_bytes()
