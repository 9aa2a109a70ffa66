"""The FA4 attention backend's wiring (custom ops, their autograd and torch.compile, on CPU), and ATTENTION_BACKEND.

FlashAttention-4's kernels only run on a GPU (bench/attention.py times and checks them there). Here a stand-in module
with its two entry points' signatures and return conventions computes them in plain torch, so what is tested is
train_gpt's side: layouts, the LSE kept for the backward, gradients of q, k and v, and one graph under compile."""
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import train_gpt as tg


def reference(q, k, v):
    """Causal GQA attention on [B, T, H, D], fp32 math."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                       v.transpose(1, 2).float(), is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).to(q.dtype)


def probabilities(q, k):
    """Causal softmax weights [B, H, Tq, Tk] of q [B, T, H, D] against GQA k [B, T, Hkv, D], fp32."""
    k = k.float().repeat_interleave(q.size(2) // k.size(2), 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / q.size(-1) ** 0.5
    T = q.size(1)
    return scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


SEEN_LAYOUTS = []  # (q, k, v contiguous?) of each stand-in forward call


def stand_in_fwd(q, k, v, causal=False, return_lse=False, **_):
    """Like flash_attn.cute.interface._flash_attn_fwd: (out, lse [B, H, T], and three more) for inputs whose last
    dimension is contiguous (FA4 takes any such 16-byte-aligned layout)."""
    assert causal and return_lse and all(t.stride(-1) == 1 for t in (q, k, v))
    SEEN_LAYOUTS.append(tuple(t.is_contiguous() for t in (q, k, v)))
    return reference(q, k, v), torch.logsumexp(probabilities(q, k), -1), None, None, None


def stand_in_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, **_):
    """Like _flash_attn_bwd: (dq, dk, dv) from the saved out and lse, by the softmax backward written out."""
    assert causal and lse.shape == (q.size(0), q.size(2), q.size(1)) and lse.dtype == torch.float32
    group = q.size(2) // k.size(2)
    p = (probabilities(q, k) - lse.unsqueeze(-1)).exp()
    do, kk, vv = dout.float(), *(t.float().repeat_interleave(group, 2) for t in (k, v))
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vv)
    ds = p * (dp - (do * out.float()).sum(-1).transpose(1, 2).unsqueeze(-1)) / q.size(-1) ** 0.5
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kk)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float())
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    fold = lambda t: t.unflatten(2, (k.size(2), group)).sum(3)  # noqa: E731 - query heads back onto their K/V head
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.fixture
def fa4(monkeypatch):
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = stand_in_fwd, stand_in_bwd
    for name, module in (("flash_attn", types.ModuleType("flash_attn")),
                         ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                         ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(tg, "_fa4_usable", lambda: True)  # it wants a Hopper GPU
    tg.configure_attention("fa4", "sdpa_mask")
    yield
    tg.configure_attention("sdpa_math")


def qkv(B=2, T=24, H=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(0)
    # q as a non-contiguous view, as the model's projections make it
    q = torch.randn(B, T, D, H, generator=g).transpose(2, 3).requires_grad_()
    k, v = (torch.randn(B, T, Hkv, D, generator=g).requires_grad_() for _ in range(2))
    return q, k, v


def grads(fn, q, k, v):
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out.detach(), dq, dk, dv


def test_fa4_backend_matches_reference_attention(fa4):
    q, k, v = qkv()
    got, want = grads(tg.causal_attention, q, k, v), grads(reference, q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fa4_takes_v_as_a_view_of_the_fused_projection(fa4):
    """The block's v is a slice of the q/k/v GEMM output: FA4 gets the view, not a copy; q with a transposed last
    dimension is copied."""
    q, _, _ = qkv()
    qkv_out = torch.randn(2, 24, 3, 2, 8).requires_grad_()  # [B, T, (q-part, k, v), Hkv, D]
    k, v = qkv_out[:, :, 1], qkv_out[:, :, 2]
    SEEN_LAYOUTS.clear()
    got, want = grads(tg.causal_attention, q, k, v), grads(reference, q, k, v)
    assert SEEN_LAYOUTS == [(True, False, False)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fa4_backend_compiles_into_one_graph(fa4):
    q, k, v = qkv()
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v: tg.causal_attention(q, k, v) * 2.0, backend=counter, fullgraph=True)
    got = grads(compiled, q, k, v)
    want = grads(lambda q, k, v: reference(q, k, v) * 2.0, q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_attention_backend_names_are_checked_before_any_work():
    hp = tg.load_hyperparameters({"SMOKE": "1", "ATTENTION_BACKEND": "flash3"})
    with pytest.raises(SystemExit, match="ATTENTION_BACKEND='flash3': use one of auto, fa3, fa4, sdpa_cudnn"):
        tg.validate_hyperparameters(hp, 1)
    tg.validate_hyperparameters(tg.load_hyperparameters({"SMOKE": "1", "ATTENTION_BACKEND": "fa4"}), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals on a machine without a GPU")
def test_a_named_backend_that_cannot_run_here_says_how_to_fix_it():
    """This machine has no GPU: FA4 and the CUDA-only SDPA backends are refused with the way out, auto works."""
    try:
        with pytest.raises(RuntimeError, match="pip install flash-attn-4"):
            tg.configure_attention("fa4")
        with pytest.raises(RuntimeError, match="ATTENTION_BACKEND=sdpa_cudnn needs CUDA"):
            tg.configure_attention("sdpa_cudnn")
        assert tg.configure_attention("auto") == "sdpa_math"
    finally:
        tg.configure_attention("sdpa_math")


def test_attention_warmup_compiles_fa4_at_a_training_micro_batchs_shapes(fa4, monkeypatch):
    interface = sys.modules["flash_attn.cute.interface"]
    calls = []

    def recording(name, real):
        def call(q, k, *args, **kwargs):
            calls.append((name, tuple(q.shape), tuple(k.shape)))
            return real(q, k, *args, **kwargs)
        return call

    for name in ("_flash_attn_fwd", "_flash_attn_bwd"):
        monkeypatch.setattr(interface, name, recording(name, getattr(interface, name)))
    hp = tg.load_hyperparameters({"SMOKE": "1", "ATTENTION_BACKEND": "fa4"})
    tg.warm_attention(hp, torch.device("cpu"), seqs=3)
    D = hp.model_dim // hp.num_heads
    shapes = (3, hp.train_seq_len, hp.num_heads, D), (3, hp.train_seq_len, hp.num_kv_heads, D)
    assert calls == [("_flash_attn_fwd", *shapes), ("_flash_attn_bwd", *shapes)]


def test_the_first_fa4_call_waits_for_the_kernel_warmup_processes(fa4, monkeypatch, tmp_path):
    """It would compile the kernels they are compiling: it goes on once both have ended, and reports the wait."""
    monkeypatch.setattr(tg, "_KERNEL_WARMUP", {})  # restored after the test: later tests see no warm-up
    for part in tg.KERNEL_WARMUP_PARTS:
        out = open(tmp_path / part, "w+b")
        tg._KERNEL_WARMUP[part] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"]), out
    procs = [tg._KERNEL_WARMUP[part][0] for part in tg.KERNEL_WARMUP_PARTS]
    tg._KERNEL_WARMUP["t0"] = time.perf_counter()
    grads(tg.causal_attention, *qkv())
    assert [p.poll() for p in procs] == [0, 0]
    assert tg.kernel_warmup_report().startswith("kernel_warmup: the first kernel call came")
    grads(tg.causal_attention, *qkv())  # later calls find nothing to wait for
    assert list(tg._KERNEL_WARMUP) == ["report"]


def test_lora_adapter_steps_leave_fa4_for_sdpa(fa4, monkeypatch):
    """Their thousands of shapes would each pick (and may compile) an FA4 kernel variant: they take SDPA."""
    def refuse(*args, **kwargs):
        raise AssertionError("FA4 called for a LoRA adapter step")

    monkeypatch.setattr(sys.modules["flash_attn.cute.interface"], "_flash_attn_fwd", refuse)
    q, k, v = qkv()
    got, want = grads(lambda *t: tg.causal_attention(*t, many_shapes=True), q, k, v), grads(reference, q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="FA4 called"):
        tg.causal_attention(q, k, v)


def test_the_model_passes_lora_forwards_as_many_shapes(fa4, monkeypatch):
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    ids = torch.randint(0, hp.vocab_size, (2, 32))
    plain = model.hidden(ids)  # FA4 (the stand-in) serves the plain forward
    seen = []

    def recording(q, k, v, doc_mask=None, many_shapes=False):
        seen.append(many_shapes)
        return torch.zeros_like(q)

    monkeypatch.setattr(tg, "causal_attention", recording)
    model.hidden(ids)
    model.hidden(ids, lora=tg.BatchedLoRA(model, hp, torch.device("cpu")).rows(2))
    layers = len(seen) // 2
    assert plain.isfinite().all() and seen == [False] * layers + [True] * layers
