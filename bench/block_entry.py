"""A block's entry (U-Net skip mix, residual mix, RMSNorm) forward + backward at the training shape, on one GPU.

    python3 bench/block_entry.py [--rows 98304] [--iters 20] [--out DIR] [--no-sweep]

Times, with and without a skip, forward + backward under torch.compile(fullgraph=True): `inductor` is block_entry
with inductor's backward (what the model ran before BlockEntry), `fused` is BlockEntry (inductor's forward, the
fused backward kernel), its gradients checked against `inductor`'s (max |error| / max |reference|). Then the backward
op alone (`op`, with its achieved bandwidth) at BLOCK_ENTRY_TILES and over a sweep of the tiles (rows per block,
warps, programs per SM, pipeline stages). Prints a table and writes <out>/block_entry.json (out: --out, else $OUT,
else bench_out).
"""
import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
from cuda_timing import median_ms, print_table, write_result  # noqa: E402

DIM = 512


def make_inputs(rows: int, skip: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    act = lambda: torch.randn(rows, DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    leaves = [act(), act(), torch.randn(2, DIM, device="cuda", generator=g).requires_grad_(),
              torch.tensor(0.5, device="cuda")]
    if skip:
        leaves += [act(), torch.randn(DIM, device="cuda", generator=g).requires_grad_(),
                   torch.randn(DIM, device="cuda", generator=g).requires_grad_()]
    grads = [torch.randn(rows, DIM, device="cuda", generator=g).bfloat16() for _ in range(2)]
    grads.append(torch.randn(rows, tg.ATTN_GATE_WINDOW, device="cuda", generator=g).bfloat16())
    grads.append(torch.randn(rows, DIM, device="cuda", generator=g).bfloat16())  # x0's, from the later blocks
    return leaves, grads


def inductor_entry(x, x0, mix, ln, *skip):
    x_in, u = tg.block_entry(x, x0, mix, ln, *skip)
    return x_in, u, u[..., :tg.ATTN_GATE_WINDOW], x0.view_as(x0)


def fused_entry(x, x0, mix, ln, *skip):
    return tg.BlockEntry.apply(x, x0, mix, ln, tg.ATTN_GATE_WINDOW, False, False, *skip)


def step_fn(fn, leaves, grads):
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    def step():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(compiled(*leaves), grads)
        return [t.grad for t in leaves if t.requires_grad]
    return step


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=98304)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    default = tg.BLOCK_ENTRY_TILES
    sweep = [] if args.no_sweep else [dict(ROWS=r, num_warps=w, PER_SM=p, STAGES=s)
                                      for r, w, p, s in itertools.product((2, 4, 8), (4, 8), (4, 8, 16), (1, 2))]
    rows = []
    try:
        for skip in (False, True):
            leaves, grads = make_inputs(args.rows, skip)
            ref_step = step_fn(inductor_entry, leaves, grads)
            ref = [g.clone() for g in ref_step()]
            rows.append(dict(skip=skip, variant="inductor", ms=median_ms(ref_step, args.iters)))
            step = step_fn(fused_entry, leaves, grads)
            err = max(rel_err(a, b) for a, b in zip(step(), ref))
            rows.append(dict(skip=skip, variant="fused", tiles=str(default[skip]), ms=median_ms(step, args.iters),
                             max_rel_err=err))
            # The backward op alone; bytes: the gradients in, the activations it reads, the input gradients out.
            op_args = [*grads, None, None, *(t.detach() for t in leaves)] + ([] if skip else [None, None, None])
            moved = (3 + (5 if skip else 4) + (3 if skip else 2)) * args.rows * DIM * 2
            for cfg in [default[skip]] + sweep:
                tg.BLOCK_ENTRY_TILES = {**default, skip: cfg}  # read at each call of the op
                ms = median_ms(lambda: torch.ops.pgolf.block_entry_backward(*op_args), args.iters)
                rows.append(dict(skip=skip, variant="op" if cfg is default[skip] else "op sweep", tiles=str(cfg),
                                 ms=ms, gb_per_s=moved / ms / 1e6))
    finally:
        tg.BLOCK_ENTRY_TILES = default
    print_table(rows, ["skip", "variant", "tiles", "ms", "gb_per_s", "max_rel_err"])
    print(f"written: {write_result(args.out, 'block_entry.json', dict(rows=args.rows, results=rows))}")


if __name__ == "__main__":
    main()
