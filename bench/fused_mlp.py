"""Fused LeakyReLU² MLP (train_gpt.py section 3) against the module path, on one GPU.

    python3 bench/fused_mlp.py [--rows 98304] [--dim 512] [--hidden 2048] [--iters 20] [--out DIR] [--no-sweep]

1. Correctness at the shape: the fused output and gradients (u, W_fc, W_proj; bf16) and the module path's, each
   against an fp32 reference from the same bf16 inputs. The fused path passes if each of its errors is at most 1.25×
   the module path's plus 1e-3 (both round the same intermediates to bf16; the fused one rounds d post once less).
2. Timing (median of --iters, CUDA events) of forward and forward + backward, and the peak memory above the inputs:
   the module path eagerly and under torch.compile(fullgraph=True) (what the training region runs unfused), and the
   fused op eagerly and compiled.
3. Tile sweep (FUSED_MLP_TILES) of each fused GEMM alone, next to cuBLAS doing the bare GEMM, with each result's
   error against cuBLAS's GEMM + the activation in fp32; the fastest correct config is printed and saved as
   best_tiles (bench/profile_step.py --mlp-tiles takes it, to time it in a whole training step).

Prints tables and writes <out>/fused_mlp.json (out: --out, else $OUT, else bench_out).
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
from cuda_timing import median_ms, peak_mib, print_table, write_result  # noqa: E402

CONFIGS = [dict(BM=bm, BN=bn, BK=bk, GROUP_M=g, num_warps=w, num_stages=st) for bm, bn, bk, w, st, g in
           [(128, 256, 64, 8, 4, 8), (128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 16), (128, 128, 64, 8, 4, 8),
            (128, 128, 64, 4, 4, 8), (256, 128, 64, 8, 3, 8), (256, 128, 64, 8, 4, 8), (128, 128, 64, 8, 5, 8),
            (128, 256, 128, 8, 2, 8)]]


def module_mlp(u, w_fc, w_proj):
    return F.linear(F.leaky_relu(F.linear(u, w_fc), 0.5).square(), w_proj)


def inputs(rows: int, dim: int, hidden: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(rows, dim, device="cuda", generator=g).bfloat16().requires_grad_()
    w_fc = (torch.randn(hidden, dim, device="cuda", generator=g) * dim ** -0.5).bfloat16().requires_grad_()
    w_proj = (torch.randn(dim, hidden, device="cuda", generator=g) * hidden ** -0.5).bfloat16().requires_grad_()
    grad = torch.randn(rows, dim, device="cuda", generator=g).bfloat16()
    return [u, w_fc, w_proj], grad


def outputs_and_grads(fn, leaves, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check(rows: int, dim: int, hidden: int) -> dict:
    leaves, grad = inputs(rows, dim, hidden)
    ref = outputs_and_grads(module_mlp, [t.float() for t in leaves], grad)
    names = ["out", "d_u", "d_w_fc", "d_w_proj"]

    def errors(results):
        return {n: float((r.float() - e).abs().max() / e.abs().max()) for n, r, e in zip(names, results, ref)}

    fused, module = errors(outputs_and_grads(tg.leaky_relu_sq_mlp, leaves, grad)), \
        errors(outputs_and_grads(module_mlp, leaves, grad))
    ok = all(fused[n] <= 1.25 * module[n] + 1e-3 for n in names)
    return dict(rows=rows, fused=fused, module=module, ok=ok)


def time_variants(rows: int, dim: int, hidden: int, iters: int) -> list[dict]:
    leaves, grad = inputs(rows, dim, hidden)
    results = []
    for name, fn in (("module", module_mlp), ("module+compile", torch.compile(module_mlp, fullgraph=True)),
                     ("fused", tg.leaky_relu_sq_mlp), ("fused+compile", torch.compile(tg.leaky_relu_sq_mlp,
                                                                                        fullgraph=True))):
        def forward():
            with torch.no_grad():
                fn(*leaves)

        def forward_backward():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)

        # no_grad forward of the fused op: the custom op still runs its kernels (the module decides by grad mode)
        results.append(dict(variant=name, fwd_ms=median_ms(forward, iters),
                            fwd_bwd_ms=median_ms(forward_backward, iters), peak_fwd_bwd_mib=peak_mib(forward_backward)))
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()
    return results


def sweep(rows: int, dim: int, hidden: int, iters: int) -> list[dict]:
    """Each config's GEMMs timed alone, with their error against cuBLAS's GEMM and the activation in fp32."""
    leaves, grad = inputs(rows, dim, hidden)
    u, w_fc, w_proj = (t.detach() for t in leaves)
    ref_pre = u @ w_fc.t()
    ref_post = F.leaky_relu(ref_pre.float(), 0.5).square()
    ref_d_pre = (grad @ w_proj).float() * torch.where(ref_pre > 0, 2.0, 0.5) * ref_pre.float()
    out = [dict(gemm="up", config="cuBLAS mm only", ms=median_ms(lambda: u @ w_fc.t(), iters)),
           dict(gemm="grad", config="cuBLAS mm only", ms=median_ms(lambda: grad @ w_proj, iters))]
    default = tg.FUSED_MLP_TILES

    def rel(r, e):
        return float((r.float() - e.float()).abs().max() / e.float().abs().max())

    try:
        for cfg in CONFIGS:
            label = "{BM}x{BN}x{BK} w{num_warps} s{num_stages} g{GROUP_M}".format(**cfg)
            tg.FUSED_MLP_TILES = cfg
            pre, post, d_pre = (torch.empty(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            checks = (("up", lambda: tg._mlp_gemm(u, w_fc, pre, post, up=True),
                       lambda: max(rel(pre, ref_pre), rel(post, ref_post))),
                      ("grad", lambda: tg._mlp_gemm(grad, w_proj, d_pre, ref_pre, up=False),
                       lambda: rel(d_pre, ref_d_pre)))
            for gemm, call, error in checks:
                try:
                    call()
                    out.append(dict(gemm=gemm, config=label, tiles=cfg, rel_err=error(), ms=median_ms(call, iters)))
                except Exception as e:  # e.g. out of shared memory: report and go on
                    out.append(dict(gemm=gemm, config=label, tiles=cfg, error=f"{type(e).__name__}: {e}"[:300]))
    finally:
        tg.FUSED_MLP_TILES = default
    return out


def best_tiles(rows: list[dict]) -> dict | None:
    """The config with the least up + grad time among those whose two GEMMs both ran within 1e-2 of the reference."""
    totals = {}
    for r in rows:
        if "tiles" in r:
            ms = r["ms"] if r.get("rel_err", 1.0) <= 1e-2 else float("inf")
            tiles, total, n = totals.get(r["config"], (r["tiles"], 0.0, 0))
            totals[r["config"]] = (tiles, total + ms, n + 1)
    done = [(total, tiles) for tiles, total, n in totals.values() if n == 2 and total < float("inf")]
    return min(done, key=lambda c: c[0])[1] if done else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=48 * 2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available() or tg.triton is None:
        raise SystemExit("bench/fused_mlp.py needs a CUDA GPU and Triton")
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=tg.triton.__version__,
               rows=args.rows, dim=args.dim, hidden=args.hidden, tiles=tg.FUSED_MLP_TILES)
    print(" ".join(f"{k}:{v}" for k, v in env.items()))
    checks = [check(args.rows, args.dim, args.hidden), check(1000, args.dim, args.hidden)]
    print("\ncorrectness: max |error| / max |reference| against fp32, fused and module path")
    for c in checks:
        print(f"rows {c['rows']}: ok {c['ok']}  " + "  ".join(f"{n} {c['fused'][n]:.2e}/{c['module'][n]:.2e}"
                                                              for n in c["fused"]))
    timings = time_variants(args.rows, args.dim, args.hidden, args.iters)
    print(f"\ntiming, u [{args.rows}, {args.dim}] bf16, hidden {args.hidden} (median ms; peak MiB above the inputs)")
    print_table(timings, ["variant", "fwd_ms", "fwd_bwd_ms", "peak_fwd_bwd_mib"])
    tiles = [] if args.no_sweep else sweep(args.rows, args.dim, args.hidden, args.iters)
    if tiles:
        print("\nfused GEMMs alone by tile config")
        print_table(tiles, ["gemm", "config", "ms", "rel_err"])
    best = best_tiles(tiles) if tiles else None
    if best:
        print("fastest config (up + grad):", json.dumps(best))
    result = dict(env=env, correctness=checks, all_ok=all(c["ok"] for c in checks), timings=timings, sweep=tiles,
                  best_tiles=best)
    path = write_result(args.out, "fused_mlp.json", result)
    print(f"\nall correctness checks ok: {result['all_ok']}; wrote {path}")


if __name__ == "__main__":
    main()
