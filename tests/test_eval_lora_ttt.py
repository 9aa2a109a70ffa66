"""TTT_MODE=lora_phased (train_gpt.py section 7, ANCHORS 6.2): the plan (documents, batches, lanes, phases), exact
coverage, equality with plain per-document scoring at lr 0, and legality by perturbation: a document's scores never
depend on its own later tokens, and other documents reach it only through documents whose scoring had finished.
CPU, a small looped GPT."""
import copy
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from eval_helpers import gloo_group, lora_hp, make_ctx, make_model, smoke_stream, stream_bytes, tg
from conftest import forward_logits

N_TARGETS = 1500  # 15 smoke documents: batches of 3, 4, 4, 4 (longest first), phases after the 2nd and 3rd


@pytest.fixture(scope="module")
def stream(smoke_data):
    return smoke_stream(smoke_data, lora_hp(), N_TARGETS)


@pytest.fixture(scope="module")
def baseline(stream):
    """The default test configuration's result and log lines, shared by the tests that compare against it."""
    tokens, tables = stream
    ctx = make_ctx()
    result = tg.eval_val_lora_ttt(make_model(lora_hp()), tokens, tables, lora_hp(), ctx, label="x", return_losses=True)
    return result, list(ctx.log)


@pytest.fixture
def one_lane(monkeypatch):
    """Every batch on one lane, so that warm-started A passes through all of a segment's batches."""
    monkeypatch.setattr(tg, "TTT_LANES", 1)


def lora_losses(model, tokens, tables, hp):
    return tg.eval_val_lora_ttt(model, tokens, tables, hp, make_ctx(), label=None, return_losses=True).target_losses


def plan_of(tokens, hp):
    return tg.lora_ttt_plan(tg.document_starts(tokens.numpy()), len(tokens) - 1, hp)


def doc_targets(plan, doc):
    return slice(int(plan.starts[doc]), int(plan.starts[doc] + plan.preds[doc]))


def docs_of(plan, segment) -> list[int]:
    return [int(d) for lane in plan.segments[segment].lanes for b in lane for d in b.docs]


def downstream(plan, doc) -> set[int]:
    """Documents that may legally depend on `doc`: those its lane scores after its batch in the same segment (warm
    start hands A on) and those of later segments (a phase may train on it)."""
    for k, segment in enumerate(plan.segments):
        for lane in segment.lanes:
            for i, batch in enumerate(lane):
                if doc in batch.docs:
                    later = lane[i + 1:] + [b for s in plan.segments[k + 1:] for l in s.lanes for b in l]
                    return {int(d) for b in later for d in b.docs}
    raise AssertionError(f"document {doc} is in no batch")


def perturbed(tokens, lo, hi, vocab_size):
    """Tokens [lo, hi) replaced by different ones, never BOS (the documents stay the same)."""
    changed = tokens.clone()
    shift = torch.randint(1, vocab_size - 3, (hi - lo,), generator=torch.Generator().manual_seed(0))
    changed[lo:hi] = 3 + (changed[lo:hi].clamp(min=3) - 3 + shift) % (vocab_size - 3)
    assert bool((changed[lo:hi] != tokens[lo:hi]).all()) and not bool((changed[lo:hi] == tg.BOS_ID).any())
    return changed


def per_document_reference(model, tokens, hp):
    """No TTT, written from the spec alone: each document's chunks scored with the last <= EVAL_SEQ_LEN tokens of
    the document up to the chunk's end as context."""
    C, T, n = hp.ttt_chunk_size, hp.eval_seq_len, len(tokens) - 1
    starts = tg.document_starts(tokens.numpy())
    out = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for s, e in zip(starts, np.append(starts[1:], n)):
            for lo in range(0, e - s, C):
                end = min(lo + C, e - s)
                ws = max(0, end - T)
                logits = forward_logits(model, tokens[s + ws:s + end][None])[0]
                ce = F.cross_entropy(logits.float(), tokens[s + ws + 1:s + end + 1], reduction="none")
                out[s + lo:s + end] = ce[lo - ws:].double()
    return out


def check_perturbation(tokens, tables, hp, doc, offset, evaluate=lora_losses, unchanged=None):
    """Change document `doc` from its token `offset` on (its final target, the next BOS, stays). Returns (its
    targets before offset - 1 unchanged bit for bit, the documents whose scores changed, some of its targets from
    offset - 1 on changed). `unchanged`: the losses of the unperturbed stream, if already known."""
    plan = plan_of(tokens, hp)
    s, p = int(plan.starts[doc]), int(plan.preds[doc])
    changed = perturbed(tokens, s + offset, s + p, hp.vocab_size)
    a = unchanged if unchanged is not None else evaluate(make_model(hp), tokens, tables, hp)
    b = evaluate(make_model(hp), changed, tables, hp)
    prefix, rest = slice(s, s + offset - 1), slice(s + offset - 1, s + p)
    moved = {d for d in range(len(plan.starts)) if not torch.equal(a[doc_targets(plan, d)], b[doc_targets(plan, d)])}
    return torch.equal(a[prefix], b[prefix]), moved, not torch.equal(a[rest], b[rest])


def longest_in(plan, segment):
    return max(docs_of(plan, segment), key=lambda d: plan.preds[d])


def test_documents_tile_the_stream():
    tokens = np.array([5, 6, 1, 7, 1, 1, 8, 9, 1])  # no leading BOS, an empty document, a BOS as the last token
    starts = tg.document_starts(tokens)
    assert starts.tolist() == [0, 2, 4, 5]
    plan = tg.lora_ttt_plan(starts, len(tokens) - 1, lora_hp(phased_ttt_num_phases=0))
    assert plan.preds.tolist() == [2, 2, 1, 3] and plan.preds.sum() == len(tokens) - 1


def test_plan_batches_lanes_and_phase_boundaries():
    """The record's numbers: 50,000 documents, batches of 64, boundaries 666 / 1333 / 2000. Longest batches first;
    a phase starts after the first batch that reaches its boundary and trains on the boundary's worth of scored
    documents that come first in ascending-length order."""
    hp = lora_hp(ttt_batch_size=64, ttt_chunk_size=48, eval_seq_len=2048, phased_ttt_prefix_docs=2000,
                 phased_ttt_num_phases=3)
    preds = np.random.default_rng(0).integers(1, 5000, 50_000)
    starts = np.concatenate([[0], np.cumsum(preds)[:-1]])
    plan = tg.lora_ttt_plan(starts, int(preds.sum()), hp)
    order = np.argsort(preds, kind="stable")
    assert plan.boundaries == [666, 1333, 2000] and len(plan.batches) == 782
    # The 16 longest documents make the last, partial batch, which runs first: 16 + 11 * 64 = 720 >= 666.
    assert [s.scored_docs for s in plan.segments] == [720, 1360, 2000, 50_000]
    segments = [sorted((b.index for lane in s.lanes for b in lane), reverse=True) for s in plan.segments]
    assert sum(segments, []) == list(range(781, -1, -1))  # every batch once, longest first
    scored = []
    for k, segment in enumerate(plan.segments):
        scored += [int(d) for i in segments[k] for d in order[i * 64:(i + 1) * 64]]
        if k < 3:  # the shortest `boundary` of the documents scored so far
            boundary = plan.boundaries[k]
            rank = {int(d): r for r, d in enumerate(order)}
            assert sorted(rank[int(d)] for d in segment.global_docs) == sorted(rank[d] for d in scored)[:boundary]
            assert len(segment.global_docs) == boundary and set(segment.global_docs.tolist()) <= set(scored)
        else:
            assert len(segment.global_docs) == 0
        loads = [sum(tg._lora_batch_cost(preds[b.docs], hp, 64 * 48, 1.0) for b in lane) for lane in segment.lanes]
        biggest = max(tg._lora_batch_cost(preds[b.docs], hp, 64 * 48, 1.0) for lane in segment.lanes for b in lane)
        assert max(loads) - min(loads) <= biggest  # greedy balance over the lanes
    for b in plan.batches:
        assert (np.diff(preds[b.docs]) >= 0).all()
    # A boundary not below the document count, or one after which nothing is left, starts no phase.
    small = tg.lora_ttt_plan(starts[:900], int(starts[900]), hp)
    assert small.boundaries == [666] and [len(s.global_docs) for s in small.segments] == [666, 0]


def test_chunk_steps_cover_each_prediction_once():
    hp = lora_hp()
    preds = np.array([1, 3, 16, 17, 40, 100])
    rows, length, trains = tg.lora_chunk_steps(preds, hp)
    assert len(rows) == math.ceil(100 / 16)
    assert rows.tolist() == [6, 3, 2, 2, 2, 2, 2]  # documents still running (P > 16 ci), at least 2
    assert length.tolist() == [16, 32, 48, 64, 64, 64, 64]  # windows grow to EVAL_SEQ_LEN = 64
    assert trains.tolist() == [True] * 6 + [False]
    # A batch whose longest document ends mid-chunk: its last window is padded to a multiple of 8 (GPU kernels
    # specialize on that alignment); a long EVAL_SEQ_LEN caps it, whatever it is.
    assert tg.lora_chunk_steps(np.array([5, 21]), hp)[1].tolist() == [16, 24]
    assert tg.lora_chunk_steps(np.array([5]), hp)[1].tolist() == [8]
    assert tg.lora_chunk_steps(np.array([70, 70]), lora_hp(eval_seq_len=68))[1].tolist() == [16, 32, 48, 64, 68]


def test_coverage_is_exact(stream, baseline):
    tokens, tables = stream
    result, log = baseline
    n, nbytes = len(tokens) - 1, stream_bytes(tokens, tables)
    assert (result.tokens, result.expected_tokens, result.bytes, result.expected_bytes) == (n, n, nbytes, nbytes)
    assert result.exactly_once and result.covered and bool((result.target_losses > 0).all())
    assert math.isclose(result.val_bpb, float(result.target_losses.sum()) / (math.log(2) * nbytes), rel_tol=1e-12)
    text = "\n".join(log)
    assert re.search(r"^ttt_phased: total_docs:15 prefix_docs:8 suffix_docs:7 num_phases:2 boundaries:\[4, 8\]",
                     text, re.M)
    assert len(re.findall(r"^ttpp: phase:\d/2 pd:\d+ gd:\d+ t:", text, re.M)) == 2
    assert len(re.findall(r"^tttg: chunks:[1-9]\d* lr:0.01 t:", text, re.M)) == 2
    assert len(re.findall(r"^ttp: b\d+/4 bl:\d+\.\d{4} bb:\d+\.\d{4} rl:\d+\.\d{4} rb:\d+\.\d{4} dl:\d+-\d+ gd:[01] t:",
                          text, re.M)) == 4
    assert re.search(r"^x val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8} eval_time:\d+ms$", text, re.M)


def test_random_stream_without_leading_bos_is_covered(stream):
    """BOS anywhere (and not first), leading-space pieces after BOS: still every target exactly once."""
    hp = lora_hp(phased_ttt_num_phases=0)
    _, tables = stream
    tokens = torch.randint(2, hp.vocab_size, (700,), generator=torch.Generator().manual_seed(1))
    tokens[torch.randint(1, 700, (12,), generator=torch.Generator().manual_seed(2))] = tg.BOS_ID
    tokens[-1] = tg.BOS_ID
    result = tg.eval_val_lora_ttt(make_model(hp), tokens, tables, hp, make_ctx(), label=None)
    assert result.covered and result.tokens == 699 and result.bytes == stream_bytes(tokens, tables)


def test_zero_lr_equals_per_document_scoring(stream, baseline):
    hp = lora_hp(ttt_lora_lr=0.0, global_ttt_lr=0.0)
    tokens, tables = stream
    model = make_model(hp)
    before = copy.deepcopy(model.state_dict())
    frozen = lora_losses(model, tokens, tables, hp)
    torch.testing.assert_close(frozen, per_document_reference(model, tokens, hp), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # handed back as it came
    # With learning rates the same pass trains. A document's first chunk is scored before anything of it is
    # trained on, and adapters start with B = 0, so in the first segment (no phase yet) it is as at lr 0.
    trained = baseline[0].target_losses
    plan = plan_of(tokens, hp)
    for d in docs_of(plan, 0):
        first = slice(int(plan.starts[d]), int(plan.starts[d]) + hp.ttt_chunk_size)
        torch.testing.assert_close(trained[first], frozen[first], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trained, frozen)
    for d in docs_of(plan, len(plan.segments) - 1):  # the phases changed the base model
        assert not torch.allclose(trained[doc_targets(plan, d)], frozen[doc_targets(plan, d)])


def test_later_tokens_never_change_earlier_scores(stream, baseline):
    """A document of the last segment, changed from inside its third chunk on (after two adapter steps): its earlier
    scores stay bit for bit, and so do all other documents' (none is downstream of it)."""
    hp = lora_hp()
    tokens, tables = stream
    plan = plan_of(tokens, hp)
    doc = longest_in(plan, len(plan.segments) - 1)
    assert plan.preds[doc] > 2 * hp.ttt_chunk_size + 8 and not downstream(plan, doc)
    same_prefix, moved, own_moved = check_perturbation(tokens, tables, hp, doc, 2 * hp.ttt_chunk_size + 5,
                                                       unchanged=baseline[0].target_losses)
    assert same_prefix and own_moved and moved == {doc}


def test_other_documents_reach_a_document_only_after_being_scored(stream, baseline):
    """A document of the first segment, changed entirely: no document scored before the next phase changes; the
    phase, which trains on it, carries it into later segments."""
    hp = lora_hp()
    tokens, tables = stream
    plan = plan_of(tokens, hp)
    doc = int(plan.segments[0].global_docs[0])
    _, moved, own_moved = check_perturbation(tokens, tables, hp, doc, 1, unchanged=baseline[0].target_losses)
    assert own_moved and moved - {doc} <= downstream(plan, doc)
    assert moved & set(docs_of(plan, 1))  # positive control: the phase did train on it


def test_warm_started_a_carries_only_scored_documents(stream, one_lane):
    """One lane, no phases: a document of the first batch changed from its third chunk on. The other documents of
    its batch stay bit for bit; later batches, whose adapters start from the A it trained, change."""
    hp = lora_hp(phased_ttt_num_phases=0)
    tokens, tables = stream
    plan = plan_of(tokens, hp)
    (lane,) = plan.segments[0].lanes
    doc = int(lane[0].docs[-1])
    same_prefix, moved, own_moved = check_perturbation(tokens, tables, hp, doc, 2 * hp.ttt_chunk_size + 5)
    assert same_prefix and own_moved
    assert moved - {doc} <= downstream(plan, doc) and moved & downstream(plan, doc)


def test_documents_are_independent_without_phases_or_warm_start(stream, one_lane):
    hp = lora_hp(phased_ttt_num_phases=0, ttt_warm_start_a=0)
    tokens, tables = stream
    plan = plan_of(tokens, hp)
    doc = int(plan.segments[0].lanes[0][0].docs[-1])
    same_prefix, moved, _ = check_perturbation(tokens, tables, hp, doc, 2 * hp.ttt_chunk_size + 5)
    assert same_prefix and moved == {doc}


def test_negative_control_update_then_score_is_caught(stream, monkeypatch):
    """A deliberately illegal variant: each chunk trains on itself before it is scored."""
    hp = lora_hp()
    tokens, tables = stream
    legal_step = tg._lora_step

    def update_then_score(model, lora, optimizer, tokens, *args):
        *rest, tables_, sums, hp_, ctx = args
        scratch = tg._ScoreSums(len(tokens) - 1, tokens.device, keep_losses=False)
        legal_step(model, lora, optimizer, tokens, *rest, tables_, scratch, hp_, ctx)  # trains when it may
        legal_step(model, lora, optimizer, tokens, *rest[:-1], False, tables_, sums, hp_, ctx)  # scores afterwards

    monkeypatch.setattr(tg, "_lora_step", update_then_score)
    plan = plan_of(tokens, hp)
    doc = longest_in(plan, len(plan.segments) - 1)
    same_prefix, _, _ = check_perturbation(tokens, tables, hp, doc, 2 * hp.ttt_chunk_size + 5)
    assert not same_prefix


def test_config_errors():
    for bad in (dict(ttt_mode="lora"), dict(ttt_batch_size=1), dict(ttt_chunk_size=0), dict(ttt_lora_rank=0),
                dict(phased_ttt_num_phases=-1)):
        with pytest.raises(SystemExit, match="config error"):
            tg.validate_hyperparameters(lora_hp(**bad), 1)
    tg.validate_hyperparameters(lora_hp(), 1)


def test_artifact_evaluation_runs_lora_phased_with_its_lines(stream, monkeypatch):
    """evaluate_artifact (section 8) with TTT_MODE=lora_phased: the warm-up times the adapter step, the projection
    covers this run and the full validation set on 8 GPUs, the phased score is reported last."""
    hp = lora_hp(eval_budget_seconds=0.001, sliding_window_enabled=0)
    tokens, tables = stream
    monkeypatch.setattr(tg, "load_quantized_model", lambda hp, ctx, path: make_model(hp))
    ctx = make_ctx()
    summary = {"evals": {}}
    tg.evaluate_artifact(hp, ctx, "unused.ptz", tokens, tables, summary)
    text = "\n".join(ctx.log)
    assert re.search(r"^eval_warmup: .*random tokens.* lora_step:[\d.]+ms@4x16 [\d.]+ms@4x64$", text, re.M)
    assert re.search(r"^eval_projection: sliding ~0s ttt ~\d+s total ~\d+s budget 0s$", text, re.M)
    full = re.search(r"^eval_projection_full_scale: targets:(\d+) gpus:8 counted ~\d+s sliding ~0s "
                     r"ttt\(lora_phased\) ~(\d+)s total ~\d+s budget 0s$", text, re.M)
    assert full and abs(int(full[1]) - tg.FULL_VAL_TARGETS) < len(tokens) and int(full[2]) > 0
    assert re.search(r"^WARNING eval_projection_full_scale: .*TTT_CHUNK_SIZE.*PHASED_TTT_NUM_PHASES.*TTT_ENABLED=0",
                     text, re.M)
    assert re.search(r"^quantized_ttt_phased val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8} eval_time:\d+ms$", text, re.M)
    assert re.search(r"^eval_summary: quantized:[\d.]+s quantized_ttt_phased:[\d.]+s total_eval_time:", text, re.M)
    assert summary["final_label"] == "quantized_ttt_phased" and summary["ttt"]["mode"] == "lora_phased"
    assert summary["evals"]["quantized_ttt_phased"]["covered"] and "ERROR" not in text


def test_a_failing_ttt_keeps_the_earlier_scores_in_summary_json(stream, monkeypatch, tmp_path):
    hp = lora_hp(eval_budget_seconds=0.001, artifact_dir=str(tmp_path))
    tokens, tables = stream
    monkeypatch.setattr(tg, "load_quantized_model", lambda hp, ctx, path: make_model(hp))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tg, "eval_val_lora_ttt", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        tg.evaluate_artifact(hp, make_ctx(), "unused.ptz", tokens, tables, {"evals": {}})
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written["evals"]) == {"quantized", "quantized_sliding_window"}
    assert all(e["covered"] for e in written["evals"].values()) and "val_bpb" not in written  # no final score


# Graphs with dynamic shapes, per-block whatever COMPILE_SCOPE says: the first block (its input needs no grad), the
# second (sequential; its input carries the adapters' grad), a sequential and a parallel block after a skip mix, and
# the last block (parallel, no skip).
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_adapter_step_compiles_once_in_warmup(stream, monkeypatch, forbid_recompiles, scope, graphs=5):
    """The warm-up's graphs serve every row count and window length of the run, on a fresh model copy; compiled
    equals eager. (The phases' SGD graph is the score-first TTT step's: tests/test_eval_compile.py.)"""
    hp = lora_hp(compile=1, compile_scope=scope, phased_ttt_num_phases=0)
    tokens, tables = stream
    counter = CompileCounter()
    monkeypatch.setattr(tg, "EVAL_COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    model = make_model(hp)
    short, long = tg._lora_warmup(model, hp, make_ctx(), torch.Generator().manual_seed(0))
    assert counter.frame_count == graphs and 0 < short and 0 < long
    assert all(p.requires_grad for p in model.parameters())
    forbid_recompiles()
    ctx = make_ctx()
    compiled = tg.eval_val_lora_ttt(make_model(hp), tokens, tables, hp, ctx, return_losses=True).target_losses
    assert counter.frame_count == graphs and "WARNING" not in "\n".join(ctx.log)
    eager = lora_losses(make_model(hp), tokens, tables, dataclasses.replace(hp, compile=0))
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


def _worker(rank: int, world_size: int, data, out_dir: str) -> None:
    with gloo_group(rank, world_size, out_dir):
        hp = lora_hp()
        tokens, tables = smoke_stream(data, hp, N_TARGETS)
        model = make_model(hp)
        model.load_state_dict(torch.load(os.path.join(out_dir, "model.pt")))
        result = tg.eval_val_lora_ttt(model, tokens, tables, hp, make_ctx(rank, world_size), return_losses=True)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))


def test_two_ranks_match_one_process(smoke_data, baseline, tmp_path):
    """Lanes 0, 2, 4, 6 on rank 0 and 1, 3, 5, 7 on rank 1; the phases' gradients summed across ranks."""
    torch.save(make_model(lora_hp()).state_dict(), tmp_path / "model.pt")
    mp.spawn(_worker, args=(2, smoke_data, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "result.pt", weights_only=False)
    one = baseline[0]
    assert two.covered and one.covered and (two.tokens, two.bytes) == (one.tokens, one.bytes)
    torch.testing.assert_close(two.target_losses, one.target_losses, rtol=1e-5, atol=1e-5)
    assert math.isclose(two.val_bpb, one.val_bpb, rel_tol=1e-6)

