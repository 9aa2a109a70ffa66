"""Where a training step spends its GPU time: kernel table from torch.profiler, before and after looping.

    python3 bench/profile_step.py [--steps 4] [--out DIR] [--mlp-tiles JSON] [ENV=VALUE ...]

Builds the default model and Trainer exactly as train_gpt.py does (one GPU, same data env vars), runs the compile
warm-up (twice: the second, with nothing left to compile, times the warm-up's own steps), then per phase (looping
off, then on) times `--steps` optimizer steps without the profiler (the true wall time), profiles as many again, and
traces one more step. Prints per phase the step time, the share of each kernel category (matmul, attention, fused
elementwise, optimizer, communication, other), the top kernels and the GPU idle time inside the traced step (gaps
between kernels, with the CPU op that was running when each long gap began); writes <out>/profile_step.json and
the traces. Categories are by kernel name, so they are approximate; the profiler slows the CPU side, so idle time is
read from the trace but the step time from the unprofiled run.
"""
import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = (  # first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "flex")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_", "wgmma")),
    ("communication", ("nccl",)),
    ("fused_elementwise", ("triton",)),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def gpu_gaps(events: list[dict]) -> dict:
    """GPU idle time in a chrome trace's events: total, and the longest gaps with the CPU op running as each began."""
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                     if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu_ops = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                     if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation"))
    gaps, busy_until = [], kernels[0][0]
    for start, end in kernels:
        if start > busy_until:
            gaps.append((start - busy_until, busy_until))
        busy_until = max(busy_until, end)

    def running_at(ts):  # the innermost CPU op spanning ts
        spans = [(b - a, name) for a, b, name in cpu_ops if a <= ts <= b]
        return min(spans)[1][:100] if spans else "?"

    span = busy_until - kernels[0][0]
    top = sorted(gaps, reverse=True)[:15]
    return dict(span_ms=span / 1000, idle_ms=sum(g for g, _ in gaps) / 1000, gaps_over_50us=sum(g > 50 for g, _ in gaps),
                longest=[(round(g / 1000, 3), running_at(ts)) for g, ts in top])


def profile_phase(trainer, looping: bool, steps: int, out: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer.model.looping = looping
    for i in range(2):  # settle (any recompile happens here)
        trainer.step(i, 1.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.step(i, 1.0).item()  # as the training loop: one sync per step
    wall_ms = (time.perf_counter() - t0) * 1000 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            trainer.step(i, 1.0)
        torch.cuda.synchronize()
    trace = out / f"trace_looping{int(looping)}.json"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as traced:
        trainer.step(0, 1.0).item()
    traced.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())
    trace.unlink()
    with gzip.open(f"{trace}.gz", "wt") as f:  # ~10x smaller, for the device tool to bring back
        json.dump(events, f)
    idle = gpu_gaps(events["traceEvents"])
    kernels = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = evt.self_cuda_time_total
        if t > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + t / 1000 / steps  # ms per step
    total = sum(kernels.values())
    cats = {}
    for name, ms in kernels.items():
        cats[category(name)] = cats.get(category(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    return dict(looping=looping, wall_ms_per_step=wall_ms, gpu_ms_per_step=total, traced_step_idle=idle,
                categories={k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                top_kernels=[(n[:140], round(ms, 3)) for n, ms in top])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--mlp-tiles", help="FUSED_MLP_TILES as JSON, e.g. best_tiles from bench/fused_mlp.py")
    ap.add_argument("env", nargs="*", help="extra ENV=VALUE settings")
    args = ap.parse_args()
    os.environ.update(kv.split("=", 1) for kv in args.env)
    import train_gpt as tg

    if args.mlp_tiles:
        tg.FUSED_MLP_TILES = json.loads(args.mlp_tiles)

    hp = tg.load_hyperparameters()
    tg.validate_hyperparameters(hp, 1)
    train_files, *_ = tg.prepare_data(hp, 0)
    ctx = tg.setup_distributed()
    backend = tg.configure_attention(hp.attention_backend)
    tg.seed_everything(hp.seed)
    trainer = tg.Trainer(hp, ctx, tg.build_model(hp, ctx.device), train_files)
    t0 = time.perf_counter()
    trainer.compile_warmup()
    from cuda_timing import write_result

    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.compile_warmup()  # again, with nothing left to compile: what the warm-up's steps themselves cost
    rerun_s = time.perf_counter() - t0
    compile_times = tg.torch._dynamo.utils.compile_times(repr="str", aggregate=True)  # where the warm-up went
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(attention=backend, mlp_tiles=tg.FUSED_MLP_TILES, compile_warmup_s=warmup_s, warmup_rerun_s=rerun_s,
                  compile_times=compile_times, micro_seqs=trainer.micro_seqs,
                  phases=[profile_phase(trainer, looping, args.steps, out) for looping in (False, True)])
    write_result(out, "profile_step.json", result)
    print(f"attention:{backend} compile_warmup:{warmup_s:.1f}s (again, nothing to compile: {rerun_s:.1f}s) "
          f"micro_seqs:{trainer.micro_seqs} mlp_tiles:{json.dumps(tg.FUSED_MLP_TILES)}")
    print(compile_times)
    for ph in result["phases"]:
        print(f"\nlooping={ph['looping']}: wall {ph['wall_ms_per_step']:.1f} ms/step, "
              f"GPU kernels {ph['gpu_ms_per_step']:.1f} ms/step (profiled)")
        idle = ph["traced_step_idle"]
        print(f"  traced step: {idle['span_ms']:.1f} ms from first to last kernel, GPU idle {idle['idle_ms']:.1f} ms "
              f"in {idle['gaps_over_50us']} gaps > 50 us; longest: " +
              "; ".join(f"{ms} ms in {op}" for ms, op in idle["longest"][:6]))
        for cat, ms in ph["categories"].items():
            print(f"  {cat:<18} {ms:8.2f} ms  {100 * ms / ph['gpu_ms_per_step']:5.1f}%")
        for name, ms in ph["top_kernels"][:20]:
            print(f"  {ms:8.3f} ms  {name[:110]}")


if __name__ == "__main__":
    main()
