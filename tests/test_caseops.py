"""CaseOps (record #1787): the case transform and its inverse, the per-token original-byte sidecar, and
data/build_shards.py --caseops."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "data"))
import build_shards  # noqa: E402
import caseops  # noqa: E402
import train_gpt as tg  # noqa: E402
from caseops import ALLCAPS, CAPNEXT, ESC, TITLE, caseops_decode, caseops_encode  # noqa: E402
from caseops_helpers import synthetic_doc, train_tiny_tokenizers  # noqa: E402
from conftest import shared_file  # noqa: E402

NASA_SENTENCE = "The NASA Launch was on Monday."  # 30 bytes; the helper shipped with #1787 counts 42 (ANCHORS 2.6)


# ---------------------------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------------------------

def test_anchors_example():
    assert caseops_encode("The NASA Launch") == TITLE + "the " + ALLCAPS + "nasa " + TITLE + "launch"
    assert caseops_decode(TITLE + "the " + ALLCAPS + "nasa " + TITLE + "launch") == "The NASA Launch"


@pytest.mark.parametrize("word,encoded", [
    ("x", "x"),
    ("X", TITLE + "x"),                       # one capital letter is a title-case word, not ALLCAPS
    ("Ab", TITLE + "ab"),
    ("AB", ALLCAPS + "ab"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("NASAs", TITLE + "n" + CAPNEXT + "a" + CAPNEXT + "s" + CAPNEXT + "as"),
    ("eBay's", "e" + CAPNEXT + "bay's"),      # the apostrophe ends the letter run
    ("R2D2", TITLE + "r2" + TITLE + "d2"),    # digits split runs: each letter is its own word
    ("naïveTÉ", "na\u00efve" + CAPNEXT + "t\u00c9"),  # non-ASCII letters are untouched and split runs: "veT"
    ("ÀBC", "\u00c0" + ALLCAPS + "bc"),
    ("Ünïcödé", "\u00dcn\u00efc\u00f6d\u00e9"),
    (TITLE + "A", ESC + TITLE + TITLE + "a"),  # a literal operator character is escaped
    (ESC + ESC, ESC + ESC + ESC + ESC),
])
def test_word_rules(word, encoded):
    assert caseops_encode(word) == encoded
    assert caseops_decode(encoded) == word


def random_text(rng: random.Random, n: int) -> str:
    """Strings that mix everything the transform has to tell apart, letter runs of every case pattern included."""
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3 + "0123456789 .,;:'\"!?-()\n\t  "
                + "\u00e9\u00c9\u00df\u03a3\u03c3\u4e2d\u6587\U0001f600\U0001f680\u00ff"
                + TITLE + ALLCAPS + CAPNEXT + ESC + "\ue000\ue005")
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_round_trip_on_random_unicode():
    rng = random.Random(1787)
    for _ in range(3000):
        text = random_text(rng, rng.randint(0, 40))
        encoded = caseops_encode(text)
        assert not any("A" <= c <= "Z" for c in encoded)
        assert caseops_decode(encoded) == text


def test_round_trip_on_word_case_patterns():
    """Every case pattern of short words, in context: all 2^k patterns of k-letter words for k <= 5."""
    for k in range(1, 6):
        for mask in range(2 ** k):
            word = "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate("abcde"[:k]))
            for text in (word, f"({word}) {word}, {word}s", f"{word}\u00e9{word}"):
                assert caseops_decode(caseops_encode(text)) == text


@pytest.mark.parametrize("bad", [
    TITLE,                           # at the end
    TITLE + "1",                     # not before a letter
    TITLE + TITLE + "a",
    "a" + TITLE + "b",               # inside a word
    ALLCAPS + "a",                   # ALLCAPS of one letter is TITLE
    ALLCAPS + "ab" + CAPNEXT + "c",  # an ALLCAPS word that goes on with a marker
    "a" + ALLCAPS + "bc",
    CAPNEXT + "a",                   # CAPNEXT starts no word
    " " + CAPNEXT + "a",
    "a" + CAPNEXT,                   # at the end
    "a" + CAPNEXT + "1",
    ESC,                             # ESC at the end
    ESC + "a",                       # ESC escapes operators only
    "A",                             # encoded text has no capitals
    TITLE + "a" + CAPNEXT + "b",     # "AB": the canonical form is ALLCAPS "ab"
    TITLE + "a" + CAPNEXT + "b" + CAPNEXT + "c",
])
def test_decoder_rejects_malformed_markers(bad):
    with pytest.raises(caseops.CaseOpsError, match="malformed CaseOps text"):
        caseops_decode(bad)


def test_decoder_accepts_exactly_the_encoder_image():
    """Random operator insertions/deletions into encoded text: whatever the decoder accepts re-encodes to the input
    (so decoding is injective), and most of them are rejected."""
    rng = random.Random(7)
    rejected = 0
    for _ in range(2000):
        chars = list(caseops_encode(random_text(rng, rng.randint(1, 30))))
        for _ in range(rng.randint(1, 2)):
            if chars and rng.random() < 0.3:
                del chars[rng.randrange(len(chars))]
            else:
                chars.insert(rng.randint(0, len(chars)), rng.choice(caseops.OPERATORS))
        mutated = "".join(chars)
        try:
            assert caseops_encode(caseops_decode(mutated)) == mutated
        except caseops.CaseOpsError:
            rejected += 1
    assert rejected > 1000


def test_operators_agree_with_train_gpt():
    assert "".join(caseops.OPERATORS) == tg.CASEOPS_OPERATORS


# ---------------------------------------------------------------------------------------------------------------
# Byte sidecar: original bytes per token, totals equal to the standard accounting
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    return train_tiny_tokenizers(tmp_path_factory.mktemp("caseops_tok"), 400)


def lut_total(sp, text: str) -> int:
    """The standard accounting (ANCHORS 2.1) of one document: the LUT over [BOS] + encode(text)."""
    base, leading, boundary = tg.build_byte_tables(sp, sp.get_piece_size())
    ids = np.array([1] + sp.encode(text))
    return int(base[ids[1:]].astype(np.int64).sum() + (leading[ids[1:]] & ~boundary[ids[:-1]]).sum())


def sidecar_counts(sp, tables, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([1] + sp.encode(caseops_encode(text)))
    return ids, tables.counts(ids)


def test_tiny_caseops_tokenizer_layout(tiny_tokenizers):
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizers["caseops"])
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)  # as in #1787's model
    assert tg.caseops_operator_ids(sp) == [4, 5, 6, 7]
    plain = spm.SentencePieceProcessor(model_file=tiny_tokenizers["plain"])
    assert plain.piece_to_id(TITLE) != plain.unk_id(), "the plain one learned U+E001 as an ordinary piece ..."
    assert tg.caseops_operator_ids(plain) == [], "... which does not make it a CaseOps tokenizer"


def test_piece_types_read_from_the_model_proto(tiny_tokenizers):
    for model in tiny_tokenizers.values():
        sp = spm.SentencePieceProcessor(model_file=model)
        ids = range(sp.get_piece_size())
        pieces = [dict(tg._protobuf_fields(p)) for f, p in tg._protobuf_fields(sp.serialized_model_proto()) if f == 1]
        assert [p[1].decode() for p in pieces] == [sp.id_to_piece(i) for i in ids]
        types = [p.get(3, 1) for p in pieces]  # 1 normal (the default), 3 control, 6 byte
        assert [t == 3 for t in types] == [sp.is_control(i) for i in ids]
        assert [t == 6 for t in types] == [sp.is_byte(i) for i in ids]


def test_sidecar_equals_standard_accounting_on_synthetic_docs(tiny_tokenizers):
    sp_c = spm.SentencePieceProcessor(model_file=tiny_tokenizers["caseops"])
    sp_p = spm.SentencePieceProcessor(model_file=tiny_tokenizers["plain"])
    tables = caseops.SidecarTables(sp_c)
    rng = random.Random(99)
    escapes = 0
    for _ in range(300):
        text = synthetic_doc(rng)
        ids, counts = sidecar_counts(sp_c, tables, text)
        normalized = sp_p.decode(sp_p.encode(text))  # the text as the standard accounting sees it
        assert int(counts.sum()) == lut_total(sp_p, text) == len(normalized.encode("utf-8")), text
        assert counts[0] == 0, "BOS is worth nothing"
        ops = np.isin(ids, tables.operator_ids)
        escaped = ops & (counts == 3)
        escapes += int(escaped.sum())
        assert (counts[ops & ~escaped] == 0).all(), "operators add no bytes"
    assert escapes > 0, "the documents exercised escaped literal operators"


def test_known_overcount_example_is_30_bytes(tiny_tokenizers):
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizers["caseops"])
    ids, counts = sidecar_counts(sp, caseops.SidecarTables(sp), NASA_SENTENCE)
    assert int(counts.sum()) == len(NASA_SENTENCE) == 30
    assert (counts[np.isin(ids, [4, 5, 6, 7])] == 0).all()


def test_escaped_operators_and_esc_runs(tiny_tokenizers):
    sp = spm.SentencePieceProcessor(model_file=tiny_tokenizers["caseops"])
    tables = caseops.SidecarTables(sp)
    for text in (ESC + "The", TITLE + ALLCAPS, ESC * 3 + TITLE + "x", "a " + CAPNEXT + " B", ESC):
        ids, counts = sidecar_counts(sp, tables, text)
        assert int(counts.sum()) == len(text.encode("utf-8")), repr(text)


def test_sidecar_on_real_validation_docs():
    """The 901 real validation docs (already nmt_nfkc-normalized) with #1787's CaseOps tokenizer: per document, the
    sidecar total equals the plain sp8192 LUT total and the UTF-8 length of the text, exactly."""
    docs = [json.loads(line)["text"] for line in
            shared_file("fineweb_val_prefix", "docs.jsonl").read_text().splitlines()]
    sp_c = spm.SentencePieceProcessor(model_file=str(shared_file(
        "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")))
    sp_p = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizers", "fineweb_8192_bpe.model")))
    tables = caseops.SidecarTables(sp_c)
    base, leading, boundary = tg.build_byte_tables(sp_p, 8192)
    total = 0
    for text, ids_c, ids_p in zip(docs, sp_c.encode([caseops_encode(d) for d in docs]), sp_p.encode(docs)):
        counts = tables.counts(np.array([1] + ids_c))
        ids_p = np.array([1] + ids_p)
        lut = int(base[ids_p[1:]].astype(np.int64).sum() + (leading[ids_p[1:]] & ~boundary[ids_p[:-1]]).sum())
        assert int(counts.sum()) == lut == len(text.encode("utf-8"))
        total += lut
    assert total == 2_504_310
    ids, counts = sidecar_counts(sp_c, tables, NASA_SENTENCE)
    assert int(counts.sum()) == 30


# ---------------------------------------------------------------------------------------------------------------
# data/build_shards.py --caseops
# ---------------------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def caseops_dir(out: Path, vocab: int) -> Path:
    return out / "datasets" / f"fineweb10B_sp{vocab}_lossless_caps_caseops_v1_reserved"


def test_build_shards_caseops(tiny_tokenizers, tmp_path, capsys, monkeypatch):
    rng = random.Random(5)
    docs = [synthetic_doc(rng) for _ in range(60)] + [NASA_SENTENCE]
    docs.insert(3, "")
    num_val, chunk = 25, 300
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    argv = ["--input", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", tiny_tokenizers["caseops"],
            "--num-val-docs", str(num_val), "--chunk-tokens", str(chunk), "--caseops", "--workers", "2"]
    build_shards.main(argv)
    d = caseops_dir(tmp_path / "out", 400)
    assert (tmp_path / "out" / "tokenizers" / "fineweb_400_bpe_lossless_caps_caseops_v1_reserved.model").is_file()
    val = sorted(p for p in d.glob("fineweb_val_*.bin") if "_bytes_" not in p.name)
    sidecars = sorted(d.glob("fineweb_val_bytes_*.bin"))
    assert len(val) > 1 and [p.name.replace("val_", "val_bytes_") for p in val] == [p.name for p in sidecars]
    for v, b in zip(val, sidecars):
        assert tg.read_shard_header(v) == tg.read_shard_header(b), "each sidecar is cut where its shard is"
    assert not list(d.glob("fineweb_train_bytes_*")), "training shards need no sidecar"

    sp_c = spm.SentencePieceProcessor(model_file=tiny_tokenizers["caseops"])
    sp_p = spm.SentencePieceProcessor(model_file=tiny_tokenizers["plain"])
    tokens = np.concatenate([tg.read_shard(p) for p in val])
    counts = np.concatenate([tg.read_shard(p) for p in sidecars]).astype(np.int64)
    want = np.array([t for doc in docs[:num_val] for t in [1] + sp_c.encode(caseops_encode(doc))])
    assert np.array_equal(tokens, want)
    assert (counts[tokens == 1] == 0).all()
    assert counts.sum() == sum(lut_total(sp_p, doc) for doc in docs[:num_val])
    train = np.concatenate([tg.read_shard(p) for p in sorted(d.glob("fineweb_train_*.bin"))])
    assert np.array_equal(train, [t for doc in docs[num_val:] for t in [1] + sp_c.encode(caseops_encode(doc))])

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (ds,) = manifest["datasets"]
    assert ds["text_transform"] == "lossless_caps_caseops_v1" and ds["val_bytes_glob"].endswith("fineweb_val_bytes_*.bin")
    assert ds["stats"]["files_val"] == len(val) and ds["stats"]["files_total"] == len(val) + ds["stats"]["files_train"]
    # One document per encoding task (byte counts only for the validation ones), one process: the same files.
    monkeypatch.setattr(build_shards, "BATCH_CHARS", 1)
    argv_single = [a.replace(str(tmp_path / "out"), str(tmp_path / "single")) for a in argv[:-1]] + ["1"]
    build_shards.main(argv_single)
    single = caseops_dir(tmp_path / "single", 400)
    assert sorted(p.name for p in single.glob("*.bin")) == sorted(p.name for p in d.glob("*.bin"))
    assert all((single / p.name).read_bytes() == p.read_bytes() for p in d.glob("*.bin"))
    monkeypatch.undo()

    capsys.readouterr()
    build_shards.main(argv)
    assert "up to date" in capsys.readouterr().out
    sidecars[0].unlink()
    build_shards.main(argv)
    assert sidecars[0].is_file(), "a missing sidecar makes the build stale"


def test_build_shards_refuses_mismatched_tokenizer_and_mode(tiny_tokenizers, tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", ["Some Text."] * 5)
    base = ["--input", str(corpus), "--out", str(tmp_path / "out"), "--num-val-docs", "1", "--workers", "1"]
    with pytest.raises(SystemExit, match="needs a CaseOps tokenizer"):
        build_shards.main(base + ["--tokenizer", tiny_tokenizers["plain"], "--caseops"])
    with pytest.raises(SystemExit, match="pass --caseops"):
        build_shards.main(base + ["--tokenizer", tiny_tokenizers["caseops"]])
    with pytest.raises(SystemExit):  # argparse: --caseops without --tokenizer
        build_shards.main(base + ["--caseops"])


def test_build_shards_caseops_on_real_validation_docs(tmp_path):
    docs = shared_file("fineweb_val_prefix", "docs.jsonl")
    model = shared_file("tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    build_shards.main(["--input", str(docs), "--out", str(tmp_path), "--tokenizer", str(model), "--caseops",
                       "--num-val-docs", "901", "--workers", "2"])
    d = caseops_dir(tmp_path, 8192)
    tokens = tg.read_shard(d / "fineweb_val_000000.bin")
    counts = tg.read_shard(d / "fineweb_val_bytes_000000.bin").astype(np.int64)
    assert len(tokens) == 808_617 and (tokens == 1).sum() == 901
    # the standard accounting of the published sp8192 shard of the same documents
    sp = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizers", "fineweb_8192_bpe.model")))
    base, leading, boundary = tg.build_byte_tables(sp, 8192)
    plain = tg.read_shard(shared_file("fineweb_val_prefix", "fineweb_val_sp8192_000000.bin")).astype(np.int64)
    assert counts.sum() == base[plain[1:]].astype(np.int64).sum() + (leading[plain[1:]] & ~boundary[plain[:-1]]).sum()
    assert counts.sum() == 2_504_310
