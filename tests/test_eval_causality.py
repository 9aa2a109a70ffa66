"""Score-before-update, proved by perturbation: changing the validation tokens from position q on must leave the
loss of every target before q unchanged, bit for bit, even with TTT training on earlier chunks. Two negative
controls show the check catches leaks: TTT that updates before it scores, and a model that looks ahead."""
import copy

import pytest
import torch

from eval_helpers import lookahead_attention, make_ctx, make_model, smoke_hp, smoke_stream, tg

CHUNKS = 6
CHANGED_CHUNK = 4  # a later chunk, so that chunks 0..3 have already trained the model when it is scored


def perturbed_after(tokens: torch.Tensor, q: int, vocab_size: int) -> torch.Tensor:
    """The same stream with every token from index q on replaced by a different token."""
    changed = tokens.clone()
    shift = torch.randint(1, vocab_size, changed[q:].shape, generator=torch.Generator().manual_seed(0))
    changed[q:] = (changed[q:] + shift) % vocab_size
    return changed


@pytest.fixture(scope="module")
def stream(smoke_data):
    hp = smoke_hp()
    return smoke_stream(smoke_data, hp, n_targets=CHUNKS * hp.ttt_chunk_tokens)


def check_prefix(evaluate, model, stream):
    """Target i predicts token i+1, so changing tokens q.. may change targets q-1.. and nothing before them.
    Returns (prefix unchanged, something after it changed)."""
    hp = smoke_hp()
    tokens, tables = stream
    q = CHANGED_CHUNK * hp.ttt_chunk_tokens + 300
    changed = perturbed_after(tokens, q, hp.vocab_size)
    assert torch.equal(changed[:q], tokens[:q]) and bool((changed[q:] != tokens[q:]).all())
    a = evaluate(copy.deepcopy(model), tokens, tables, hp)
    b = evaluate(copy.deepcopy(model), changed, tables, hp)
    return torch.equal(a[:q - 1], b[:q - 1]), not torch.equal(a[q - 1:], b[q - 1:])


def ttt_losses(model, tokens, tables, hp):
    return tg.eval_val_ttt(model, tokens, tables, hp, make_ctx(), return_losses=True).target_losses


def update_then_score_losses(model, tokens, tables, hp):
    """A deliberately illegal TTT built from the same parts as eval_val_ttt: each chunk trains on its targets
    first and is scored afterwards."""
    ctx = make_ctx()
    n, T, stride = len(tokens) - 1, hp.eval_seq_len, hp.eval_stride
    plan = tg.ttt_plan(n, hp)
    starts = tg.sliding_window_starts(n, T, stride)
    score_from = tg.sliding_score_from(starts, T, stride)
    windows = tg._Windows([(starts[c.first_window:c.end_window], score_from[c.first_window:c.end_window])
                           for c in plan], tg.SLIDING_BATCH_WINDOWS, T, ctx.device)
    sums = tg._ScoreSums(n, ctx.device, keep_losses=True)
    tables = tuple(tables)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    for chunk, (b0, b1) in zip(plan, windows.segments):
        for _ in range(hp.ttt_epochs if chunk.train_seqs else 0):
            optimizer.zero_grad(set_to_none=False)
            tg._ttt_accumulate_grads(model, tokens, chunk, hp, ctx)
            tg._reduce_and_clip_grads(params, hp.ttt_grad_clip, ctx)
            optimizer.step()
        tg._score_batches(model, tokens, windows, range(b0, b1), tables, sums, hp, ctx)
    return sums.losses


def sliding_losses(model, tokens, tables, hp):
    return tg.eval_val_sliding(model, tokens, tables, hp, make_ctx(), return_losses=True).target_losses


def test_ttt_scores_every_target_before_training_on_it(stream):
    prefix_same, suffix_changed = check_prefix(ttt_losses, make_model(smoke_hp()), stream)
    assert prefix_same and suffix_changed


def test_ttt_updates_happen_before_the_perturbed_chunk(stream):
    """The causality check above is only meaningful if earlier chunks did change the weights."""
    hp = smoke_hp()
    tokens, tables = stream
    model = make_model(hp)
    ttt = ttt_losses(copy.deepcopy(model), tokens, tables, hp)
    sliding = sliding_losses(model, tokens, tables, hp)
    C = hp.ttt_chunk_tokens
    for c in range(1, CHANGED_CHUNK + 1):
        assert not torch.equal(ttt[c * C:(c + 1) * C], sliding[c * C:(c + 1) * C])


def test_negative_control_update_then_score_is_caught(stream):
    prefix_same, _ = check_prefix(update_then_score_losses, make_model(smoke_hp()), stream)
    assert not prefix_same


def test_negative_control_lookahead_model_is_caught(stream, monkeypatch):
    monkeypatch.setattr(tg, "causal_attention", lookahead_attention)
    prefix_same, _ = check_prefix(sliding_losses, make_model(smoke_hp()), stream)
    assert not prefix_same
