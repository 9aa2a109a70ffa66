"""Evaluation (train_gpt.py section 7): equivalences between the three evaluations, exact coverage, the TTT plan,
warm-up, projection and log lines. CPU, small model."""
import copy
import math
import re

import numpy as np
import pytest
import torch

from eval_helpers import make_ctx, make_model, smoke_hp, smoke_stream, stream_bytes, tg
from conftest import forward_logits


def test_sliding_at_full_stride_equals_plain(smoke_data):
    hp = smoke_hp(eval_stride=128)
    tokens, tables = smoke_stream(smoke_data, hp)
    model = make_model(hp)
    plain = tg.eval_val(model, tokens, tables, hp, make_ctx(), return_losses=True)
    sliding = tg.eval_val_sliding(model, tokens, tables, hp, make_ctx(), return_losses=True)
    assert sliding.tokens == plain.tokens == len(tokens) - 1
    assert sliding.bytes == plain.bytes
    assert torch.equal(sliding.target_losses, plain.target_losses)
    assert math.isclose(sliding.val_loss, plain.val_loss, rel_tol=1e-12)
    assert math.isclose(sliding.val_bpb, plain.val_bpb, rel_tol=1e-12)


def test_sliding_gives_later_targets_more_context(smoke_data):
    hp = smoke_hp()
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=2048)
    model = make_model(hp)
    plain = tg.eval_val(model, tokens, tables, hp, make_ctx(), return_losses=True).target_losses
    sliding = tg.eval_val_sliding(model, tokens, tables, hp, make_ctx(), return_losses=True).target_losses
    T = hp.eval_seq_len
    assert torch.equal(plain[:T], sliding[:T])  # the first window is the first block
    assert not torch.equal(plain[T:], sliding[T:])


def test_ttt_with_zero_lr_equals_sliding(smoke_data):
    hp = smoke_hp(ttt_lr=0.0)
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=5000)
    model = make_model(hp)
    before = copy.deepcopy(model.state_dict())
    sliding = tg.eval_val_sliding(model, tokens, tables, hp, make_ctx(), return_losses=True)
    ttt = tg.eval_val_ttt(model, tokens, tables, hp, make_ctx(), return_losses=True)
    assert (ttt.tokens, ttt.bytes) == (sliding.tokens, sliding.bytes)
    assert torch.equal(ttt.target_losses, sliding.target_losses)
    assert math.isclose(ttt.val_bpb, sliding.val_bpb, rel_tol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # With a learning rate the same pass does train: the first chunk is scored unchanged, later ones differ.
    trained = tg.eval_val_ttt(make_model(hp), tokens, tables, smoke_hp(), make_ctx(), return_losses=True)
    C = hp.ttt_chunk_tokens
    assert torch.equal(trained.target_losses[:C], sliding.target_losses[:C])
    assert not torch.equal(trained.target_losses[C:], sliding.target_losses[C:])


@pytest.mark.parametrize("n_targets,stride,chunk,shuffle", [(None, 32, 1024, False), (3001, 48, 1000, False),
                                                             (1500, 128, 100, False), (2000, 32, 1024, True)])
def test_every_target_scored_exactly_once(smoke_data, n_targets, stride, chunk, shuffle):
    """Whole stream and awkward geometries: a partial last block, a stride that divides neither the sequence nor
    the chunk, chunks shorter than a sequence. Random tokens put BOS before leading-space pieces, whose space is
    then not counted; the smoke documents never do that."""
    hp = smoke_hp(eval_stride=stride, ttt_chunk_tokens=chunk)
    tokens, tables = smoke_stream(smoke_data, hp, n_targets)
    if shuffle:
        tokens = torch.randint(0, hp.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(0))
        tokens[::50] = 1
        base, leading, boundary = tables
        assert bool((boundary[tokens[:-1]] & leading[tokens[1:]]).any())
    n, nbytes = len(tokens) - 1, stream_bytes(tokens, tables)
    model = make_model(hp)
    for evaluate in (tg.eval_val, tg.eval_val_sliding, tg.eval_val_ttt):
        ctx = make_ctx()
        result = evaluate(copy.deepcopy(model), tokens, tables, hp, ctx, label="x", return_losses=True)
        assert (result.tokens, result.expected_tokens, result.bytes, result.expected_bytes) == (n, n, nbytes, nbytes)
        assert result.exactly_once and result.covered
        assert bool((result.target_losses > 0).all())  # every position received its own loss
        assert f"coverage x val_tokens:{n} val_bytes:{nbytes} expected_tokens:{n}" in "\n".join(ctx.log)
        assert math.isclose(result.val_loss, float(result.target_losses.sum()) / n, rel_tol=1e-12)
        assert math.isclose(result.val_bpb, float(result.target_losses.sum()) / (math.log(2) * nbytes), rel_tol=1e-12)


@pytest.mark.parametrize("n,T,stride,chunk", [(40_540_160, 2048, 64, 32768), (13_824, 128, 32, 1024),
                                             (3_001, 128, 48, 1000), (1_500, 128, 128, 100), (777, 64, 5, 37)])
def test_ttt_plan_trains_only_on_scored_targets(n, T, stride, chunk):
    hp = smoke_hp(eval_seq_len=T, eval_stride=stride, ttt_chunk_tokens=chunk)
    plan = tg.ttt_plan(n, hp)
    starts = tg.sliding_window_starts(n, T, stride)
    first = starts + tg.sliding_score_from(starts, T, stride)
    ends = np.minimum(starts + T, n)
    assert len(plan) == -(-n // chunk) and plan[-1].train_seqs == 0
    assert plan[0].first_window == 0 and plan[-1].end_window == len(starts)
    scored_end = 0
    for prev, c in zip([None] + plan[:-1], plan):
        if prev is not None:
            assert c.first_window == prev.end_window and c.train_start == prev.train_start + prev.train_seqs * T
        if c.end_window > c.first_window:
            assert first[c.first_window] == scored_end  # windows score a contiguous run of targets
            scored_end = int(ends[c.end_window - 1])
        assert c.train_start + c.train_seqs * T <= scored_end  # score first: only targets already scored
    assert scored_end == n
    if n == 40_540_160:  # the records' numbers (ANCHORS 2.4, 6.1)
        assert len(starts) == 633_409 and len(plan) == 1238
        assert all(c.train_seqs == 16 and c.train_start == c.index * chunk for c in plan[:-1])


def test_warmup_projection_and_log_lines(smoke_data):
    hp = smoke_hp(eval_budget_seconds=0.001, ttt_mode="score_first")  # lora_phased: tests/test_eval_lora_ttt.py
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=3000)
    model = make_model(hp)
    before = copy.deepcopy(model.state_dict())
    ctx = make_ctx()
    timings = tg.eval_warmup(model, hp, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert min(timings.plain_batch, timings.sliding_batch, timings.ttt_step) > 0 and ctx.counted_eval_seconds == 0
    results = [tg.eval_val(model, tokens, tables, hp, ctx, label="pre-quantization post-ema", counted=False),
               tg.eval_val(model, tokens, tables, hp, ctx)]
    assert ctx.counted_eval_seconds == results[1].seconds
    projected = tg.log_eval_projection(len(tokens) - 1, timings, hp, ctx)
    assert projected > ctx.counted_eval_seconds
    results.append(tg.eval_val_sliding(model, tokens, tables, hp, ctx))
    results.append(tg.eval_val_ttt(model, tokens, tables, hp, ctx))
    assert math.isclose(tg.log_eval_summary(results, hp, ctx, timings), sum(r.seconds for r in results[1:]))
    text = "\n".join(ctx.log)
    assert re.search(r"^eval_warmup: .*random tokens", text, re.M)
    assert re.search(r"^eval_projection: sliding ~\d+s ttt ~\d+s total ~\d+s budget 0s$", text, re.M)
    assert re.search(r"^WARNING eval_projection: .*SLIDING_WINDOW_ENABLED=0.*EVAL_STRIDE.*TTT_EPOCHS.*TTT_ENABLED=0",
                     text, re.M)
    assert re.search(r"^ttt:start chunks=3 ttt_lr=0.05 ttt_epochs=1$", text, re.M)
    for label in ("quantized", "quantized_sliding_window", "quantized_ttt"):
        assert re.search(rf"^{label} val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}} eval_time:\d+ms$", text, re.M)
        assert re.search(rf"^coverage {label} val_tokens:3000 val_bytes:\d+ expected_tokens:3000 ", text, re.M)
    assert re.search(r"^quantized_ttt:progress 1/3 elapsed:", text, re.M)
    assert re.search(r"^eval_summary: quantized:[\d.]+s quantized_sliding_window:[\d.]+s quantized_ttt:[\d.]+s "
                     r"total_eval_time:[\d.]+s budget:0s \(not counted: eval_warmup:[\d.]+s "
                     r"pre-quantization_post-ema:[\d.]+s\)$", text, re.M)
    assert re.search(r"^WARNING eval_summary:", text, re.M)
    assert "ERROR" not in text


def test_over_budget_advice_names_only_settings_that_apply():
    """With sliding off and LoRA TTT nothing reads EVAL_STRIDE, so the warning does not suggest it."""
    def warning(**overrides):
        ctx = make_ctx()
        tg._warn_over_budget("eval_projection", 700.0, 100.0, 500.0, smoke_hp(eval_budget_seconds=600.0, **overrides),
                             ctx)
        return "\n".join(ctx.log)

    assert "EVAL_STRIDE" in warning(sliding_window_enabled=1, ttt_mode="lora_phased")
    assert "EVAL_STRIDE" in warning(sliding_window_enabled=0, ttt_mode="score_first")  # its chunks slide too
    lora = warning(sliding_window_enabled=0, ttt_mode="lora_phased")
    assert "exceeds EVAL_BUDGET_SECONDS=600s" in lora and "TTT_CHUNK_SIZE" in lora and "EVAL_STRIDE" not in lora


def test_unlabelled_eval_is_silent_and_off_the_ledger(smoke_data):
    hp = smoke_hp()
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=1000)
    ctx = make_ctx()
    result = tg.eval_val(make_model(hp), tokens, tables, hp, ctx, label=None, counted=False)
    assert result.covered and not ctx.log and ctx.counted_eval_seconds == 0


def test_evaluation_attends_across_documents(smoke_data):
    """Evaluation is dense causal over the stream, as in the records: its per-target losses are the CE of the model's
    plain forward, even with BOS tokens inside the window (document isolation is a training-only option)."""
    hp = smoke_hp()
    T = hp.eval_seq_len
    tokens, tables = smoke_stream(smoke_data, hp, n_targets=T)
    assert bool((tokens[1:T] == tg.BOS_ID).any())  # the window holds a document boundary
    model = make_model(hp)
    plain = tg.eval_val(model, tokens, tables, hp, make_ctx(), return_losses=True)
    with torch.no_grad():
        logits = forward_logits(model, tokens[:T][None])[0]
        dense = torch.nn.functional.cross_entropy(logits.float(), tokens[1:T + 1], reduction="none")
        isolated = forward_logits(model, tokens[:T][None], isolate_docs=True)[0]
    torch.testing.assert_close(plain.target_losses.float(), dense, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, isolated, atol=1e-4)  # the check is sensitive to isolation
