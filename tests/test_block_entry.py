"""The fused block-entry backward (BlockEntry: inductor's forward, one Triton kernel for the whole backward) against
autograd through block_entry.

As in test_fused_mlp.py, Triton's CPU interpreter runs the kernel in one subprocess with TRITON_INTERPRET=1 (this file
run as a script prints the measurements as JSON) and the tests assert on them.

Tolerances (max |error| / max |reference|, the reference in fp32 from the same input values):
* fp32 activations: 1e-5. The same fp32 math, the sums in another order.
* bf16 activations: 2^-6. The kernel rounds the per-channel factors and its outputs to bf16 (2^-8 relative each), the
  fp32 reference does not; a wrong term (a missing sigmoid' or (1 - g) factor, the norm's mean term) is off by more.
"""
import json
import subprocess

import pytest
import torch

from conftest import run_interpreted

RTOL = {"float32": 1e-5, "bfloat16": 2.0 ** -6}
# (batch, seq, dim, skip, gate columns, pass_x, split_u, dtype): 74 rows in blocks of 2 or 4 over the interpreter's 4
# or 8 programs, so every program makes several passes and the last block is partial. The default model's blocks:
# encoder (pass_x), sequential decoder (skip), parallel decoder (skip, split_u), the last (split_u).
CASES = [(2, 37, 64, False, 12, False, False, "float32"), (2, 37, 64, True, 12, False, False, "float32"),
         (2, 37, 64, True, 0, False, False, "float32"), (2, 37, 64, False, 12, True, False, "float32"),
         (2, 37, 64, True, 12, True, True, "float32"), (2, 37, 64, False, 0, False, True, "float32"),
         (2, 37, 64, False, 12, True, False, "bfloat16"), (2, 37, 64, True, 12, False, False, "bfloat16"),
         (2, 37, 64, True, 12, False, True, "bfloat16"), (2, 37, 64, False, 12, False, True, "bfloat16")]


def _case_name(c) -> str:
    return "_".join(map(str, c))


# ------------------------------------------------------------------------------------------------------------------
# Worker: runs under TRITON_INTERPRET=1 in a subprocess (see the fixture below).
# ------------------------------------------------------------------------------------------------------------------

def _grads(fn, leaves, out_grads):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and t.dim() > 0) for t in leaves]
    torch.autograd.backward(list(fn(*leaves)), out_grads)
    return [t.grad for t in leaves if t.requires_grad]


def check_kernel(tg) -> dict:
    out = {}
    for i, case in enumerate(CASES):
        B, T, D, skip, gate_cols, pass_x, split_u, dtype = case
        g = torch.Generator().manual_seed(i)
        act = lambda cols=D: torch.randn(B, T, cols, generator=g).to(getattr(torch, dtype))
        leaves = [act(), act(), torch.randn(2, D, generator=g), torch.tensor(0.7)]
        if skip:
            leaves += [act(), torch.randn(D, generator=g), torch.randn(D, generator=g)]
        # x_in's, u's, the gate copy's, x0's from the later blocks, then x's from a skip, u's from the MLP
        out_grads = [act(), act(), act(gate_cols), act()] + [act() for _ in range(pass_x + split_u)]

        def fused(x, x0, mix, ln, *s):
            return tg.BlockEntry.apply(x, x0, mix, ln, gate_cols, pass_x, split_u, *s)

        def reference(x, x0, mix, ln, *s):
            x_in, u = tg.block_entry(x, x0, mix, ln, *s)
            return x_in, u, u[..., :gate_cols], x0, *([x] if pass_x else []), *([u] if split_u else [])

        got = _grads(fused, leaves, out_grads)
        ref = _grads(reference, [t.float() for t in leaves], [t.float() for t in out_grads])
        out[_case_name(case)] = dict(
            errors=[float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(got, ref)],
            dtypes=[str(a.dtype).split(".")[-1] for a in got], ref_dtypes=[str(t.dtype).split(".")[-1] for t in leaves
                                                                            if t.dim() > 0])
    return out


def check_model(tg) -> dict:
    """A training step of a tiny model (both kinds of block, U-Net skips) with the fused entry, eager and compiled
    (aot_eager: the kernel runs in the compiled backward), against the plain path; and when the fused entry runs."""
    torch.manual_seed(0)
    hp = tg.load_hyperparameters({"VOCAB_SIZE": "64", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4",
                                  "NUM_KV_HEADS": "2", "MLP_MULT": "2", "TRAIN_SEQ_LEN": "16",
                                  "PARALLEL_RESIDUAL_START": "2"})
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():  # away from the initialization's ones and zeros, so that every factor matters
        for p in (model.skip_gates, model.skip_weights, *(b.resid_mix for b in model.blocks)):
            p.add_(torch.randn_like(p) * 0.3)
    ids, targets = torch.randint(0, hp.vocab_size, (2, 2, 16))

    def step(regions, fused=True):
        supported = tg.fused_kernels_supported
        if not fused:
            tg.fused_kernels_supported = lambda device, tma=False: False
        try:
            model.zero_grad()
            loss = model(ids, targets, regions=regions)
            loss.backward()
        finally:
            tg.fused_kernels_supported = supported
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    (loss_fused, fused), (loss_plain, plain) = step(tg.EAGER_REGIONS), step(tg.EAGER_REGIONS, fused=False)
    loss_compiled, compiled = step(tg.Regions("aot_eager"))
    rel = lambda a, b: max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))
    block, x = model.blocks[0], torch.randn(1, 4, hp.model_dim)
    enter = lambda lora=None: block._enter(x, x, (), lora, False, False).gate_in is not None
    with torch.no_grad():
        no_grad = enter()
    parallel = model.blocks[hp.parallel_residual_start]
    return dict(loss_diff=abs(loss_fused - loss_plain), grad_rel_err=rel(fused, plain),
                compiled_loss_diff=abs(loss_compiled - loss_fused), compiled_grad_rel_err=rel(compiled, fused),
                train=enter(), no_grad=no_grad, lora=enter(lambda *a: 0),
                # the parallel blocks' MLP is the fused one, so the step above took split_u
                parallel_mlp_fused=parallel.parallel and parallel.mlp.runs_fused(x))


def worker() -> dict:
    import train_gpt as tg

    return dict(interpret=tg.TRITON_INTERPRET, kernel=check_kernel(tg), model=check_model(tg))


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interp():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", [_case_name(c) for c in CASES])
def test_kernel_gradients_match_autograd(interp, case):
    """d x (with a skip's share added when passed through), d x0 (with the later blocks' share added), d mix (and with
    a skip d skip, d gate, d w), each in its input's dtype as autograd expects; with split_u, u's two gradients."""
    r = interp["kernel"][case]
    assert r["dtypes"] == r["ref_dtypes"]
    assert max(r["errors"]) <= RTOL[case.split("_")[-1]], r


def test_model_step_with_fused_entry_matches_plain_path(interp):
    r = interp["model"]
    assert r["parallel_mlp_fused"]
    assert r["loss_diff"] <= 1e-6  # the plain step also takes the eager CE and the module MLP
    assert r["grad_rel_err"] <= 1e-5
    assert r["compiled_loss_diff"] <= 1e-6 and r["compiled_grad_rel_err"] <= 1e-5


def test_fused_entry_only_for_steps_with_gradients(interp):
    """No-grad scoring and GPTQ calibration, and the LoRA adapter steps (whose shapes vary), take the plain path."""
    r = interp["model"]
    assert r["train"] and not r["no_grad"] and not r["lora"]


def test_cpu_without_interpreter_takes_plain_path():
    import train_gpt as tg

    hp = tg.load_hyperparameters({"VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4",
                                  "NUM_KV_HEADS": "2"})
    block, x = tg.Block(hp, 0), torch.randn(1, 4, 64)
    assert not tg.TRITON_INTERPRET
    e = block._enter(x, x, (), None, True, True)
    assert e.gate_in is None and e.x0 is x and e.u_mlp is e.u and torch.equal(e.passed, x)
    ref = tg.block_entry(x, x, block.resid_mix, block.ln_scale)
    assert torch.equal(e.x, ref[0]) and torch.equal(e.u, ref[1])


H100_REGISTERS = 65536  # 32-bit registers per SM on sm90


@pytest.mark.parametrize("skip,pass_x,split_u", [(False, True, False), (True, False, False), (True, False, True),
                                                 (False, False, True)])
def test_default_tiles_compile_for_hopper_without_spills(skip, pass_x, split_u, tmp_path):
    """The kernel at BLOCK_ENTRY_TILES compiles for sm90 (Triton's bundled ptxas: no GPU needed), spills no register
    and a program fits an SM's registers; a tile change that spills (a sweep's 16-row blocks ran 10x slower) fails
    here, not in the first backward on a GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    import train_gpt as tg

    cfg = tg.BLOCK_ENTRY_TILES[skip]
    bf16 = ("g_in_ptr", "g_u_ptr", "g_gate_ptr", "g_x0_ptr", "g_pass_ptr", "g_u2_ptr", "x_ptr", "x0_ptr", "skip_ptr",
            "gx_ptr", "gx0_ptr", "gskip_ptr")
    fp32 = ("mix_ptr", "ln_ptr", "gate_ptr", "weight_ptr", "sums_ptr")
    runtime = {**{n: "*bf16" for n in bf16}, **{n: "*fp32" for n in fp32}, "n_rows": "i32"}
    signature = {name: runtime.get(name, "constexpr") for name in tg._block_entry_bwd_kernel.arg_names}
    constants = dict(D=512, GATE_COLS=tg.ATTN_GATE_WINDOW, SKIP=skip, PASS_X=pass_x, SPLIT_U=split_u,
                     ROWS=cfg["ROWS"], PROGRAMS=132 * cfg["PER_SM"], ITERS=8, STAGES=cfg["STAGES"])
    kernel = triton.compile(ASTSource(fn=tg._block_entry_bwd_kernel, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    proc = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = proc.stderr + proc.stdout
    registers = int(info.split("Used ")[1].split(" registers")[0])
    assert "0 bytes spill stores" in info and "0 bytes spill loads" in info, info
    assert registers * 32 * cfg["num_warps"] * 2 <= H100_REGISTERS, registers  # two programs per SM at least


if __name__ == "__main__":
    print(json.dumps(worker()))
