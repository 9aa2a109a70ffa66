"""Compilation: COMPILE_SCOPE=blocks compiles a handful of small graphs shared by every layer and both layer
schedules, trains like eager, and leaves the state dict alone; Muon compiles nothing.
A counting backend or aot_eager stands in for inductor, so this runs in seconds on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import train_gpt as tg
from test_training import make_trainer

ROOT = Path(__file__).resolve().parents[1]
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


def test_region_graphs_are_the_graphs_the_warmup_compiles(smoke_data, tmp_path, monkeypatch):
    """The compile workers split the work by region_graphs: it must list each graph a training step compiles, once."""
    counter = CompileCounter()
    monkeypatch.setattr(tg, "COMPILE_BACKEND", counter)
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, COMPILE="1", COMPILE_SCOPE="blocks", WARMUP_STEPS="1")
    graphs = tg.region_graphs(hp)
    assert list(graphs) == [("run_block", False, True, True), ("run_block_after_skip", False, True, True),
                            ("run_block_after_skip", True, True, True), ("head_loss",)]
    assert set(graphs.values()) == {False}  # the looped schedule calls no new structure
    assert trainer.compile_warmup() == [len(graphs), 0]
    # A config whose looped schedule brings a structure of its own: it is listed with looping True
    hp = tg.load_hyperparameters({"SMOKE": "1", "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2",
                                  "PARALLEL_RESIDUAL_START": "2", "XSA_LAST_N": "4"})
    assert tg.region_graphs(hp) == {("run_block", False, True, True): False, ("run_block_after_skip", True, True, True): False,
                                    ("head_loss",): False, ("run_block", True, True, True): True,
                                    ("run_block_after_skip", False, True, True): True}


WORKER_RUN = """
import json, sys
from pathlib import Path
import torch
import train_gpt as tg
from test_training import make_trainer

hp, ctx, trainer = make_trainer((sys.argv[1], sys.argv[2]), Path(sys.argv[3]), COMPILE="1", COMPILE_SCOPE="blocks",
                                WARMUP_STEPS="1", NUM_LAYERS="2", NUM_LOOPS="0", PARALLEL_RESIDUAL_START="-1",
                                ARTIFACT_DIR=sys.argv[3])
workers = tg.start_compile_workers(hp)
tg.wait_for_compile_workers(workers, ctx)
graphs = trainer.compile_warmup()
aot = torch._dynamo.utils.counters["aot_autograd"]
print(json.dumps(dict(workers=len(workers), graphs=graphs, hits=aot["autograd_cache_hit"],
                      misses=aot["autograd_cache_miss"])))
"""


def test_compile_workers_fill_the_cache_the_warmup_reads(smoke_data, tmp_path):
    """Inductor on CPU, in a subprocess with a cache of its own: a worker per graph compiles it, then the training
    process's warm-up finds every graph in the cache (what cuts the cold start on a GPU: README, compile workers)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", WORKER_RUN, *smoke_data, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 2 layers, no parallel block: the encoder block, the decoder block after its skip mix, head + loss
    assert result == dict(workers=3, graphs=[3], hits=3, misses=0), result
    assert "compile_workers: 3/3 graphs compiled" in (tmp_path / "train.log").read_text()
