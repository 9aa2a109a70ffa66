"""Fused MLP micro-benchmark on one GPU: forward+backward of one MLP call at the training shape, the torch.compile'd
plain MLP against the fused Triton kernels (train_gpt.py, FUSED_MLP=1), plus a correctness check on CUDA.

    python3 bench/fused_mlp.py [--rows 98304] [--dim 512] [--hidden 2048] [--iters 50] [--warm-cache] [--out DIR]

Both run as in training: fp32 master weights cast to bf16 under bf16 autocast, the module in training mode,
torch.compile(fullgraph=True, dynamic=False); input u is [rows/2048, 2048, dim] bf16. Reports median times (CUDA
events) of the forward alone and of forward+backward, the activation memory each keeps for the backward, the first
call of the fused kernels (Triton compile + autotune; a fresh Triton cache unless --warm-cache), the chosen tile
configs, and the errors of both paths against an fp32 reference (TF32 off). Exits 1 if the fused path is less
accurate than the plain bf16 one (10% slack) or off by more than 1.5%. Writes <out>/fused_mlp.json ($OUT or
bench_out by default).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP_CALLS = {"per step, 1 GPU, no loop (8 micro-batches x 11 layers)": 88,
              "per step, 1 GPU, looped (8 x 17 layer passes)": 136}


def median_ms(fn, iters: int) -> float:
    import torch

    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_variant(tg, mlp, u, g_out, fused: bool, iters: int) -> tuple[dict, list]:
    """Times of forward and forward+backward, saved activation bytes, and (out, du, dW_up, dW_down) of one call."""
    import torch

    tg.enable_fused_mlp(mlp, fused)
    assert mlp.fused == fused, "fused path not available (Triton missing or model dim not a multiple of 64)"
    compiled = torch.compile(mlp, fullgraph=True, dynamic=False)
    x = u.detach().clone().requires_grad_()

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return compiled(x)

    def step():
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(g_out)

    t0 = time.perf_counter()
    for _ in range(3):  # compile, autotune, settle
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    fwd_ms = median_ms(forward, iters)
    step_ms = median_ms(step, iters)
    mlp.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = forward()
    saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.backward(g_out)
    results = [t.detach().float() for t in (out, x.grad, mlp.fc.weight.grad, mlp.proj.weight.grad)]
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=step_ms, bwd_ms=step_ms - fwd_ms, saved_activation_mib=saved / 2**20,
                warmup_s=warmup_s), results


def reference(mlp, u, g_out):
    """fp32 MLP without TF32, eager."""
    import torch
    import torch.nn.functional as F

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = u.detach().float().requires_grad_()
        w_up = mlp.fc.weight.detach().clone().requires_grad_()
        w_down = mlp.proj.weight.detach().clone().requires_grad_()
        out = F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)
        out.backward(g_out.float())
        return [t.detach() for t in (out, x.grad, w_up.grad, w_down.grad)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def first_fused_calls(tg, u, mlp) -> dict:
    """Seconds of the first forward and backward kernel calls: Triton compile of every config + autotuning."""
    import torch

    u2 = u.reshape(-1, u.shape[-1])
    w_up, w_down = mlp.fc.weight.detach().bfloat16(), mlp.proj.weight.detach().bfloat16()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, pre, _ = tg.fused_mlp_op(u2, w_up, w_down)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    tg.mlp_act_grad_op(out, w_down, pre)
    torch.cuda.synchronize()
    return dict(forward_s=t1 - t0, backward_s=time.perf_counter() - t1)


def tuned_configs(tg) -> dict:
    cache = getattr(getattr(tg, "_fused_mlp_gemm_tuned", None), "cache", {}) or {}
    return {str(key): str(cfg) for key, cfg in cache.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=98_304)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warm-cache", action="store_true", help="use the normal Triton cache (default: a fresh one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    if not args.warm_cache:  # before triton is imported, so that the first call measures a cold start
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")

    import torch

    import train_gpt as tg

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert tg.triton is not None, "needs Triton"
    torch.manual_seed(0)
    mlp = tg.MLP(args.dim, args.hidden).cuda()
    with torch.no_grad():  # random weights (the model zero-initializes proj, which would hide errors)
        mlp.fc.weight.normal_(std=args.dim ** -0.5)
        mlp.proj.weight.normal_(std=args.hidden ** -0.5)
    seq = 2048 if args.rows % 2048 == 0 else 1
    u = torch.randn(args.rows // seq, seq, args.dim, device="cuda").bfloat16()
    g_out = torch.randn(args.rows // seq, seq, args.dim, device="cuda").bfloat16()

    first = first_fused_calls(tg, u, mlp)
    plain, plain_res = run_variant(tg, mlp, u, g_out, fused=False, iters=args.iters)
    fused, fused_res = run_variant(tg, mlp, u, g_out, fused=True, iters=args.iters)
    ref = reference(mlp, u, g_out)
    rel = lambda x, r: ((x - r).norm() / r.norm()).item()
    errors, ok = {}, True
    for name, p, f, r in zip(("out", "du", "dW_up", "dW_down"), plain_res, fused_res, ref):
        errors[name] = dict(plain=rel(p, r), fused=rel(f, r), fused_vs_plain=rel(f, p))
        ok &= errors[name]["fused"] <= 1.1 * errors[name]["plain"] + 1e-4 and errors[name]["fused"] < 1.5e-2
    flops = 6 * 2 * args.rows * args.dim * args.hidden  # two forward GEMMs, four backward
    saved_ms = plain["fwd_bwd_ms"] - fused["fwd_bwd_ms"]
    result = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=tg.triton.__version__,
        shape=dict(rows=args.rows, dim=args.dim, hidden=args.hidden), iters=args.iters,
        compiled_plain=plain, fused=fused,
        speedup_fwd_bwd=plain["fwd_bwd_ms"] / fused["fwd_bwd_ms"], saved_ms_per_call=saved_ms,
        saved_ms_projected={k: saved_ms * n for k, n in STEP_CALLS.items()},
        tflops_fwd_bwd=dict(compiled_plain=flops / plain["fwd_bwd_ms"] / 1e9, fused=flops / fused["fwd_bwd_ms"] / 1e9),
        first_fused_call_s=first, triton_cache="warm" if args.warm_cache else "fresh",
        tuned_configs=tuned_configs(tg), rel_errors_vs_fp32=errors, correct=bool(ok),
    )

    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  "
          f"u [{args.rows}, {args.dim}] -> hidden {args.hidden}, bf16 autocast, median of {args.iters}")
    print(f"{'':<16}{'fwd ms':>9}{'bwd ms':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'saved act MiB':>15}")
    for name, r in (("compiled plain", plain), ("fused", fused)):
        tf = result["tflops_fwd_bwd"]["fused" if name == "fused" else "compiled_plain"]
        print(f"{name:<16}{r['fwd_ms']:>9.3f}{r['bwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{tf:>9.0f}"
              f"{r['saved_activation_mib']:>15.0f}")
    print(f"speedup {result['speedup_fwd_bwd']:.2f}x, saved {saved_ms:.3f} ms per MLP call; "
          + "; ".join(f"{k}: {v:.1f} ms" for k, v in result["saved_ms_projected"].items()))
    print(f"first fused calls (Triton compile + autotune, {result['triton_cache']} cache): "
          f"forward {first['forward_s']:.1f} s, backward {first['backward_s']:.1f} s")
    for key, cfg in result["tuned_configs"].items():
        print(f"tuned {key}: {cfg}")
    print(f"{'rel. error vs fp32':<20}{'plain':>10}{'fused':>10}{'fused-plain':>13}")
    for name, e in errors.items():
        print(f"{name:<20}{e['plain']:>10.2e}{e['fused']:>10.2e}{e['fused_vs_plain']:>13.2e}")
    print("correctness:", "OK" if ok else "FAILED")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_mlp.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'fused_mlp.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
