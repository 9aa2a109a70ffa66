"""With COMPILE=1, eval_warmup compiles every graph the evaluations run, for any copy of the model: the timed
phases never compile or recompile. A counting backend stands in for inductor, so this runs in seconds on CPU."""
import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from eval_helpers import make_ctx, make_model, smoke_hp, smoke_stream, tg


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_timed_phases_run_only_graphs_compiled_in_warmup(smoke_data, monkeypatch, scope, forbid_recompiles):
    hp = smoke_hp(compile=1, compile_scope=scope)
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=2 * hp.ttt_chunk_tokens + 300)
    counter = CompileCounter()
    monkeypatch.setattr(tg, "EVAL_COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    model = make_model(hp)
    ctx = make_ctx()
    tg.eval_warmup(model, hp, ctx)
    compiled_in_warmup = counter.frame_count
    assert compiled_in_warmup >= 3  # scoring from position 0, from T - stride, and the TTT training step
    forbid_recompiles()
    plain = tg.eval_val(model, tokens, tables, hp, ctx, return_losses=True)
    sliding = tg.eval_val_sliding(model, tokens, tables, hp, ctx, return_losses=True)
    ttt = tg.eval_val_ttt(make_model(hp), tokens, tables, hp, ctx, return_losses=True)  # a fresh instance, as in main
    assert counter.frame_count == compiled_in_warmup
    # Compiled and eager runs agree.
    eager = dataclasses.replace(hp, compile=0)
    assert torch.allclose(plain.target_losses, tg.eval_val(model, tokens, tables, eager, make_ctx(),
                                                           return_losses=True).target_losses)
    assert torch.allclose(ttt.target_losses, tg.eval_val_ttt(make_model(hp), tokens, tables, eager,
                                                             make_ctx(), return_losses=True).target_losses)
    assert sliding.covered and ttt.covered
    torch._dynamo.reset()

