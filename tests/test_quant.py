"""Section 6 of train_gpt.py: Hessians, GPTQ, the artifact container, the size rule and the size autopilot (CPU)."""
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


# ----- a stand-in with the real model's module names -----------------------------------------------------------------

class CastedLinear(nn.Linear):
    def __init__(self, i, o):
        super().__init__(i, o, bias=False)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_q, self.c_k, self.c_v, self.proj = CastedLinear(d, d), CastedLinear(d, d // 2), CastedLinear(d, d // 2), CastedLinear(d // 2, d)

    def forward(self, x):
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        return self.proj(torch.tanh(q[..., : k.shape[-1]] * k) * v)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc, self.proj = CastedLinear(d, 2 * d), CastedLinear(2 * d, d)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn, self.mlp = Attn(d), MLP(d)
        self.attn_scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x + self.attn_scale * self.attn(nn.functional.rms_norm(x, (x.shape[-1],)))
        return x + self.mlp(nn.functional.rms_norm(x, (x.shape[-1],)))


class StandIn(nn.Module):
    """blocks.{i}.attn.c_q|c_k|c_v|proj, blocks.{i}.mlp.fc|proj, tied tok_emb (bf16), final_norm, looping."""

    def __init__(self, vocab=96, d=64, layers=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok_emb = nn.Embedding(vocab, d).to(torch.bfloat16)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.final_norm = nn.RMSNorm(d, elementwise_affine=False)
        self.looping = False

    def forward(self, x, y):
        h = self.tok_emb(x).float()
        order = list(range(len(self.blocks)))
        if self.looping:
            order = order[:2] + order[1:]  # block 1 runs twice
        for i in order:
            h = self.blocks[i](h)
        h = self.final_norm(h)
        logits = h @ self.tok_emb.weight.float().T
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(n=3, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (4, 32), generator=g), torch.randint(0, vocab, (4, 32), generator=g)) for _ in range(n)]


@pytest.fixture
def small_threshold(monkeypatch):
    # the stand-in's matrices are small; quantize everything above 1024 elements instead of 65,536
    monkeypatch.setattr(tg, "QUANT_PASSTHROUGH_NUMEL", 1024)


def hp(**kw):
    """Default settings with the size autopilot off unless a test asks for a target."""
    return tg.Hyperparameters(**{"size_target_bytes": 0, **kw})


def correlated_layer(rows=96, cols=128, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)[:, None]
    X = torch.randn(n, cols, generator=g) @ mix + 0.3 * torch.randn(n, 1, generator=g)
    X[:, 5] = 0  # a dead input
    W = torch.randn(rows, cols, generator=g) * 0.02
    return W, X.T @ X / n


def weighted_error(W, q, s, H):
    D = W - q.float() * s.float()[:, None]
    return float(torch.trace(D @ H @ D.T))


def reference_gptq(W, H, bits, k, block=128):
    """Textbook single-matrix GPTQ, one column at a time (ANCHORS §5.2), to check the vectorized one against."""
    qmax = 2 ** (bits - 1) - 1
    s = tg.sdclip_scale(W, bits, k).float()
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, E1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for j in range(i2 - i1):
            q = torch.clamp(torch.round(W1[:, j] / s), -qmax, qmax)
            Q[:, i1 + j] = q
            e = (W1[:, j] - q * s) / U[i1 + j, i1 + j]
            W1[:, j:] -= e[:, None] * U[i1 + j, i1 + j:i2][None, :]
            E1[:, j] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8)


# ----- GPTQ -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    W, H = correlated_layer()
    q_g, s_g = tg.gptq_quantize(W, H, bits, 12.85, block_size=32)
    q_r, s_r = tg.rtn_quantize(W, bits, 12.85)
    assert torch.equal(s_g, s_r)
    e_g, e_r = weighted_error(W, q_g, s_g, H), weighted_error(W, q_r, s_r, H)
    assert e_g < 0.7 * e_r, (e_g, e_r)


def test_gptq_matches_textbook_reference():
    W, H = correlated_layer(rows=40, cols=80)
    q = tg.gptq_quantize(W, H, 5, 10.0, block_size=32)[0]
    ref = reference_gptq(W, H, 5, 10.0, block=32)
    assert (q != ref).float().mean() < 1e-3  # float summation order may flip a rare tie


def test_quantized_values_and_error_bounded_by_scale():
    W, H = correlated_layer(cols=512)
    W[3, 7] = 0.5  # an outlier beyond 12.85 sigma of its row gets clipped (rows need > 166 entries for that)
    for bits in (6, 8):
        qmax = 2 ** (bits - 1) - 1
        for q, s in (tg.rtn_quantize(W, bits, 12.85), tg.gptq_quantize(W, H, bits, 12.85)):
            assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.abs().max() <= qmax
        q, s = tg.rtn_quantize(W, bits, 12.85)
        err = (W - q.float() * s.float()[:, None]).abs()
        inside = W.abs() <= qmax * s.float()[:, None]
        assert inside.float().mean() > 0.99 and not inside[3, 7]
        assert (err[inside] <= s.float()[:, None].expand_as(W)[inside] / 2 * (1 + 1e-5)).all()


def test_scale_formula_and_zero_row():
    W = torch.randn(4, 300)
    W[2] = 0
    s = tg.sdclip_scale(W, 6, 12.85)
    assert torch.equal(s[0], (12.85 * W[0].std() / 31).half())
    assert s[2] > 0  # a constant row still has a positive step; its weights quantize to 0
    assert (tg.rtn_quantize(W, 6, 12.85)[0][2] == 0).all()


# ----- Hessians and the state dict ------------------------------------------------------------------------------------

def test_collect_hessians_names_values_and_cleanup(small_threshold, monkeypatch):
    model = StandIn()
    model.train()
    grams = []
    monkeypatch.setattr(tg, "_gram", lambda x, gram=tg._gram: grams.append(1) or gram(x))
    H, seconds = tg.collect_hessians(model, batches())
    # per batch: 3 blocks x (the q/k/v input once, attn.proj's, fc's, mlp.proj's) + the embedding's = 13 products,
    # not 19 (one per matrix)
    assert len(grams) == len(batches()) * 13
    kinds = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    names = {f"blocks.{i}.{m}.weight" for i in range(3) for m in kinds} | {"tok_emb.weight"}
    assert set(H) == names and seconds >= 0
    assert torch.equal(H["blocks.0.attn.c_q.weight"], H["blocks.0.attn.c_k.weight"])
    assert model.training and all(not m._forward_hooks for m in model.modules())
    # tok_emb's Hessian is the final-norm output's second moment, averaged over batches
    xs = []
    hook = model.final_norm.register_forward_hook(lambda m, i, o: xs.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        for x, y in batches():
            model(x, y)
    hook.remove()
    manual = sum(x.T @ x for x in xs) / len(xs)
    torch.testing.assert_close(H["tok_emb.weight"], manual)
    # with the depth loop on, the looped block accumulates both passes
    model.looping = True
    H_loop, _ = tg.collect_hessians(model, batches())
    assert H_loop["blocks.1.mlp.fc.weight"].trace() > 1.5 * H["blocks.1.mlp.fc.weight"].trace()


def test_state_dict_round_trip_and_batched_plan_matches_single_matrix_gptq(small_threshold):
    model = StandIn()
    H, _ = tg.collect_hessians(model, batches())
    sd = model.state_dict()
    config = hp(attn_clip_sigmas=13.0, mlp_clip_sigmas=11.0)
    tensors, meta = tg.quantize_state_dict(sd, H, config)
    assert meta["tok_emb.weight"] == "gptq (int8)" and meta["blocks.0.mlp.fc.weight"] == "gptq (int6)"
    assert meta["blocks.0.attn_scale"] == "passthrough (float16)"
    for name in ("blocks.1.attn.c_k.weight", "blocks.2.mlp.proj.weight", "tok_emb.weight"):
        bits, k = tg.clip_group(name, config)
        q, s = tg.gptq_quantize(sd[name], H[name], bits, k)
        assert torch.equal(tensors[name + ".scale"], s)
        assert (tensors[name + ".q"] != q).float().mean() < 1e-3
    restored = tg.dequantize_state_dict(tensors, meta, sd)
    assert all(restored[n].dtype == sd[n].dtype and restored[n].shape == sd[n].shape for n in sd)
    assert restored["tok_emb.weight"].dtype == torch.bfloat16
    model.load_state_dict(restored)
    with pytest.raises(tg.ArtifactError, match="does not match the model"):
        tg.dequantize_state_dict(tensors, meta, StandIn(layers=2).state_dict())


def test_large_matrix_without_hessian_falls_back_to_rtn(small_threshold):
    sd = {"extra.weight": torch.randn(64, 64), "small": torch.randn(8), "step": torch.tensor(3)}
    tensors, meta = tg.quantize_state_dict(sd, {}, hp())
    assert meta == {"extra.weight": "rtn (int6)", "small": "passthrough (float16)", "step": "passthrough (int64)"}
    assert torch.equal(tensors["extra.weight.q"], tg.rtn_quantize(sd["extra.weight"], 6, 12.85)[0])


# ----- container ------------------------------------------------------------------------------------------------------

def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.q": torch.randint(-31, 32, (33, 17), generator=g, dtype=torch.int8),
        "a.scale": torch.rand(33, generator=g).half(),
        "b": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "c": torch.randn(7, generator=g),
        "count": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_serialize_load_is_bit_exact(tmp_path, compressor):
    tensors, meta = sample_tensors(), {"a": "gptq (int6)", "b": "passthrough (bfloat16)"}
    path = tmp_path / "m.ptz"
    tg.atomic_write_bytes(path, tg.pack_artifact(tensors, meta, compressor))
    loaded, meta2 = tg.load_artifact(path)
    assert meta2 == meta and set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(loaded[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_byte_shuffle_round_trip():
    for n in (0, 1, 2, 7, 1000):
        data = os.urandom(n)
        assert tg.byte_unshuffle(tg.byte_shuffle(data)) == data
        assert tg.byte_unshuffle(tg.byte_shuffle(data, 3)) == data
    assert tg.byte_shuffle(b"abcdef") == b"BSHF\x02ace" + b"bdf"


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = tmp_path / "m.ptz"
    tg.atomic_write_bytes(path, tg.pack_artifact(sample_tensors(), {}, "brotli"))

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading an artifact")

    for mod, attr in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, forbidden)
    assert set(tg.load_artifact(path)[0]) == set(sample_tensors())
    assert path.read_bytes()[:4] == tg.ARTIFACT_MAGIC


def test_corrupt_or_truncated_artifact_is_refused_clearly(tmp_path):
    blob = tg.pack_artifact(sample_tensors(), {"a": "gptq (int6)"}, "brotli")
    path = tmp_path / "m.ptz"
    cases = {
        "flip in payload": (blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:], "checksum mismatch"),
        "flip in chunk table": (blob[:17] + bytes([blob[17] ^ 0x40]) + blob[18:], "truncated or padded"),
        "flip in magic": (b"X" + blob[1:], "not a train_gpt.py artifact"),
        "truncated": (blob[: len(blob) // 2], "truncated"),
        "truncated header": (blob[:9], "truncated"),
        "extra bytes": (blob + b"\0", "truncated or padded"),
        "other version": (blob[:4] + b"\x09\x00" + blob[6:], "format version 9"),
    }
    for case, (data, message) in cases.items():
        path.write_bytes(data)
        with pytest.raises(tg.ArtifactError, match=message) as e:
            tg.load_artifact(path)
        assert str(path) in str(e.value), case
    with pytest.raises(tg.ArtifactError, match="cannot read"):
        tg.load_artifact(tmp_path / "missing.ptz")
    for i in range(0, len(blob), 7):  # every flipped byte is caught, never mis-decoded
        with pytest.raises(tg.ArtifactError):
            tg.unpack_artifact(blob[:i] + bytes([blob[i] ^ 0x10]) + blob[i + 1:])


# ----- size rule and autopilot ----------------------------------------------------------------------------------------

def write_script(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(tg.wrap_source("print('hello from a tiny training script')\n" * 3))
    return script


def test_size_report_counts_the_real_files(tmp_path, monkeypatch):
    artifact, script = tmp_path / "m.ptz", write_script(tmp_path)
    tg.atomic_write_bytes(artifact, tg.pack_artifact(sample_tensors(), {}, "brotli"))
    total, lines, fits = tg.size_report(str(artifact), str(script), "brotli", autopilot=False)
    assert total == os.path.getsize(artifact) + os.path.getsize(script) and fits
    assert f"Total submission size quantized+brotli: {total} bytes" in lines
    monkeypatch.setattr(tg, "SIZE_CAP_BYTES", total - 1)
    total2, lines, fits = tg.size_report(str(artifact), str(script), "brotli", autopilot=False)
    assert total2 == total and not fits and "SIZE CAP EXCEEDED" in lines[-1] and "SIZE_TARGET_BYTES=" in lines[-1]
    # with the size search on, SIZE_TARGET_BYTES cannot help: the advice is about bits and model size
    lines = tg.size_report(str(artifact), str(script), "brotli", autopilot=True)[1]
    assert "MATRIX_BITS" in lines[-1] and "SIZE_TARGET_BYTES" not in lines[-1]


@pytest.fixture(scope="module")
def trained_like():
    """A stand-in big enough that compression is not dominated by headers (~150 kB quantized)."""
    tg_threshold = tg.QUANT_PASSTHROUGH_NUMEL
    tg.QUANT_PASSTHROUGH_NUMEL = 1024
    try:
        model = StandIn(vocab=512, d=96, layers=4)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:  # heavy-tailed rows with spread stds, like trained weights
                    p.copy_(torch.distributions.StudentT(5.0).sample(p.shape) * torch.exp(0.3 * torch.randn(p.shape[0], 1)) * 0.02)
        H, _ = tg.collect_hessians(model, batches(2, vocab=512))
    finally:
        tg.QUANT_PASSTHROUGH_NUMEL = tg_threshold
    return model.state_dict(), H


def test_larger_clip_multiplier_gives_smaller_artifacts(trained_like, monkeypatch):
    monkeypatch.setattr(tg, "QUANT_PASSTHROUGH_NUMEL", 1024)
    sd, H = trained_like
    plan = tg.plan_quantization(sd, H, hp())
    sizes = []
    for m in (0.8, 1.0, 1.5, 2.5):
        tensors, meta = tg.quantize_with_plan(plan, m)
        sizes.append((tg.estimate_compressed_bytes(tensors), len(tg.pack_artifact(tensors, meta, "brotli"))))
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(sizes, sizes[1:])), sizes


def test_autopilot_lands_under_a_target_the_defaults_exceed(trained_like, monkeypatch, tmp_path):
    monkeypatch.setattr(tg, "QUANT_PASSTHROUGH_NUMEL", 1024)
    sd, H = trained_like
    code_bytes = 5000
    default_blob, info0 = tg.build_artifact(sd, H, hp(), code_bytes, log=lambda s: None)
    assert info0["clip_scale"] == 1.0 and info0["model_bytes"] == len(default_blob)
    target = code_bytes + int(0.85 * len(default_blob))
    logs = []
    blob, info = tg.build_artifact(sd, H, hp(size_target_bytes=target), code_bytes, log=logs.append)
    assert len(blob) + code_bytes <= target, logs
    assert info["clip_scale"] > 1.0
    m, predicted, actual = info["rounds"][-1]
    assert abs(predicted - actual) / actual < 0.03, info["rounds"]
    assert len(blob) + code_bytes > 0.98 * target  # close under the target, not far below it
    assert any("size_autopilot: chose" in line for line in logs)
    # the artifact it chose loads back into the model
    tensors, meta = tg.unpack_artifact(blob)
    tg.dequantize_state_dict(tensors, meta, sd)


# ----- the real model (section 3), on CPU at smoke size ----------------------------------------------------------------

@pytest.mark.skipif(not hasattr(tg, "build_model"), reason="needs the model of section 3")
def test_real_gpt_calibrate_quantize_pack_load(small_threshold):
    config = tg.load_hyperparameters({"SMOKE": "1"})
    torch.manual_seed(0)
    model = tg.build_model(config, torch.device("cpu"))
    with torch.no_grad():  # an untrained model has zero projections; give every matrix trained-looking weights
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) * 0.05)
    model.looping = True
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, config.vocab_size, (2, 65), generator=g) for _ in range(2)]
    H, _ = tg.collect_hessians(model, [(s[:, :-1], s[:, 1:]) for s in seqs])
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.numel() > 1024}
    assert set(H) == linears | {"tok_emb.weight"}  # parallel blocks calibrate each linear, not their fused GEMM
    assert all(b.fused_linears for b in model.blocks)  # and fuse again afterwards
    last = config.num_layers - 1  # a parallel-residual layer: attention and MLP read one input, so one Hessian
    assert torch.equal(H[f"blocks.{last}.attn.c_q.weight"], H[f"blocks.{last}.mlp.fc.weight"])
    sd = model.state_dict()
    blob, info = tg.build_artifact(sd, H, config, code_bytes=0, log=lambda s: None)
    tensors, meta = tg.unpack_artifact(blob)
    fresh = tg.build_model(config, torch.device("cpu"))
    fresh.load_state_dict(tg.dequantize_state_dict(tensors, meta, fresh.state_dict()))
    fresh.looping = True
    with torch.no_grad():
        x, y = seqs[0][:, :-1], seqs[0][:, 1:]
        before, after = model(x, y).item(), fresh(x, y).item()
    assert 0 < abs(after - before) < 0.02 * before, (before, after)
