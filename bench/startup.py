"""What the attention probe of train_gpt.py's start-up costs, piece by piece, in a fresh process (GPU).

    python3 bench/startup.py [--out DIR]

Times, in order and each once (first calls are the point): CUDA context creation, then for each SDPA backend its
first forward + backward at the probe's shape (16 rows) and the median of 10 more, then cuDNN's first call at the
training shape (48 rows), the FlexAttention import, and train_gpt.configure_attention() as start-up runs it (after
all of the above, so its cost here is what is left once libraries and kernels are loaded). Prints a table and
writes <out>/startup.json.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

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
    write_result(args.out, "startup.json", dict(device=torch.cuda.get_device_name(), torch=torch.__version__, **rows))
    for key, value in rows.items():
        print(f"{key:<32}{value:.3f}" if isinstance(value, float) else f"{key:<32}{value}")


if __name__ == "__main__":
    main()
