"""What pieces of train_gpt.py's start-up cost, in a fresh process (GPU): the attention probe, and the first calls of
the fused Triton kernels (training pays those inside its compile warm-up).

    python3 bench/startup.py [--out DIR]

Times, in order and each once (first calls are the point): CUDA context creation, then for each SDPA backend its
first forward + backward at the probe's shape (16 rows) and the median of 10 more, then cuDNN's first call at the
training shape (48 rows), the FlexAttention import, and train_gpt.configure_attention() as start-up runs it (after
all of the above, so its cost here is what is left once libraries and kernels are loaded); then the first and second
forward + backward of the fused CE and the fused MLP (the first compiles their Triton kernels: the cache is a fresh
directory unless TRITON_CACHE_DIR is set); then the kernel warm-up processes, started and waited for as training's
first kernel call waits (start_kernel_warmup), and with FA4 installed its first call at the training shape, which
should find its kernels compiled by them (FA4's cache is a fresh directory unless FLASH_ATTENTION_CUTE_DSL_CACHE_DIR is
set). Prints a table and writes <out>/startup.json.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Cold Triton and FA4 caches, as on a fresh pod, so that the kernels' first calls include their compilation
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="startup_triton_"))
os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", tempfile.mkdtemp(prefix="startup_fa4_"))
T0 = time.perf_counter()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from cuda_timing import write_result  # noqa: E402

IMPORT_TORCH_S = time.perf_counter() - T0
ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def attention_call(rows: int):
    q = torch.randn(rows, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(rows, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()


def fused_kernel_calls(tg) -> dict:
    """Forward + backward of train_gpt.py's fused CE and fused MLP, with the training widths and row counts of the same
    divisibility (what Triton specializes on), so they compile the kernels a training run compiles."""
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(2048, 8192, device="cuda", generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 8192, (2048,), device="cuda", generator=g)
    u = torch.randn(2048, 512, device="cuda", generator=g).bfloat16().requires_grad_()
    w_fc = (torch.randn(2048, 512, device="cuda", generator=g) / 23).bfloat16().requires_grad_()
    w_proj = (torch.randn(512, 2048, device="cuda", generator=g) / 45).bfloat16().requires_grad_()
    return {"fused_ce": lambda: tg.softcap_cross_entropy(z, targets, 30.0).mean().backward(),
            "fused_mlp": lambda: tg.leaky_relu_sq_mlp(u, w_fc, w_proj).square().mean().backward()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    rows = {"import_torch_s": IMPORT_TORCH_S}
    t0 = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    rows["cuda_context_s"] = time.perf_counter() - t0
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        call = attention_call(16)
        with sdpa_kernel(backend):
            try:
                rows[f"{name}_first_call_s"] = timed(call)
                rows[f"{name}_steady_ms"] = 1000 * statistics.median(timed(call) for _ in range(10))
            except RuntimeError as e:
                rows[f"{name}_error"] = str(e)[:200]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        rows["cudnn_first_call_48_rows_s"] = timed(attention_call(48))
    t0 = time.perf_counter()
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    rows["import_flex_attention_s"] = time.perf_counter() - t0
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    import train_gpt as tg
    rows["import_train_gpt_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows["configure_attention"] = tg.configure_attention()
    rows["configure_attention_s"] = time.perf_counter() - t0
    for name, call in fused_kernel_calls(tg).items():  # Triton compiles each kernel on its first call
        rows[f"{name}_first_call_s"] = timed(call)
        rows[f"{name}_second_call_s"] = timed(call)
    t0 = time.perf_counter()
    tg.start_kernel_warmup(torch.device("cuda"))
    tg.kernel_warmup_wait()
    rows["kernel_warmup_s"] = time.perf_counter() - t0
    rows["kernel_warmup"] = tg.kernel_warmup_report()
    if tg.ATTENTION_BACKEND == "fa4":
        q, k, v = (torch.randn(48, 2048, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (8, 4, 4))
        rows["fa4_first_call_48_rows_s"] = timed(lambda: tg.fa4_causal(q, k, v).sum().backward())
    write_result(args.out, "startup.json", dict(device=torch.cuda.get_device_name(), torch=torch.__version__, **rows))
    for key, value in rows.items():
        print(f"{key:<32}{value:.3f}" if isinstance(value, float) else f"{key:<32}{value}")


if __name__ == "__main__":
    main()
