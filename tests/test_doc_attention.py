"""Document-isolated training attention (DOC_ISOLATED_ATTN): no token sees another document of its row.

Runs the CPU backends: SDPA with a boolean mask, FlexAttention (eager), and the varlen packing with a plain-torch
stand-in for the flash kernel (the kernel itself only runs on a GPU: bench/attention.py checks it there)."""
import os
import warnings

import pytest
import torch
import torch.nn.attention.varlen as varlen_module
from torch._dynamo.testing import CompileCounter

import train_gpt as tg
from conftest import forward_logits

BACKENDS = ["sdpa_mask", "flex", "varlen"]


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    """What the flash varlen kernel computes: causal attention within each [cu[i], cu[i+1]) of the packed stream."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and kwargs.get("window_size", (-1, 0)) == (-1, 0)
    out = torch.zeros_like(q)
    group = q.size(1) // k.size(1)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert 0 <= b - a <= max_q  # empty sequences (padding) are allowed
        if b > a:
            kk, vv = (t[a:b].repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
            y = torch.nn.functional.scaled_dot_product_attention(q[a:b].transpose(0, 1), kk, vv, is_causal=True)
            out[a:b] = y.transpose(0, 1)
    return out


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "varlen":
        monkeypatch.setattr(varlen_module, "varlen_attn", reference_varlen)
        monkeypatch.setattr(tg, "VARLEN_TOKENS_PER_SLOT", 16)  # these test rows hold more documents than real ones
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    tg.configure_attention("sdpa_math", name)
    yield name
    tg.configure_attention("sdpa_math")


def smoke_model():
    # three layers, one looped, the last one parallel: every kind of block call at a third of the smoke cost
    hp = tg.load_hyperparameters({"SMOKE": "1", "NUM_LAYERS": "3", "NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "1",
                                  "PARALLEL_RESIDUAL_START": "2", "XSA_LAST_N": "3"})
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():  # zero-initialized projections and gates would hide wiring mistakes
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.looping = True
    return model, hp


def rows_with_documents(vocab: int, T: int = 96) -> torch.Tensor:
    """Row 0: the tail of a document, then documents at 20, 50 and 80. Row 1: documents at 0 and 64."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (2, T), generator=g)
    ids[0, [20, 50, 80]] = tg.BOS_ID
    ids[1, [0, 64]] = tg.BOS_ID
    return ids


def replace_other_documents(ids: torch.Tensor, keep: dict[int, tuple[int, int]], vocab: int) -> torch.Tensor:
    """Random non-BOS tokens everywhere except the kept spans {row: (start, end)}; BOS positions stay."""
    g = torch.Generator().manual_seed(2)
    out = torch.where(ids == tg.BOS_ID, ids, torch.randint(2, vocab, ids.shape, generator=g))
    for row, (a, b) in keep.items():
        out[row, a:b] = ids[row, a:b]
    return out


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tokens_see_only_their_own_document(backend):
    model, hp = smoke_model()
    ids = rows_with_documents(hp.vocab_size)
    keep = {0: (50, 80), 1: (64, 96)}  # a middle document of row 0, the last one of row 1
    other = replace_other_documents(ids, keep, hp.vocab_size)
    assert (other != ids).sum() > 100
    with torch.no_grad():
        a, b = forward_logits(model, ids, isolate_docs=True), forward_logits(model, other, isolate_docs=True)
        for row, (lo, hi) in keep.items():
            torch.testing.assert_close(a[row, lo:hi], b[row, lo:hi], rtol=1e-5, atol=1e-5)
        # the test is sensitive: dense attention reads the other documents
        dense_a, dense_b = forward_logits(model, ids), forward_logits(model, other)
    assert not torch.allclose(dense_a[0, 50:80], dense_b[0, 50:80], atol=1e-3)
    assert not torch.allclose(dense_a[1, 64:], dense_b[1, 64:], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rows_without_bos_match_dense_causal_and_backends_agree(backend):
    model, hp = smoke_model()
    g = torch.Generator().manual_seed(3)
    plain = torch.randint(2, hp.vocab_size, (2, 64), generator=g)
    docs = rows_with_documents(hp.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, plain, isolate_docs=True), forward_logits(model, plain),
                                   rtol=1e-5, atol=1e-5)
        isolated = forward_logits(model, docs, isolate_docs=True)
        tg.configure_attention("sdpa_math", "sdpa_mask")
        torch.testing.assert_close(isolated, forward_logits(model, docs, isolate_docs=True), rtol=1e-5, atol=1e-5)


def test_document_ids_and_mask():
    ids = torch.tensor([[5, 5, 1, 5, 1, 1, 5]])
    assert tg.document_ids(ids).tolist() == [[0, 0, 1, 1, 2, 3, 3]]
    mask = tg.sdpa_doc_mask(ids)[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False, False]
    assert mask[6].tolist() == [False] * 5 + [True, True]
    assert mask[1].tolist() == [True, True] + [False] * 5


def test_cu_seqlens_have_a_fixed_length_and_never_cross_rows(monkeypatch):
    monkeypatch.setattr(tg, "VARLEN_TOKENS_PER_SLOT", 8)
    B, T = 3, 16
    ids = torch.full((B, T), 7)
    ids[0, [0, 5]] = tg.BOS_ID
    ids[1, 3] = tg.BOS_ID
    cu = tg.varlen_cu_seqlens(ids)  # 3 rows + 48/8 slots + the end
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 5, 16, 19, 32, 48, 48, 48, 48, 48]
    # More documents than slots: the last ones merge into their predecessors, but every row start stays a boundary.
    ids[2, 1:] = tg.BOS_ID
    cu = tg.varlen_cu_seqlens(ids).tolist()
    assert len(cu) == 10 and {0, 16, 32} <= set(cu) and cu[-1] == 48
    assert all(0 <= b - a <= T for a, b in zip(cu, cu[1:]))


@pytest.mark.parametrize("backend", ["flex"], indirect=True)
def test_isolated_forward_compiles_to_one_graph(backend):
    model, hp = smoke_model()
    ids = rows_with_documents(hp.vocab_size)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: forward_logits(model, x, isolate_docs=True), fullgraph=True, dynamic=False,
                             backend=counter)
    with torch.no_grad():
        out = compiled(ids)
        again = compiled(replace_other_documents(ids, {}, hp.vocab_size))
        eager = forward_logits(model, ids, isolate_docs=True)
    assert counter.frame_count == 1  # a new document layout is not a new graph
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert again.shape == out.shape
    torch._dynamo.reset()


def test_training_step_isolates_documents(smoke_data, monkeypatch):
    """Trainer.step runs the model with DOC_ISOLATED_ATTN; on real rows that gives another loss than dense."""
    seen = []
    real = tg.GPT.forward

    def spy(self, ids, targets, isolate_docs=False, regions=tg.EAGER_REGIONS):
        seen.append((isolate_docs, bool((ids[:, 1:] == tg.BOS_ID).any())))
        return real(self, ids, targets, isolate_docs, regions)

    monkeypatch.setattr(tg.GPT, "forward", spy)
    tg.configure_attention("sdpa_math")
    losses = []
    for flag in ("1", "0"):
        hp = tg.load_hyperparameters({"SMOKE": "1", "DATA_PATH": smoke_data[0], "TOKENIZER_PATH": smoke_data[1],
                                      "DOC_ISOLATED_ATTN": flag})
        ctx = tg.RunContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        torch.manual_seed(0)
        files = tg.find_shards(os.path.join(hp.data_path, "fineweb_train_*.bin"), "training", hp.vocab_size)
        model = tg.build_model(hp, ctx.device)
        with torch.no_grad():  # attention's zero-initialized output projections would make both losses equal
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        trainer = tg.Trainer(hp, ctx, model, files)
        losses.append(trainer.step(0, 1.0).item())
    assert [isolated for isolated, _ in seen] == [True] * (len(seen) // 2) + [False] * (len(seen) // 2)
    assert all(has_bos for _, has_bos in seen)  # smoke documents are short: every row holds several
    assert losses[0] != losses[1]
