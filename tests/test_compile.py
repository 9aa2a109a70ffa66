"""Compilation: COMPILE_SCOPE=blocks compiles a handful of small graphs shared by every layer and both layer
schedules, trains like eager, and leaves the state dict alone; Muon compiles nothing.
A counting backend or aot_eager stands in for inductor, so this runs in seconds on CPU."""
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import train_gpt as tg
from test_training import make_trainer

torch.set_num_threads(1)  # 2 shared cores: a second intra-op thread makes these small ops several times slower


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_blocks_scope_compiles_few_graphs_and_none_when_looping_switches_on(smoke_data, tmp_path, monkeypatch,
                                                                            forbid_recompiles):
    counter = CompileCounter()
    monkeypatch.setattr(tg, "COMPILE_BACKEND", counter)
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, COMPILE="1", COMPILE_SCOPE="blocks", WARMUP_STEPS="2")
    kinds = {b.parallel for b in trainer.model.blocks}
    assert len(trainer.model.blocks) == 6 and kinds == {False, True}  # both block variants are present
    # Plain phase: sequential block (encoder), sequential and parallel blocks after a skip mix, head + loss. Looped
    # phase: nothing new.
    assert trainer.compile_warmup() == [4, 0]
    assert counter.frame_count == 4
    forbid_recompiles()
    trainer.model.looping = True
    trainer.step(0, 1.0)
    trainer.model.eval()  # the train/eval flag is not a guard either (validation leaves the model in eval mode)
    trainer.step(1, 1.0)
    assert counter.frame_count == 4


def test_ln_scale_is_a_buffer_outside_the_state_dict():
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    model = tg.GPT(hp)
    assert not any("ln_scale" in k for k in model.state_dict())
    assert [round(float(b.ln_scale), 6) for b in model.blocks] == [round((i + 1) ** -0.5, 6) for i in range(6)]
    with torch.device("meta"):
        assert sum(p.numel() for p in tg.GPT(tg.load_hyperparameters({})).parameters()) == 35_945_592  # with the sparse attention gate (11 x 8 x 12)


def train_losses(smoke_data, tmp_path, **env):
    tmp_path.mkdir()
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, MAX_WALLCLOCK_SECONDS="0", ITERATIONS="4",
                                    ENABLE_LOOPING_AT="0.5", WARMUP_STEPS="0", **env)
    stats = tg.train(hp, ctx, trainer, 0.0, lambda step, ms: None)
    assert stats["looping_enabled_step"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records], trainer.model.state_dict()


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_training_matches_eager(smoke_data, tmp_path, monkeypatch, scope):
    monkeypatch.setattr(tg, "COMPILE_BACKEND", "aot_eager")  # inductor's C++ compile is too slow for CI
    eager, eager_state = train_losses(smoke_data, tmp_path / "eager", COMPILE="0")
    compiled, compiled_state = train_losses(smoke_data, tmp_path / scope, COMPILE="1", COMPILE_SCOPE=scope)
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-5)
    for k, v in eager_state.items():
        assert torch.allclose(v, compiled_state[k], rtol=1e-4, atol=1e-6), k


def test_muon_compiles_nothing(monkeypatch):
    """Newton-Schulz runs eagerly (its iterations are GEMMs with cuBLAS epilogues): no graph to compile at start-up."""
    counter = CompileCounter()
    monkeypatch.setattr(tg, "COMPILE_BACKEND", counter)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(8, 16), (8, 16), (16, 8), (12, 12)]]
    muon = tg.Muon(params, lr=0.01, momentum=0.9, weight_decay=0.0, backend_steps=5, row_normalize=True,
                   polar_express=True)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    muon.step()
    assert counter.frame_count == 0
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
