"""One transformer block at the training shape, forward + backward, as the compiled training region runs it (GPU).

    python3 bench/block.py [--iters 20] [--out DIR] [--variants a,b]

Times run_block (COMPILE_SCOPE=blocks' region) on a sequential block (layer 0) and a parallel-residual block (the
first layer >= PARALLEL_RESIDUAL_START) of the default model: x, x0 [48, 2048, 512] bf16 under autocast, median of
--iters CUDA-event timings after warm-up of forward + backward (fwd_bwd_ms: the training step) and of the no-grad
forward (fwd_ms: what evaluation runs, so with the module MLP, not the fused one, whatever the variant). Variants
are alternative forward implementations defined below, timed the same way and checked against the current
implementation (output and input gradients); `current` is train_gpt.py as it is. Prints a table and writes <out>/block.json.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from cuda_timing import median_ms, write_result  # noqa: E402


def attention_forward(kv_expand=False, bhtd=False):
    """Candidate Attention.forward implementations (doc_mask and lora unsupported: the bench passes neither)."""
    def forward(self, u, doc_mask=None, lora=None, qkv=None):
        B, T, C = u.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv if qkv is not None else (self.c_q(u), self.c_k(u), self.c_v(u))
        q, k, v = q.view(B, T, H, Dh), k.view(B, T, Hkv, Dh), v.view(B, T, Hkv, Dh)
        q, k = self.rotary(tg.rms_norm(q)), self.rotary(tg.rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        kk, vv = k, v
        if kv_expand:
            kk, vv = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        qt, kt, vt = q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)
        if bhtd:
            qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=not kv_expand).transpose(1, 2)
        if self.xsa:
            y = tg.exclusive_self_attention(y, v)
        if self.attn_gate_w is not None:
            gate = torch.sigmoid(F.linear(u[..., :tg.ATTN_GATE_WINDOW], self.attn_gate_w.to(u.dtype)))
            y = y * gate.to(y.dtype)[..., None]
        return self.proj(y.reshape(B, T, -1))

    return forward


def rotary_swapped(self, x):
    """RoPE as x * C + swap(x) * S with full-width tables (no arithmetic inside the concatenation)."""
    T, half, D = x.size(1), self.dims // 2, x.size(-1)
    cos, sin = self.cos[:, :T], self.sin[:, :T]
    rest = cos[..., :1].expand(*cos.shape[:-1], D - self.dims)
    C = torch.cat((cos, cos, torch.ones_like(rest)), -1).to(x.dtype)
    S = torch.cat((sin, -sin, torch.zeros_like(rest)), -1).to(x.dtype)
    swapped = torch.cat((x[..., half:self.dims], x[..., :half], x[..., self.dims:]), -1)
    return x * C + swapped * S


def patch(cls, name, fn):
    return lambda model: setattr(cls, name, fn)


def unfused_projections(model):
    for b in model.blocks:
        b.fused_linears = False


def unfused_mlp(model):
    for b in model.blocks:
        b.mlp.fused = False


# name -> setup(model), applied after the classes and the blocks are restored to train_gpt.py's state. Measured on an
# H100 (fwd+bwd ms per call, sequential / parallel block), each run against its own `current`:
# - XSA normalizing v first (then current) 8.141 / 7.964; XSA as one reduction (now exclusive_self_attention) 7.907 /
#   7.713.
# - separate input projections (then current) 8.077 / 7.809; one GEMM for the parallel block's q, k, v and fc
#   7.568 (parallel); one GEMM for q, k, v alone 8.064 / 7.937 (against 8.141 / 7.964): both adopted.
# - kv_expand (K/V repeated to 8 heads, no GQA in cuDNN) 8.146 / 7.978, bhtd (q, k, v contiguous [B, H, T, D])
#   8.097 / 7.972, rope_swapped 8.009 / 7.787 (against 8.077 / 7.809): not adopted.
VARIANTS = {
    "current": lambda model: None,
    "rewritten": patch(tg.Attention, "forward", attention_forward()),  # current's math: checks the harness
    "unfused_projections": unfused_projections,
    "unfused_mlp": unfused_mlp,
    "kv_expand": patch(tg.Attention, "forward", attention_forward(kv_expand=True)),
    "bhtd": patch(tg.Attention, "forward", attention_forward(bhtd=True)),
    "rope_swapped": patch(tg.Rotary, "forward", rotary_swapped),
}


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def time_block(block, x, x0, grad, iters: int) -> tuple[float, float, torch.Tensor, list]:
    region = tg.compiled_regions(tg.COMPILE_BACKEND)(tg.run_block)
    with torch.autocast("cuda", dtype=torch.bfloat16), tg.sdpa_context():
        def fwd_bwd():
            x.grad = x0.grad = None
            region(block, x, x0)[0].backward(grad)

        def fwd():
            with torch.no_grad():
                region(block, x, x0)

        fwd_bwd()
        for p in block.parameters():
            p.grad = None
        out = region(block, x, x0)[0]
        x.grad = x0.grad = None
        out.backward(grad)
        grads = [x.grad.clone(), x0.grad.clone()] + [p.grad.clone() for p in block.parameters()]
        for p in block.parameters():
            p.grad = None
        return median_ms(fwd, iters), median_ms(fwd_bwd, iters), out.detach(), grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/block.py needs a GPU"
    hp = tg.load_hyperparameters()
    tg.configure_attention(hp.attention_backend)
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cuda"))
    with torch.no_grad():  # trained-like scales: zero-initialized projections would hide the attention/MLP paths
        for p in model.parameters():
            if p.ndim == 2 and p is not model.tok_emb.weight:
                p.normal_(0, p.size(1) ** -0.5)
    layers = {"sequential": 0, "parallel": max(hp.parallel_residual_start, 0)}
    B, T, D = hp.train_batch_tokens // (8 * hp.train_seq_len), hp.train_seq_len, hp.model_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    x0 = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    grad = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    rows, reference = [], {}
    originals = {cls: cls.forward for cls in (tg.Attention, tg.Rotary)}  # the classes the variants patch
    for variant in args.variants.split(","):
        for cls, fn in originals.items():
            cls.forward = fn
        for b in model.blocks:
            b.fused_linears, b.mlp.fused = True, bool(hp.fused_mlp)
        VARIANTS[variant](model)
        torch._dynamo.reset()
        tg._COMPILED_REGIONS.clear()
        for kind, layer in layers.items():
            fwd_ms, fwd_bwd_ms, out, grads = time_block(model.blocks[layer], x, x0, grad, args.iters)
            row = dict(variant=variant, block=kind, layer=layer, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms)
            if variant == "current":
                reference[kind] = (out, grads)
            elif kind in reference:
                row["err_out"] = rel_err(out, reference[kind][0])
                row["err_grad"] = max(rel_err(a, b) for a, b in zip(grads, reference[kind][1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_result(args.out, "block.json", dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                              shape=[B, T, D], rows=rows))
    print(f"\n{'variant':<16}{'block':<12}{'fwd ms':>8}{'fwd+bwd':>9}{'err_out':>9}{'err_grad':>9}")
    for r in rows:
        print(f"{r['variant']:<16}{r['block']:<12}{r['fwd_ms']:>8.3f}{r['fwd_bwd_ms']:>9.3f}"
              f"{r.get('err_out', 0):>9.4f}{r.get('err_grad', 0):>9.4f}")


if __name__ == "__main__":
    main()
