"""Fused MLP (Triton GEMM + LeakyReLU² epilogues) against the eager MLP, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton.jit decorates the kernels, i.e. before train_gpt is first imported, and
other test modules import it without. So test_interpreter_suite runs this file again in a child pytest with the
variable set, where the tests marked `interpreted` run (they are skipped in the parent, and run directly when the
whole suite is started with TRITON_INTERPRET=1).

Tolerances: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%). Every tensor the MLP stores (u, the weights,
pre, post, out; d_pre and the gradients) is one rounding, and a few of them compound, so the eager bf16 MLP lands
~0.5% (normalized Frobenius) from an fp32 reference. The fused path rounds the same tensors (d_post never: one fewer),
so it must be as close as the eager bf16 path (10% slack for a different summation order) and within 1.5%.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import ROOT

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 from the start; "
                                                         "test_interpreter_suite runs it")


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run")
def test_interpreter_suite():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" in r.stdout  # the interpreted tests ran; this one skipped itself


# ---------------------------------------------------------------------------------------------------------------
# Runs in the interpreter child
# ---------------------------------------------------------------------------------------------------------------

K, N = 64, 128  # model dim (one GPU K tile), hidden


def make_mlp(seed: int = 0) -> tg.MLP:
    """fp32 master weights as in training, random (the model's zero-initialized proj would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    mlp = tg.MLP(K, N)
    with torch.no_grad():
        mlp.fc.weight.copy_(torch.randn(N, K, generator=g) * K ** -0.5)
        mlp.proj.weight.copy_(torch.randn(K, N, generator=g) * N ** -0.5)
    return mlp


def mlp_results(mlp: tg.MLP, u: torch.Tensor, g_out: torch.Tensor, fused: bool):
    """(out, du, dW_up, dW_down) in fp32, for the upstream gradient g_out."""
    mlp.zero_grad(set_to_none=True)
    mlp.fused = fused
    x = u.detach().clone().requires_grad_()
    out = mlp(x)
    out.backward(g_out.to(out.dtype))
    return [t.detach().float() for t in (out, x.grad, mlp.fc.weight.grad, mlp.proj.weight.grad)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalized Frobenius error; 0 when both are zero (e.g. the gradient of a skip gate that nothing reads yet)."""
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class KernelCalls:
    """Counts launches of the fused GEMM (forward and backward)."""

    def __init__(self, monkeypatch):
        self.n, inner = 0, tg._fused_mlp_gemm

        def counted(*args, **kwargs):
            self.n += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(tg, "_fused_mlp_gemm", counted)


@interpreted
@pytest.mark.parametrize("shape", [(64,), (200,), (2, 100)])  # rows not a multiple of the 64-row test tile
def test_forward_and_gradients_match_the_eager_mlp(shape, monkeypatch):
    calls = KernelCalls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(*shape, K, generator=g)
    g_out = torch.randn(*shape, K, generator=g)
    mlp = make_mlp()
    fused = mlp_results(mlp, u.bfloat16(), g_out, fused=True)
    assert calls.n == 2  # forward GEMM + activation-gradient GEMM
    eager = mlp_results(mlp, u.bfloat16(), g_out, fused=False)
    reference = mlp_results(mlp, u, g_out, fused=False)  # fp32 throughout
    assert calls.n == 2
    for name, f, e, r in zip(("out", "du", "dW_up", "dW_down"), fused, eager, reference):
        assert f.shape == r.shape, name
        assert rel_err(f, r) <= 1.1 * rel_err(e, r) + 1e-4, (name, rel_err(f, r), rel_err(e, r))
        assert rel_err(f, r) < 1.5e-2, (name, rel_err(f, r))


@interpreted
def test_kernel_epilogues_exactly():
    """pre is the rounded product; post = LeakyReLU_0.5(pre)² from it; d_pre = d_post·(2 pre | 0.5 pre), with both
    signs of pre present."""
    g = torch.Generator().manual_seed(2)
    u = torch.randn(100, K, generator=g).bfloat16()
    w_up = (torch.randn(N, K, generator=g) * K ** -0.5).bfloat16()
    w_down = (torch.randn(K, N, generator=g) * N ** -0.5).bfloat16()
    out, pre, post = tg.fused_mlp_op(u, w_up, w_down)
    pre_ref = u.float() @ w_up.float().t()
    assert (pre.float() - pre_ref).abs().max() <= 2 ** -8 * pre_ref.abs().max()  # within a bf16 rounding
    assert torch.equal(post, F.leaky_relu(pre, 0.5).square())
    assert (pre > 0).any() and (pre < 0).any()
    d_out = torch.randn(100, K, generator=g).bfloat16()
    d_pre = tg.mlp_act_grad_op(d_out, w_down, pre)
    d_post = d_out.float() @ w_down.float()
    expected = d_post * torch.where(pre > 0, 2 * pre.float(), 0.5 * pre.float())
    assert (d_pre.float() - expected).abs().max() <= 2 ** -8 * expected.abs().max()


@interpreted
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and the autograd registration agree with the real kernels."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(64, K, generator=g).bfloat16().requires_grad_()
    w_up = torch.randn(N, K, generator=g).bfloat16().requires_grad_()
    w_down = torch.randn(K, N, generator=g).bfloat16().requires_grad_()
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # compiling: the GPT test below
    torch.library.opcheck(tg.fused_mlp_op, (u, w_up, w_down), test_utils=checks)
    _, pre, _ = tg.fused_mlp_op(u.detach(), w_up.detach(), w_down.detach())
    d_out = torch.randn(64, K, generator=g).bfloat16()
    torch.library.opcheck(tg.mlp_act_grad_op, (d_out, w_down.detach(), pre), test_utils=checks)


def tiny_gpt(fused: bool) -> tg.GPT:
    hp = tg.load_hyperparameters({"SMOKE": "1", "NUM_LAYERS": "2", "XSA_LAST_N": "2", "LOOP_START": "0",
                                  "LOOP_END": "1", "PARALLEL_RESIDUAL_START": "1"})
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():
        for block in model.blocks:  # the zero init of proj would leave the MLP without any gradient path to test
            block.mlp.proj.weight.normal_(std=0.02)
    assert tg.enable_fused_mlp(model, fused) == fused
    return model


@interpreted
def test_compiled_fullgraph_matches_eager_under_autocast(monkeypatch):
    """torch.compile(fullgraph=True) traces through the custom ops (aot_eager runs the real kernels without
    inductor's C++ toolchain); under bf16 autocast, with an fp32 input as the residual stream may be, the output and
    every gradient (fp32 for the fp32 master weights and input) match the eager MLP's."""
    calls = KernelCalls(monkeypatch)
    g = torch.Generator().manual_seed(4)
    u, g_out = torch.randn(2, 50, K, generator=g), torch.randn(2, 50, K, generator=g)
    mlp = make_mlp()
    results = []
    for fused in (True, False):
        mlp.zero_grad(set_to_none=True)
        assert tg.enable_fused_mlp(mlp, fused) == fused
        x = u.clone().requires_grad_()
        run = torch.compile(mlp, fullgraph=True, backend="aot_eager") if fused else mlp
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(x)
        out.backward(g_out.to(out.dtype))
        results.append((out.detach(), x.grad, mlp.fc.weight.grad, mlp.proj.weight.grad))
    torch._dynamo.reset()
    assert calls.n == 2
    for name, f, e in zip(("out", "du", "dW_up", "dW_down"), *results):
        assert f.dtype == e.dtype and f.shape == e.shape, name
        # both are bf16 computations of the same values: they differ by about one rounding (~0.3%), not by 1%
        assert rel_err(f.float(), e.float()) < 1e-2, (name, rel_err(f.float(), e.float()))


@interpreted
def test_eval_no_grad_and_gptq_calibration_stay_eager(monkeypatch):
    calls = KernelCalls(monkeypatch)
    monkeypatch.setattr(tg, "QUANT_PASSTHROUGH_NUMEL", 0)  # so that the tiny MLP matrices get Hessians too
    fused, plain = tiny_gpt(True), tiny_gpt(False)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(5))
    batches = [(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_fused, _ = tg.collect_hessians(fused, batches)
        h_plain, _ = tg.collect_hessians(plain, batches)
        with torch.no_grad():
            fused(*batches[0])  # training mode, but no grad
        fused.eval()
        fused(*batches[0])
    assert calls.n == 0
    assert h_fused.keys() == h_plain.keys() and any(".mlp.fc." in k for k in h_fused)
    assert all(torch.equal(h_fused[k], h_plain[k]) for k in h_fused)


@interpreted
def test_enable_fused_mlp_only_where_the_kernels_run():
    model = tiny_gpt(True)
    assert all(b.mlp.fused for b in model.blocks)
    assert not tg.enable_fused_mlp(model, False) and not any(b.mlp.fused for b in model.blocks)
    assert not tg.fused_mlp_supported(torch.zeros(128, 96))  # K = 96 is not a multiple of the 64-wide K tile
    assert not tg.MLP(K, N).fused  # a fresh model (TTT, the dequantized model) is never fused


# ---------------------------------------------------------------------------------------------------------------
# Run in the parent
# ---------------------------------------------------------------------------------------------------------------

def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.skipif(INTERPRETED, reason="runs in the parent")
def test_shipped_wrapped_script_finds_its_kernel_source(tmp_path):
    """Records ship train_gpt.py as exec() of its LZMA-compressed source; triton.jit must still find the kernels'
    source at import (it reads it through inspect), and find the right one."""
    pytest.importorskip("triton")
    wrapped = tmp_path / "train_gpt.py"
    wrapped.write_text(tg.wrap_source((ROOT / "train_gpt.py").read_text()))
    r = run_python(f"""
        import sys
        path = {str(wrapped)!r}
        sys.argv = [path]
        g = {{"__name__": "__main__", "__file__": path}}
        exec(compile(open(path).read(), path, "exec"), g)
        print("SRC", g["fused_mlp_gemm_kernel"].src.splitlines()[0])
        print("SRC", g["_fused_mlp_round"].src.splitlines()[0])
    """, DRY_RUN="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dry_run: configuration valid" in r.stdout
    assert "SRC def fused_mlp_gemm_kernel(" in r.stdout and "SRC def _fused_mlp_round(" in r.stdout


@pytest.mark.skipif(INTERPRETED, reason="runs in the parent")
@pytest.mark.parametrize("backward", [False, True])
def test_kernel_compiles_for_h100_with_wgmma_and_pipelined_loads(backward):
    """Triton compiles the kernel ahead of time for sm90 without a GPU (ptxas ships with it): the GPU-only code path
    is valid, tl.dot becomes wgmma (warp_group_dot), the K loop is software-pipelined (async copies), and the stages
    fit in shared memory. Argument attributes are those a launch at the training shape specializes on (16-divisible
    pointers, sizes and strides; unit strides constant)."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget")
    kernel = tg.fused_mlp_gemm_kernel
    block_m, block_n, stages, warps = tg.FUSED_MLP_CONFIGS[0]
    unit = "stride_bn" if backward else "stride_bk"  # W_down is row-major [K, N]; W_upᵀ is a transposed view
    signature = {name: "constexpr" for name in kernel.arg_names}
    signature.update({p: "*bf16" for p in ("a_ptr", "b_ptr", "pre_ptr", "out_ptr")})
    signature.update({i: "i32" for i in ("M", "N", "stride_am", "stride_bn", "stride_bk") if i != unit})
    constants = dict(stride_ak=1, K=512, BACKWARD=backward, INTERPRET=False, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=tg.FUSED_MLP_BLOCK_K, **{unit: 1})
    divisible = [n for n, kind in signature.items() if kind != "constexpr"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ttgir = compiled.asm["ttgir"]
    assert "warp_group_dot" in ttgir and "async_copy_global_to_local" in ttgir
    assert 0 < compiled.metadata.shared <= 227 * 1024
    assert "cubin" in compiled.asm


@pytest.mark.skipif(INTERPRETED, reason="runs in the parent")
def test_without_triton_the_mlp_runs_eager():
    r = run_python("""
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        import train_gpt as tg
        assert tg.triton is None
        mlp = tg.MLP(64, 128)
        assert not tg.enable_fused_mlp(mlp, True) and not mlp.fused
        mlp(torch.randn(3, 64)).sum().backward()
        print("OK")
    """, TRITON_INTERPRET="1")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
