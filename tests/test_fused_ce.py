"""Fused softcapped cross-entropy (Triton) against the eager reference: softcap 30·tanh(z/30), then fp32 F.cross_entropy.

Triton's CPU interpreter runs the kernels. It is chosen when a kernel is decorated, i.e. when train_gpt is imported, so
the checks run in one subprocess with TRITON_INTERPRET=1 (this file run as a script prints their measurements as
JSON) and the tests below assert on them; the pytest process itself keeps its eager CPU path.

Tolerances. Both sides compute in fp32 from the same input values (bf16 inputs are upcast exactly); N = rows, and
the gradient of the mean loss is dz = (1/N)·(p - onehot)·4s(1-s), so |dz| <= 1/N.
* loss: |error| <= 1e-4. The loss is LSE - w_target with both terms up to 2c + ln V ~ 67, where an fp32 ulp is 7.6e-6;
  the fused and the eager formulas (sigmoid vs tanh, online vs two-pass logsumexp, other summation order) differ by a
  few ulps (measured <= 6e-6), so 1e-4 is ~13 ulps and still far below any real defect (a wrong term is >= 1e-2).
* dz, fp32 input: |error| <= 1e-4·|ref| + 1e-6/N. p = exp(w - LSE) inherits the ~1e-5 absolute error of w - LSE as a
  relative error. Where the softcap saturates (|z| >> c) both 4s(1-s) and 1 - tanh^2 are 1 minus a number close to 1:
  each has an absolute error of a few fp32 ulps of 1 (~1e-7) whatever its size, hence the absolute 1e-6/N.
* dz, bf16 input: the kernel stores dz in bf16 (as autograd does for a bf16 leaf). On the GPU that rounds to nearest
  (relative error <= 2^-8), but Triton's interpreter truncates fp32 -> bf16 (error < 1 bf16 ulp <= 2^-7 relative), so
  the bound is (2^-7 + 1e-4)·|ref| + 1e-6/N here; bench/fused_ce.py checks the GPU result at 2^-8.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import forward_logits, run_interpreted

ROOT = Path(__file__).resolve().parents[1]
CAP = 30.0
# (rows, vocabulary, dtype): one block, a partial block (V = 1000 < 1024), and several blocks with a partial last one
CASES = [(7, 512, "float32"), (33, 1000, "float32"), (16, 1000, "bfloat16"), (9, 2500, "bfloat16"),
         (12, 2500, "float32")]
LOSS_ATOL = 1e-4
GRAD_RTOL = {"float32": 1e-4, "bfloat16": 2.0 ** -7 + 1e-4}
GRAD_ATOL_TIMES_N = 1e-6


# ------------------------------------------------------------------------------------------------------------------
# Worker: runs under TRITON_INTERPRET=1 in a subprocess (see the fixture below).
# ------------------------------------------------------------------------------------------------------------------

def _logits(n: int, v: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z ~ 15·N(0, 1), so the softcap is well into its nonlinear range, plus saturated entries (±200, ±90) in row 0;
    targets include the first and the last column."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 15
    z[0, :4] = torch.tensor([200.0, -200.0, 90.0, -90.0])
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0], targets[-1] = 0, v - 1
    return z.to(dtype), targets


def _reference(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 loss and d(mean loss)/dz (fp32) of the eager path."""
    z = z.detach().float().requires_grad_()
    loss = torch.nn.functional.cross_entropy(CAP * torch.tanh(z / CAP), targets, reduction="none")
    loss.mean().backward()
    return loss.detach(), z.grad


def _fused(tg, z: torch.Tensor, targets: torch.Tensor, fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_()
    loss = (fn or tg.softcap_cross_entropy)(z, targets, CAP)
    loss.mean().backward()
    return loss.detach(), z.grad


def _errors(loss, dz, ref_loss, ref_dz, dtype: str) -> dict:
    """Max loss error, and the max over the entries of |dz - ref| / (rtol·|ref| + atol): <= 1 passes."""
    err = (dz.float() - ref_dz).abs()
    atol = GRAD_ATOL_TIMES_N / dz.size(0)
    return dict(loss_err=(loss - ref_loss).abs().max().item(), dz_dtype=str(dz.dtype).split(".")[-1],
                dz_ratio=(err / (GRAD_RTOL[dtype] * ref_dz.abs() + atol)).max().item(),
                finite=bool(torch.isfinite(loss).all() and torch.isfinite(dz).all()))


def check_kernels(tg) -> dict:
    out = {}
    for i, (n, v, dtype) in enumerate(CASES):
        z, targets = _logits(n, v, getattr(torch, dtype), seed=i)
        out[f"{n}x{v}_{dtype}"] = _errors(*_fused(tg, z, targets), *_reference(z, targets), dtype)
    return out


def check_compiled(tg) -> dict:
    """torch.compile(fullgraph=True) traces the custom op through its fake implementations, backward included."""
    z, targets = _logits(8, 1000, torch.bfloat16, seed=11)
    compiled = torch.compile(tg.softcap_cross_entropy, fullgraph=True, backend="aot_eager")
    loss, dz = _fused(tg, z, targets, fn=compiled)
    eager_loss, eager_dz = _fused(tg, z, targets)
    return dict(loss_diff=(loss - eager_loss).abs().max().item(), dz_equal=bool(torch.equal(dz, eager_dz)))


def check_model(tg) -> dict:
    """GPT.forward(ids, targets) with the fused path (the kernels) and the eager one, same weights."""
    hp = tg.dataclasses.replace(tg.load_hyperparameters({"SMOKE": "1"}), num_layers=2, num_loops=0, xsa_last_n=1,
                                parallel_residual_start=1)
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    ids, targets = torch.randint(0, hp.vocab_size, (2, 2, 16))
    losses, grads = {}, {}
    for fused in (True, False):
        model.fused_ce = fused
        model.zero_grad()
        losses[fused] = model(ids, targets)
        losses[fused].backward()
        grads[fused] = [p.grad.clone() for p in model.parameters()]
    grad_err = max((g1 - g0).abs().max().item() / (g0.abs().max().item() + 1e-12)
                   for g1, g0 in zip(grads[True], grads[False]))
    return dict(loss_fused=losses[True].item(), loss_eager=losses[False].item(), grad_rel_err=grad_err,
                supported_cpu=tg.fused_kernels_supported(torch.device("cpu")))


def check_wrapped(tg, folder: str) -> dict:
    """The LZMA-wrapped script: its kernels are decorated (inspect.getsource works), and its op computes the loss."""
    import runpy

    from triton.runtime.jit import JITFunction

    path = Path(folder) / "train_gpt.py"
    path.write_text(tg.wrap_source((ROOT / "train_gpt.py").read_text()))
    g = runpy.run_path(str(path), run_name="wrapped_train_gpt")
    kernel = g["_softcap_ce_fwd_kernel"]
    compiled_form = JITFunction(kernel.fn)  # what @triton.jit does without the interpreter: reads the source
    z, targets = _logits(5, 700, torch.float32, seed=5)
    loss = g["softcap_cross_entropy"](z, targets, CAP)
    return dict(filename=kernel.fn.__code__.co_filename, source_head=compiled_form.src.splitlines()[0],
                loss_err=(loss - _reference(z, targets)[0]).abs().max().item(), name=g["__name__"])


def worker(folder: str) -> dict:
    import train_gpt as tg

    # the wrapped script re-registers the custom ops, so it goes last
    return dict(interpret=tg.TRITON_INTERPRET, kernels=check_kernels(tg), compiled=check_compiled(tg),
                model=check_model(tg), wrapped=check_wrapped(tg, folder))


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    return run_interpreted(__file__, str(tmp_path_factory.mktemp("wrapped")))


@pytest.mark.parametrize("case", [f"{n}x{v}_{d}" for n, v, d in CASES])
def test_kernels_match_eager_reference(interp, case):
    r = interp["kernels"][case]
    dtype = case.split("_")[-1]
    assert r["finite"]
    assert r["dz_dtype"] == dtype  # the gradient comes back in z's dtype, as autograd expects
    assert r["loss_err"] <= LOSS_ATOL
    assert r["dz_ratio"] <= 1.0, r


def test_compiled_fullgraph_matches_eager_op(interp):
    r = interp["compiled"]
    assert r["loss_diff"] == 0.0 and r["dz_equal"]


def test_model_forward_fused_matches_eager(interp):
    r = interp["model"]
    assert r["supported_cpu"]  # the fused path really ran (interpreter on CPU)
    assert abs(r["loss_fused"] - r["loss_eager"]) <= LOSS_ATOL
    assert r["grad_rel_err"] <= 1e-4


def test_wrapped_script_kernels_get_their_source(interp):
    r = interp["wrapped"]
    assert r["source_head"].startswith("def _softcap_ce_fwd_kernel(")
    assert not r["filename"].endswith(".py")  # the source came from linecache, not from the (wrapped) file
    assert r["loss_err"] <= LOSS_ATOL
    assert r["name"] == "wrapped_train_gpt"  # the wrapper runs the script in its own namespace: __name__ carries over


def test_without_triton_the_eager_path_runs(monkeypatch):
    """Where Triton is not installed the script imports, and GPT.forward falls back to the eager CE."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("train_gpt_without_triton", ROOT / "train_gpt.py")
    tg = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tg)
    spec.loader.exec_module(tg)
    assert tg.triton is None and not tg.fused_kernels_supported(torch.device("cuda"))
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    assert hp.fused_ce == 1
    model = tg.build_model(hp, torch.device("cpu"))
    ids = torch.randint(0, hp.vocab_size, (1, 8))
    loss = model(ids, ids)
    ref = torch.nn.functional.cross_entropy(forward_logits(model, ids).flatten(0, 1), ids.flatten())
    assert torch.equal(loss, ref)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
