"""Attention micro-benchmark at the training shape: dense causal backends against document-isolated ones (GPU).

    python3 bench/attention.py [--rows 48,6] [--iters 30] [--data GLOB] [--cases NAMES] [--out DIR]

One attention call per case, q [B, 2048, 8, 64] and k, v [B, 2048, 4, 64] in bf16, as every layer of the default
model runs it; B = 48 rows is the real micro-batch (TRAIN_BATCH_TOKENS / (world * grad_accum) / 2048 on any GPU
count). Cases: cuDNN and flash SDPA (dense causal), FA3 dense if importable, FA4 dense (eager and compiled) if
importable on Hopper, FlexAttention dense causal, and the document-isolated backends of train_gpt.py, each through the
very functions training uses (compiled with fullgraph=True, dynamic=False): FlexAttention with the document BlockMask,
torch varlen_attn with the fixed-length padded cu_seqlens, the same with exact (unpadded) cu_seqlens to show what the
empty padding sequences cost, FA3 varlen if importable, and SDPA with an explicit boolean mask (the CPU fallback) for
scale. --cases keeps the cases whose names contain one of its comma-separated parts. A single call's time includes
the host's work for it (FA4's is Python): bench/profile_step.py gives kernel time in a real step.

Documents: lognormal lengths (median 424, mean ~750 tokens, as the FineWeb validation documents), each led by BOS,
concatenated and cut into 2048-token rows; or rows cut from real shards with --data.

Per case: ms forward and forward+backward of one call (median of --iters, CUDA events), ms to build the mask (once
per forward, shared by every layer), the projection build + n * (forward+backward) for the 11 and 17 (looping) layer
calls of a micro-batch, the relative max error of output and input gradients against an fp32 reference on the first
two rows, peak memory, whether a second batch with other documents recompiled (it must not), and for the first
--rows value that mask and attention compiled into one graph, as in training, give the same result. Prints a table,
writes <out>/attention.json (out: --out, else $OUT, else bench_out).
"""
import argparse
import contextlib
import glob
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg
from cuda_timing import median_ms, write_result  # noqa: E402

T, H, HKV, D = 2048, 8, 4, 64
CHECK_ROWS = 2  # rows compared against the fp32 reference
VOCAB = 8192


def lognormal_rows(rows: int, rng: np.random.Generator) -> torch.Tensor:
    """A stream of BOS-led documents with lognormal lengths (median 424, sigma 1.07: mean ~750), cut into rows."""
    need, docs = rows * T + T, []
    while sum(map(len, docs)) < need:
        n = max(2, int(rng.lognormal(math.log(424), 1.07)))
        docs.append(np.concatenate(([tg.BOS_ID], rng.integers(2, VOCAB, n - 1))))
    stream = np.concatenate(docs)
    start = int(rng.integers(0, T))
    return torch.from_numpy(stream[start:start + rows * T].reshape(rows, T).astype(np.int64))


def shard_rows(pattern: str, rows: int, rng: np.random.Generator) -> torch.Tensor:
    tokens = np.concatenate([tg.read_shard(f) for f in sorted(glob.glob(pattern))[:4]])
    starts = rng.integers(0, len(tokens) - T, rows)
    return torch.from_numpy(np.stack([tokens[s:s + T] for s in starts]).astype(np.int64))


def document_stats(ids: torch.Tensor) -> dict:
    docs_per_row, work = [], []
    for row in ids.cpu().numpy():
        bounds = np.unique(np.concatenate(([0], np.flatnonzero(row == tg.BOS_ID), [T])))
        lengths = np.diff(bounds)
        docs_per_row.append(len(lengths))
        work.append((lengths * (lengths + 1)).sum() / (T * (T + 1)))
    B = ids.size(0)
    return {"segments": int(sum(docs_per_row)), "segments_per_row_mean": float(np.mean(docs_per_row)),
            "segments_per_row_max": int(max(docs_per_row)),
            "varlen_slots": B + B * T // tg.VARLEN_TOKENS_PER_SLOT,
            "doc_causal_work_fraction": float(np.mean(work))}  # attention pairs kept / dense causal pairs


def exact_cu_seqlens(ids: torch.Tensor) -> torch.Tensor:
    """Unpadded boundaries (data-dependent length: eager only)."""
    B = ids.size(0)
    flat = ids.reshape(-1)
    pos = torch.arange(B * T, device=ids.device)
    starts = torch.nonzero((flat == tg.BOS_ID) | (pos % T == 0)).flatten()
    return torch.cat((starts, starts.new_full((1,), B * T))).to(torch.int32)


def reference(q, k, v, ids, grad, isolated: bool):
    """fp32 math attention on the first rows: output and input gradients."""
    qr, kr, vr = (t[:CHECK_ROWS].detach().float().requires_grad_() for t in (q, k, v))
    mask = tg.sdpa_doc_mask(ids[:CHECK_ROWS]) if isolated else torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        y = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=True).transpose(1, 2)
    y.backward(grad[:CHECK_ROWS].float())
    return y.detach(), [t.grad for t in (qr, kr, vr)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_case(name, build, attend, ids, other_ids, iters, isolated, compiled, setup, one_graph_check):
    """Time build(ids) and attend(q, k, v, mask) forward and forward+backward; check against the reference.

    setup() configures train_gpt's attention for the case and returns the context to run it in."""
    torch.cuda.reset_peak_memory_stats()
    B = ids.size(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (H, HKV, HKV))
    grad = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    if compiled:
        torch._dynamo.reset()
        build_c = torch.compile(build, fullgraph=True, dynamic=False)
        attend_c = torch.compile(attend, fullgraph=True, dynamic=False)
    else:
        build_c, attend_c = build, attend
    row = {"case": name, "rows": B}
    with setup():
        t0 = time.perf_counter()
        mask = build_c(ids)
        out = attend_c(q, k, v, mask)
        out.backward(grad)
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # compile included
        ref_out, ref_grads = reference(q, k, v, ids, grad, isolated)
        row["err_out"] = rel_err(out[:CHECK_ROWS], ref_out)
        row["err_grad"] = max(rel_err(t.grad[:CHECK_ROWS], r) for t, r in zip((q, k, v), ref_grads))
        fwd_bwd_grad_q = q.grad.float()

        def fwd():
            with torch.no_grad():
                attend_c(q, k, v, mask)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            attend_c(q, k, v, mask).backward(grad)

        row["build_ms"] = median_ms(lambda: build_c(ids), iters)
        row["fwd_ms"] = median_ms(fwd, iters)
        row["fwd_bwd_ms"] = median_ms(fwd_bwd, iters)
        if compiled:  # another document layout must reuse the graphs
            try:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    attend_c(q, k, v, build_c(other_ids)).backward(grad)
                row["recompiled"] = False
            except Exception:  # noqa: BLE001 - any failure here is the finding
                row["recompiled"] = True
        if compiled and one_graph_check:  # as in training: mask and attention in one graph, forward and backward
            one_graph = torch.compile(lambda q, k, v, ids: attend(q, k, v, build(ids)), fullgraph=True, dynamic=False)
            q.grad = None
            y = one_graph(q, k, v, ids)
            y.backward(grad)
            row["one_graph_err"] = max(rel_err(y, out.detach().float()), rel_err(q.grad, fwd_bwd_grad_q))
    row["peak_mib"] = torch.cuda.max_memory_allocated() // 2**20
    for layers in (11, 17):
        row[f"microbatch_{layers}_layers_ms"] = row["build_ms"] + layers * row["fwd_bwd_ms"]
    row["ok"] = (row["err_out"] < 0.03 and row["err_grad"] < 0.05 and not row.get("recompiled", False)
                 and row.get("one_graph_err", 0.0) < 1e-2)
    return row


def configured(dense: str, doc: str):
    """A setup for run_case: train_gpt's backends as named, SDPA restricted as in training."""
    def setup():
        tg.configure_attention(dense, doc)
        return tg.sdpa_context()

    return setup


def dense_sdpa(backend):
    def build(ids):
        return None

    def attend(q, k, v, mask):
        return tg.causal_attention(q, k, v)

    return build, attend, configured(backend, "sdpa_mask")


def dense_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def build(ids):
        return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, T, T, device=ids.device)

    def attend(q, k, v, block_mask):
        y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True)
        return y.transpose(1, 2)

    return build, attend, contextlib.nullcontext


def cases(fa3: bool, fa4: bool):
    """(name, build, attend, setup, isolated, compiled)."""
    out = [("sdpa_cudnn dense", *dense_sdpa("sdpa_cudnn"), False, False),
           ("sdpa_flash dense", *dense_sdpa("sdpa_flash"), False, False)]
    if fa3:
        out.append(("fa3 dense", *dense_sdpa("fa3"), False, False))
    if fa4:  # eager, and compiled as in training (its custom ops must not break the graph)
        out.append(("fa4 dense", *dense_sdpa("fa4"), False, False))
        out.append(("fa4 dense compiled", *dense_sdpa("fa4"), False, True))
    out.append(("flex dense", *dense_flex(), False, True))

    def doc(dense, backend, build=None):
        return build or tg.DOC_ATTENTION[backend][0], tg.DOC_ATTENTION[backend][1], configured(dense, backend)

    out.append(("flex doc", *doc("sdpa_cudnn", "flex"), True, True))
    out.append(("varlen doc (padded cu_seqlens)", *doc("sdpa_cudnn", "varlen"), True, True))
    out.append(("varlen doc (exact cu_seqlens)", *doc("sdpa_cudnn", "varlen", exact_cu_seqlens), True, False))
    if fa3:
        out.append(("fa3_varlen doc", *doc("fa3", "fa3_varlen"), True, True))
    out.append(("sdpa explicit mask doc", *doc("sdpa_efficient", "sdpa_mask"), True, False))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="48,6", help="micro-batch rows to try, comma-separated")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--data", default="", help="glob of token shards to cut rows from (default: synthetic documents)")
    ap.add_argument("--cases", default="", help="run only the cases whose names contain one of these, comma-separated")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/attention.py needs a GPU"
    fa3, fa4 = tg._fa3_importable(), tg._fa4_usable()
    wanted = [c for c in args.cases.split(",") if c]
    rng = np.random.default_rng(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa3": fa3, "fa4": fa4,
              "shape": {"T": T, "H": H, "H_kv": HKV, "D": D, "dtype": "bfloat16"},
              "docs": "shards " + args.data if args.data else "lognormal(median 424, sigma 1.07)", "batches": [],
              "results": []}
    for n, rows in enumerate(int(r) for r in args.rows.split(",")):
        make = (lambda: shard_rows(args.data, rows, rng)) if args.data else (lambda: lognormal_rows(rows, rng))
        ids, other = make().cuda(), make().cuda()
        result["batches"].append({"rows": rows, **document_stats(ids)})
        for name, build, attend, setup, isolated, compiled in cases(fa3, fa4):
            if wanted and not any(w in name for w in wanted):
                continue
            try:
                row = run_case(name, build, attend, ids, other, args.iters, isolated, compiled, setup, n == 0)
            except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                row = {"case": name, "rows": rows, "error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()
            result["results"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    path = write_result(args.out, "attention.json", result)
    print(f"\n{result['device']}  torch {result['torch']}  fa3:{fa3}  fa4:{fa4}")
    for b in result["batches"]:
        print(f"rows {b['rows']}: {b['segments_per_row_mean']:.2f} documents/row (max {b['segments_per_row_max']}), "
              f"{b['segments']} sequences in {b['varlen_slots']} varlen slots, doc-causal work "
              f"{b['doc_causal_work_fraction']:.3f} of dense causal")
    head = f"{'case':<32}{'rows':>5}{'build':>8}{'fwd':>8}{'fwd+bwd':>9}{'x11':>8}{'x17':>8}{'err_out':>9}{'err_grad':>9}  ok"
    print(head + "\n" + "-" * len(head))
    for r in result["results"]:
        if "error" in r:
            print(f"{r['case']:<32}{r['rows']:>5}  ERROR {r['error'][:80]}")
            continue
        print(f"{r['case']:<32}{r['rows']:>5}{r['build_ms']:>8.3f}{r['fwd_ms']:>8.3f}{r['fwd_bwd_ms']:>9.3f}"
              f"{r['microbatch_11_layers_ms']:>8.2f}{r['microbatch_17_layers_ms']:>8.2f}{r['err_out']:>9.4f}"
              f"{r['err_grad']:>9.4f}  {'yes' if r['ok'] else 'NO'}"
              f"{'  (recompiled!)' if r.get('recompiled') else ''}")
    print(f"ms per call (median of {args.iters}); x11/x17 = build + layers * fwd+bwd, per micro-batch; "
          f"wrote {path}")
    for rows in sorted({r["rows"] for r in result["results"]}):
        good = [r for r in result["results"] if r["rows"] == rows and r.get("ok")]
        dense = [r for r in good if r["case"].endswith("dense")]
        doc = [r for r in good if r["case"].endswith("doc") or "doc (" in r["case"]]
        if dense and doc:
            d, i = (min(rs, key=lambda r: r["microbatch_17_layers_ms"]) for rs in (dense, doc))
            print(f"rows {rows}: fastest dense {d['case']} {d['microbatch_17_layers_ms']:.2f} ms, fastest isolated "
                  f"{i['case']} {i['microbatch_17_layers_ms']:.2f} ms per looped micro-batch")


if __name__ == "__main__":
    main()
