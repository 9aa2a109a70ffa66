"""Fused LeakyReLU² MLP (Triton GEMMs with the activation in the epilogue) against the module path.

As in test_fused_ce.py, Triton's CPU interpreter runs the kernels in one subprocess with TRITON_INTERPRET=1 (this file
run as a script prints the measurements as JSON) and the tests assert on them.

Tolerances (max |error| / max |reference|, the reference in fp32 from the same input values):
* fp32 inputs: 1e-5. Both sides sum the same fp32 products in another order.
* bf16 inputs: 2^-5. The op rounds pre, post, d pre and its outputs to bf16, and Triton's interpreter truncates
  (error < 2^-7 relative each); a wrong term (a missing slope factor 0.5 or 2) is off by far more.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_interpreted

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(BM=32, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=2)
# (rows, dim, hidden, dtype, tiles): several tiles with partial ones at both edges and passes past the last tile
# (21 tiles over the interpreter's 4 programs); one partial tile of the default config; bf16.
CASES = [(200, 64, 96, "float32", "small"), (70, 64, 96, "float32", "default"), (64, 64, 128, "bfloat16", "small")]
RTOL = {"float32": 1e-5, "bfloat16": 2.0 ** -5}


def module_mlp(u, w_fc, w_proj):
    return F.linear(F.leaky_relu(F.linear(u, w_fc), 0.5).square(), w_proj)


def _inputs(rows, dim, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, dim, generator=g)
    w_fc = torch.randn(hidden, dim, generator=g) * dim ** -0.5
    w_proj = torch.randn(dim, hidden, generator=g) * hidden ** -0.5
    grad = torch.randn(rows, dim, generator=g)
    return [t.to(dtype) for t in (u, w_fc, w_proj)], grad.to(dtype)


def _run(fn, leaves, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ------------------------------------------------------------------------------------------------------------------
# Worker: runs under TRITON_INTERPRET=1 in a subprocess (see the fixture below).
# ------------------------------------------------------------------------------------------------------------------

def check_kernels(tg) -> dict:
    default, out = tg.FUSED_MLP_TILES, {}
    try:
        for i, (rows, dim, hidden, dtype, tiles) in enumerate(CASES):
            tg.FUSED_MLP_TILES = SMALL if tiles == "small" else default
            leaves, grad = _inputs(rows, dim, hidden, getattr(torch, dtype), seed=i)
            fused = _run(tg.leaky_relu_sq_mlp, leaves, grad)
            ref = _run(module_mlp, [t.float() for t in leaves], grad.float())
            _, pre, post = torch.ops.pgolf.leaky_relu_sq_mlp(*leaves)
            out[f"{rows}x{dim}x{hidden}_{dtype}_{tiles}"] = dict(
                errors=[_rel(a, b) for a, b in zip(fused, ref)], dtypes=[str(t.dtype).split(".")[-1] for t in fused],
                pre_err=_rel(pre, leaves[0].float() @ leaves[1].float().t()),
                post_ratio=float(((post.float() - (ref_post := F.leaky_relu(pre.float(), 0.5).square())).abs()
                                  / ref_post.abs().clamp_min(1e-30)).max()))
    finally:
        tg.FUSED_MLP_TILES = default
    return out


def check_compiled(tg) -> dict:
    """torch.compile(fullgraph=True) traces the custom ops through their fake implementations, backward included."""
    leaves, grad = _inputs(64, 64, 128, torch.float32, seed=7)
    compiled = torch.compile(tg.leaky_relu_sq_mlp, fullgraph=True, backend="aot_eager")
    return dict(equal=all(torch.equal(a, b) for a, b in zip(_run(compiled, leaves, grad),
                                                            _run(tg.leaky_relu_sq_mlp, leaves, grad))))


def check_model(tg) -> dict:
    """GPT training loss and gradients with the fused MLP and the module path (a sequential and a parallel block)."""
    import dataclasses

    hp = dataclasses.replace(tg.load_hyperparameters({"SMOKE": "1"}), num_layers=2, num_loops=0, xsa_last_n=1,
                             parallel_residual_start=1, fused_ce=0)
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():  # zero-initialized projections would hide the MLP's gradients
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.size(1) ** -0.5)
        for b in model.blocks:  # the fused path folds mlp_scale into W_proj: not all ones
            b.mlp_scale.uniform_(0.5, 1.5)
    ids, targets = torch.randint(0, hp.vocab_size, (2, 2, 16))
    losses, grads, ran_fused = {}, {}, {}
    for fused in (True, False):
        for b in model.blocks:
            b.mlp.fused = fused
        model.zero_grad()
        losses[fused] = model(ids, targets)
        losses[fused].backward()
        grads[fused] = [p.grad.clone() for p in model.parameters()]
        ran_fused[fused] = model.blocks[1].mlp.runs_fused(ids.float())
    mlp = model.blocks[0].mlp
    mlp.fused = True
    u = torch.zeros(1, 4, hp.model_dim)
    with torch.no_grad():
        no_grad = mlp.runs_fused(u)
    model.eval()  # a training step after a validation that left the model in eval mode still runs fused
    eval_mode = mlp.runs_fused(u)
    model.train()
    tg.QUANT_PASSTHROUGH_NUMEL = 0  # every linear of the tiny model is quantized, so calibration hooks each one
    hessians, _ = tg.collect_hessians(model, [(ids, targets)])
    return dict(calibrated_mlp=sorted(n for n in hessians if ".mlp." in n), loss_diff=abs(losses[True].item() - losses[False].item()),
                grad_rel_err=max(_rel(a, b) for a, b in zip(grads[True], grads[False])),
                ran_fused=ran_fused[True], ran_module=not ran_fused[False], train=mlp.runs_fused(u),
                no_grad=no_grad, eval_mode=eval_mode, lora=mlp.runs_fused(u, lora=lambda *a: 0),
                aligned=tg.MLP(64, 128, fused=True).runs_fused(torch.zeros(2, 64)),
                misaligned=[tg.MLP(d, h, fused=True).runs_fused(torch.zeros(2, d)) for d, h in ((64, 100), (60, 128))])


def worker() -> dict:
    import train_gpt as tg

    return dict(interpret=tg.TRITON_INTERPRET, kernels=check_kernels(tg), compiled=check_compiled(tg),
                model=check_model(tg))


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interp():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", [f"{r}x{d}x{h}_{t}_{k}" for r, d, h, t, k in CASES])
def test_kernels_match_module_path(interp, case):
    r = interp["kernels"][case]
    dtype = case.split("_")[1]
    assert r["dtypes"] == [dtype] * 4  # output and gradients in the inputs' dtype, as autograd expects
    assert max(r["errors"]) <= RTOL[dtype], r  # out, d u, d W_fc, d W_proj
    assert r["pre_err"] <= RTOL[dtype]
    # the epilogue's post is leaky(pre)² of the pre it stored: exact in fp32, within the bf16 store's truncation
    assert r["post_ratio"] <= (0.0 if dtype == "float32" else 2.0 ** -7)


def test_compiled_fullgraph_matches_eager_op(interp):
    assert interp["compiled"]["equal"]


def test_model_training_step_fused_matches_module_path(interp):
    r = interp["model"]
    assert r["ran_fused"] and r["ran_module"]
    assert r["loss_diff"] <= 1e-5
    assert r["grad_rel_err"] <= 1e-4


def test_fused_only_for_training_steps(interp):
    """Evaluation and GPTQ calibration (no_grad: its hooks need the linears) and LoRA TTT take the module path; grad
    mode decides, not the train/eval flag."""
    r = interp["model"]
    assert r["train"] and r["eval_mode"] and not r["no_grad"] and not r["lora"]
    assert r["calibrated_mlp"] == ["blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight", "blocks.1.mlp.fc.weight",
                                   "blocks.1.mlp.proj.weight"]  # fused flags on, the hooks still saw both linears


def test_widths_tma_cannot_address_take_module_path(interp):
    """TMA needs 16-byte-aligned rows: a hidden or model width that is no multiple of 8 (MLP_MULT=3.3 say) takes the
    module path instead of failing in the first backward."""
    r = interp["model"]
    assert r["aligned"] and r["misaligned"] == [False, False]


def test_cpu_without_interpreter_takes_module_path():
    import train_gpt as tg

    mlp = tg.MLP(8, 32, fused=True)
    u = torch.randn(2, 3, 8)
    assert not tg.TRITON_INTERPRET and not mlp.runs_fused(u)
    torch.testing.assert_close(mlp(u), module_mlp(u, mlp.fc.weight, mlp.proj.weight))


H100_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm90 (227 KiB)


def test_default_tiles_compile_for_hopper_within_shared_memory():
    """Both fused GEMMs, at the training shape, compile for sm90 (Triton's bundled ptxas: no GPU needed) and fit an
    H100's shared memory; a tile or stage change that does not fit fails here, not at the first step of a GPU run."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import train_gpt as tg

    cfg = dict(tg.FUSED_MLP_TILES)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    rows, dim, hidden, programs = 48 * 2048, 512, 2048, 132  # one H100's micro-batch; 132 SMs
    tiles = triton.cdiv(rows, bm) * triton.cdiv(hidden, bn)
    for up in (True, False):
        runtime = {"a_desc": f"tensordesc<bf16[{bm}, {bk}]>", "out_ptr": "*bf16", "act_ptr": "*bf16", "M": "i32",
                   "b_desc": f"tensordesc<bf16[{bn}, {bk}]>" if up else f"tensordesc<bf16[{bk}, {bn}]>"}
        constants = dict(cfg, N=hidden, K=dim, UP=up, UPCAST=False, PROGRAMS=programs,
                         TILES_EACH=triton.cdiv(tiles, programs))
        signature = {name: runtime.get(name, "constexpr") for name in tg._mlp_gemm_kernel.arg_names}
        kernel = triton.compile(ASTSource(fn=tg._mlp_gemm_kernel, signature=signature, constexprs=constants),
                                target=GPUTarget("cuda", 90, 32), options=options)
        assert 0 < kernel.metadata.shared <= H100_SHARED_MEMORY, (up, kernel.metadata.shared)


def test_without_tma_descriptors_the_module_path_runs():
    """Triton older than 3.4 has no host-side TMA descriptors: the script still imports and the fused CE still runs
    (here under the interpreter), and the MLP takes the module path."""
    pytest.importorskip("triton")
    code = """
import json, sys, torch, torch.nn.functional as F, triton
sys.modules["triton.tools.tensor_descriptor"] = None  # now `from triton.tools.tensor_descriptor import ...` raises
import train_gpt as tg
cpu, mlp, u = torch.device("cpu"), tg.MLP(8, 32, fused=True), torch.randn(2, 3, 8)
ref = F.linear(F.leaky_relu(F.linear(u, mlp.fc.weight), 0.5).square(), mlp.proj.weight)
print(json.dumps(dict(descriptor=tg.TensorDescriptor is None, ce=tg.fused_kernels_supported(cpu),
                      mlp=tg.fused_kernels_supported(cpu, tma=True), runs_fused=mlp.runs_fused(u),
                      equal=bool(torch.equal(mlp(u), ref)))))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == dict(descriptor=True, ce=True, mlp=False, runs_fused=False, equal=True)


if __name__ == "__main__":
    print(json.dumps(worker()))
