"""Model shape, parameter count, layer schedule and attention equivalence."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import forward_logits


def test_default_parameter_count():
    hp = tg.load_hyperparameters({})
    with torch.device("meta"):
        model = tg.GPT(hp)
    assert sum(p.numel() for p in model.parameters()) == 35_945_592  # 35,944,536 + 11 sparse attention gates of 8 x 12


def test_layer_schedule_and_skip_pairing():
    assert tg.layer_schedule(11, 3, 5, 2, looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert tg.layer_schedule(11, 3, 5, 2, looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    hp = tg.load_hyperparameters({})
    with torch.device("meta"):
        model = tg.GPT(hp)
    assert model.skip_weights.shape == (8, 512) and model.skip_gates.shape == (8, 512)
    assert [b.parallel for b in model.blocks] == [False] * 7 + [True] * 4
    assert all(b.attn.xsa for b in model.blocks)


def reference_attention(q, k, v):
    """Plain softmax attention with an explicit causal mask and repeated K/V heads."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / math.sqrt(D)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.double())


def test_cpu_attention_matches_plain_softmax_with_gqa():
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 37, 8, 16), torch.randn(2, 37, 4, 16), torch.randn(2, 37, 4, 16)
    out = tg.causal_attention(q, k, v)
    ref = reference_attention(q, k, v)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_model_is_causal_and_loops_change_the_function(smoke_data):
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    for p in model.parameters():  # zero-initialized projections would hide wiring mistakes
        p.data.add_(0.02 * torch.randn_like(p))
    x = torch.randint(0, hp.vocab_size, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, hp.vocab_size, (2, 15))
    with torch.no_grad():
        a, b = forward_logits(model, x), forward_logits(model, y)
        assert torch.equal(a[:, :25], b[:, :25]) and not torch.allclose(a[:, 25:], b[:, 25:])
        model.looping = True
        c = forward_logits(model, x)
    assert not torch.allclose(a, c)
    assert a.abs().max() <= hp.logit_softcap


def test_rotary_leaves_non_rotary_dims_and_norms():
    rot = tg.Rotary(16, 10000.0, 32)
    x = torch.randn(1, 9, 2, 64)
    out = rot(x)
    assert torch.equal(out[..., 16:], x[..., 16:])
    assert torch.allclose(out[..., :16].norm(dim=-1), x[..., :16].norm(dim=-1), atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated


def test_exclusive_self_attention_removes_the_own_value_component():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 8, 16, generator=g), torch.randn(2, 5, 4, 16, generator=g)
    v[0, 0, 1] = 0.0  # a zero value: nothing to remove, and no division by zero
    out = tg.exclusive_self_attention(y, v)
    v_heads = v.repeat_interleave(2, dim=2)  # GQA: heads 2j and 2j+1 share value head j
    assert (out * v_heads).sum(-1).abs().max() < 1e-5  # orthogonal to the token's own value
    vn = F.normalize(v_heads, dim=-1)
    torch.testing.assert_close(out, y - (y * vn).sum(-1, keepdim=True) * vn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 0, 2:4], y[0, 0, 2:4])
    assert out.dtype == y.dtype and out.shape == y.shape
    assert tg.exclusive_self_attention(y.bfloat16(), v.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("parallel", [False, True])
def test_blocks_fuse_their_linears_without_changing_results(parallel):
    """One GEMM for the input projections and the branch scales folded into the output projections: the same
    outputs and gradients as each linear called as its module."""
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    block = tg.Block(hp, layer=hp.parallel_residual_start if parallel else 0)
    assert block.parallel == parallel and block.fused_linears
    with torch.no_grad():
        for p in block.parameters():
            if p.ndim == 2:
                p.normal_(0, p.size(1) ** -0.5)  # zero-initialized projections would hide both branches
        block.attn_scale.uniform_(0.5, 1.5)  # folded into the output projections when fused: not all ones
        block.mlp_scale.uniform_(-1.5, -0.5)
    x, x0 = torch.randn(2, 16, hp.model_dim, requires_grad=True), torch.randn(2, 16, hp.model_dim)
    ops = []

    def counting_backend(gm, example_inputs):
        ops.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    results = []
    for fuse, fn in ((False, tg.run_block), (True, tg.run_block),
                     (True, torch.compile(tg.run_block, backend=counting_backend, fullgraph=True))):
        block.fused_linears = fuse
        x.grad = None
        block.zero_grad(set_to_none=True)
        out = fn(block, x, x0)[0]
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), block.mlp.fc.weight.grad.clone(), block.attn.c_k.weight.grad.clone(),
                        *(p.grad.clone() for p in (block.attn_scale, block.mlp_scale, block.attn.proj.weight,
                                                   block.mlp.proj.weight))))
    for separate, fused in zip(results[0], results[1]):
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5 * separate.abs().max())  # fp32 reordering
    for fused, compiled in zip(results[1], results[2]):
        assert torch.equal(fused, compiled)
    # fused q/k/v (and fc when parallel), gate, attention proj, mlp proj (and fc when sequential)
    assert sum(t is torch._C._nn.linear for t in ops) == (4 if parallel else 5)
