"""Sparse attention head-output gate (SPARSE_ATTN_GATE_ENABLED): formula, init, optimizer group, quantization."""
import torch

import train_gpt as tg
from conftest import forward_logits


def smoke_hp(**env):
    return tg.load_hyperparameters({"SMOKE": "1", **{k.upper(): str(v) for k, v in env.items()}})


def perturbed_model(hp, seed=0):
    torch.manual_seed(seed)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():  # zero-initialized output projections would hide the attention path
        for name, p in model.named_parameters():
            if not name.endswith("attn_gate_w"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_gate_at_init_halves_every_head_output():
    """A gated model at init = the ungated model with every attention output projection halved, exactly."""
    tg.configure_attention("sdpa_math")
    gated = perturbed_model(smoke_hp())
    plain = tg.build_model(smoke_hp(sparse_attn_gate_enabled=0), torch.device("cpu"))
    state = {k: v for k, v in gated.state_dict().items() if not k.endswith("attn_gate_w")}
    plain.load_state_dict(state)
    assert all(torch.equal(b.attn.attn_gate_w, torch.zeros(4, tg.ATTN_GATE_WINDOW)) for b in gated.blocks)
    with torch.no_grad():
        for b in plain.blocks:
            b.attn.proj.weight.mul_(0.5)  # exact in floating point, as is y * 0.5
        ids = torch.randint(0, 512, (2, 48))
        gated.looping = plain.looping = True
        assert torch.equal(forward_logits(gated, ids), forward_logits(plain, ids))


def test_gate_formula_per_token_and_head():
    """g[t, h] = sigmoid(<W_h, u_t[:12]>) multiplies head h's output (after XSA) before the output projection."""
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    args = dict(dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, rope_base=10000.0, qk_gain_init=1.5, xsa=True,
                max_len=32)
    gated, plain = tg.Attention(**args, gate=True), tg.Attention(**args, gate=False)
    with torch.no_grad():
        gated.attn_gate_w.normal_()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "attn_gate_w"})
    seen = {}
    for name, m in (("gated", gated), ("plain", plain)):
        m.proj.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    u = torch.randn(2, 20, 64)
    with torch.no_grad():
        gated(u), plain(u)
    g = torch.sigmoid(u[..., :12] @ gated.attn_gate_w.T)  # [B, T, H]
    expected = (seen["plain"].view(2, 20, 4, 16) * g[..., None]).reshape(2, 20, 64)
    torch.testing.assert_close(seen["gated"], expected)
    assert g.std() > 0.1  # the gates really differ across tokens and heads


def test_gate_is_a_scalar_adamw_parameter():
    hp = smoke_hp()
    model = tg.build_model(hp, torch.device("cpu"))
    adamw, muon = tg.build_optimizers(model, hp, rank=0, world_size=1)
    gates = {id(b.attn.attn_gate_w) for b in model.blocks}
    scalar_group = {id(p) for p in adamw.param_groups[1]["params"]}
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert len(gates) == hp.num_layers and gates <= scalar_group and not gates & muon_params
    assert adamw.param_groups[1]["lr"] == hp.scalar_lr


def test_no_gate_parameter_when_disabled():
    model = tg.build_model(smoke_hp(sparse_attn_gate_enabled=0), torch.device("cpu"))
    assert not any("attn_gate_w" in name for name, _ in model.named_parameters())


def test_gate_quantization_is_per_row_int8_within_half_a_step():
    torch.manual_seed(0)
    W = torch.randn(8, 12) * torch.logspace(-3, 0, 8)[:, None]  # rows of very different scales
    W[5] = 0  # a row that is still zero
    q, s = tg.rowmax_int8_quantize(W)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (8,)
    assert torch.equal(s[0], (W[0].abs().max() / 127).half())
    assert q.abs().max() == 127 and (q[5] == 0).all() and s[5] > 0
    err = (q.float() * s.float()[:, None] - W).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-3)).all()


def test_only_gate_sized_tensors_take_the_gate_path():
    assert tg.is_attn_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 12))
    assert not tg.is_attn_gate("blocks.3.attn.attn_gate_w", torch.zeros(2, 12))  # 24 < 32 elements
    assert not tg.is_attn_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 1100))  # > 8192 elements
    assert not tg.is_attn_gate("blocks.3.attn.q_gain", torch.zeros(8, 12))
    assert not tg.is_attn_gate("blocks.3.attn.attn_gate_w", torch.zeros(96))


def test_model_artifact_round_trip_keeps_the_gates(monkeypatch):
    monkeypatch.setattr(tg, "QUANT_PASSTHROUGH_NUMEL", 1024)
    hp = smoke_hp(size_target_bytes=0)
    model = perturbed_model(hp)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.attn_gate_w.normal_(0, 0.3)
    state = model.state_dict()
    blob, _ = tg.build_artifact(state, {}, hp, code_bytes=0, log=lambda s: None)
    tensors, meta = tg.unpack_artifact(blob)
    name = "blocks.2.attn.attn_gate_w"
    assert meta[name] == "rowmax (int8)" and tensors[name + ".q"].dtype == torch.int8
    assert "rowmax (int8): blocks.attn.attn_gate_w" in "\n".join(tg.describe_quantization(meta))
    fresh = tg.build_model(hp, torch.device("cpu"))
    fresh.load_state_dict(tg.dequantize_state_dict(tensors, meta, fresh.state_dict()))
    for i, b in enumerate(fresh.blocks):
        W = state[f"blocks.{i}.attn.attn_gate_w"]
        step = W.abs().amax(dim=1, keepdim=True) / 127
        assert b.attn.attn_gate_w.dtype == torch.float32
        assert ((b.attn.attn_gate_w - W).abs() <= step / 2 * (1 + 1e-3)).all()
