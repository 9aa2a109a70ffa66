"""Where a training step spends its GPU time: kernel table from torch.profiler, before and after looping.

    python3 bench/profile_step.py [--steps 4] [--out DIR] [ENV=VALUE ...]

Builds the default model and Trainer exactly as train_gpt.py does (one GPU, same data env vars), runs the compile
warm-up, then profiles `--steps` optimizer steps with looping off and on. Prints per phase the step time, the share
of each kernel category (matmul, attention, fused elementwise, optimizer, communication, other) and the top kernels;
writes <out>/profile_step.json. Categories are by kernel name, so they are approximate.
"""
import argparse
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


def profile_phase(trainer, looping: bool, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer.model.looping = looping
    for i in range(2):  # settle (any recompile happens here)
        trainer.step(i, 1.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            trainer.step(i, 1.0)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1000 / steps
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
    return dict(looping=looping, wall_ms_per_step=wall_ms, gpu_ms_per_step=total,
                categories={k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                top_kernels=[(n[:140], round(ms, 3)) for n, ms in top])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("env", nargs="*", help="extra ENV=VALUE settings")
    args = ap.parse_args()
    os.environ.update(kv.split("=", 1) for kv in args.env)
    import train_gpt as tg

    hp = tg.load_hyperparameters()
    tg.validate_hyperparameters(hp, 1)
    train_files, *_ = tg.prepare_data(hp, 0)
    ctx = tg.setup_distributed()
    backend = tg.configure_attention()
    tg.seed_everything(hp.seed)
    trainer = tg.Trainer(hp, ctx, tg.build_model(hp, ctx.device), train_files)
    t0 = time.perf_counter()
    trainer.compile_warmup()
    result = dict(attention=backend, compile_warmup_s=time.perf_counter() - t0, micro_seqs=trainer.micro_seqs,
                  phases=[profile_phase(trainer, looping, args.steps) for looping in (False, True)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.json").write_text(json.dumps(result, indent=2))
    print(f"attention:{backend} compile_warmup:{result['compile_warmup_s']:.1f}s micro_seqs:{trainer.micro_seqs}")
    for ph in result["phases"]:
        print(f"\nlooping={ph['looping']}: wall {ph['wall_ms_per_step']:.1f} ms/step, "
              f"GPU kernels {ph['gpu_ms_per_step']:.1f} ms/step")
        for cat, ms in ph["categories"].items():
            print(f"  {cat:<18} {ms:8.2f} ms  {100 * ms / ph['gpu_ms_per_step']:5.1f}%")
        for name, ms in ph["top_kernels"][:20]:
            print(f"  {ms:8.3f} ms  {name[:110]}")


if __name__ == "__main__":
    main()
