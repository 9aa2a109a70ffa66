"""Training loop: loop activation, wallclock stop, configuration errors, dry run and the CPU smoke run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import ROOT
from eval_helpers import gloo_group


def make_trainer(smoke_data, tmp_path, rank=0, world_size=1, **env):
    environ = {"SMOKE": "1", "DATA_PATH": smoke_data[0], "TOKENIZER_PATH": smoke_data[1], **env}
    hp = tg.load_hyperparameters(environ)
    ctx = tg.RunContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"),
                        log_path=str(tmp_path / "train.log"), metrics_path=str(tmp_path / "metrics.jsonl"))
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    model = tg.build_model(hp, ctx.device)
    files = tg.find_shards(os.path.join(hp.data_path, "fineweb_train_*.bin"), "training", hp.vocab_size)
    return hp, ctx, tg.Trainer(hp, ctx, model, files)


def test_looping_switches_on_at_the_configured_fraction(smoke_data, tmp_path):
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, MAX_WALLCLOCK_SECONDS="0", ITERATIONS="8",
                                    ENABLE_LOOPING_AT="0.5", WARMUP_STEPS="0")
    seen = []
    stats = tg.train(hp, ctx, trainer, 0.0, lambda step, ms: seen.append((step, trainer.model.looping)))
    assert stats["steps"] == 8 and stats["looping_enabled_step"] == 4
    log = (tmp_path / "train.log").read_text()
    assert "layer_loop:enabled step:4 frac:0.500 encoder:[0, 1, 2, 3, 2] decoder:[3, 2, 3, 4, 5]" in log
    assert seen == [(8, True)]  # the final validation runs with looping on


def test_wallclock_stop_never_exceeds_the_budget(smoke_data, tmp_path):
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, WARMUP_STEPS="0")
    stats = tg.train(hp, ctx, trainer, 4000.0, lambda step, ms: None)
    assert 0 < stats["train_ms"] <= 4000.0
    assert "stopping_early: wallclock_cap" in (tmp_path / "train.log").read_text()
    losses = [json.loads(l)["train_loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_compile_warmup_restores_the_initial_state(smoke_data, tmp_path):
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, WARMUP_STEPS="2")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    first_batch = trainer.loader.next_batch(2)[0]
    trainer.new_loader()
    trainer.compile_warmup()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values()) for opt in trainer.optimizers)
    assert torch.equal(trainer.loader.next_batch(2)[0], first_batch)  # data restarts from the beginning
    assert not trainer.model.looping


def test_training_after_the_warmup_is_training_without_it(smoke_data, tmp_path):
    """Steps after the warm-up give bit for bit the losses and weights of steps without one: it leaves no trace in the
    model, the optimizers (momentum, Adam moments and step counts) or the data order."""
    runs = []
    for warmup in ("2", "0"):
        (tmp_path / warmup).mkdir()
        hp, ctx, trainer = make_trainer(smoke_data, tmp_path / warmup, WARMUP_STEPS=warmup)
        trainer.compile_warmup()
        losses = [trainer.step(i, 1.0).item() for i in range(3)]
        runs.append((losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (warm_losses, warm_state), (cold_losses, cold_state) = runs
    assert warm_losses == cold_losses
    assert all(torch.equal(warm_state[k], cold_state[k]) for k in cold_state)


def test_compile_warmup_runs_one_micro_batch_per_step(smoke_data, tmp_path):
    """The warm-up compiles on one micro-batch per step (same graphs, an eighth of the GPU time); training steps run
    grad_accum of them."""
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, WARMUP_STEPS="2")
    calls, model = [], trainer.train_model
    trainer.train_model = lambda x, y, *args: (calls.append(trainer.model.looping), model(x, y, *args))[1]
    trainer.compile_warmup()
    assert trainer.grad_accum == 8 and calls == [False, False, True, True]  # two steps per phase (eager: no graphs)
    calls.clear()
    trainer.step(0, 1.0)
    assert len(calls) == trainer.grad_accum


def test_steps_read_the_micro_batches_in_loader_order(smoke_data, tmp_path):
    """Trainer.step draws the next step's first micro-batch ahead; the order must stay the loader's."""
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, WARMUP_STEPS="0")
    seen, model = [], trainer.train_model
    trainer.train_model = lambda x, y, *args: (seen.append(x.clone()), model(x, y, *args))[1]
    for step in range(3):
        trainer.step(step, 1.0)
    fresh = tg.ShuffledSequenceLoader(trainer.train_files, hp.train_seq_len, hp.seed, 0, 1, torch.device("cpu"))
    assert len(seen) == 3 * trainer.grad_accum
    assert all(torch.equal(x, fresh.next_batch(trainer.micro_seqs)[0]) for x in seen)


def test_a_shard_of_exactly_one_window_is_used(tmp_path):
    """A shard of TRAIN_SEQ_LEN + 1 tokens holds one window (x = its first T tokens, y = its last T); one token fewer
    holds none."""
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(9, dtype=np.uint16))
    x, y = tg.ShuffledSequenceLoader([str(tmp_path / "fineweb_train_000000.bin")], 8, 0, 0, 1,
                                     torch.device("cpu")).next_batch(2)
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2  # the epoch restarts
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(8, dtype=np.uint16))
    with pytest.raises(SystemExit, match="hold no window"):
        tg.ShuffledSequenceLoader([str(tmp_path / "fineweb_train_000000.bin")], 8, 0, 0, 1, torch.device("cpu"))


def test_data_order_depends_on_seed_and_rank(smoke_data):
    files = tg.find_shards(os.path.join(smoke_data[0], "fineweb_train_*.bin"), "training", 512)
    first = lambda seed, rank: tg.ShuffledSequenceLoader(files, 64, seed, rank, 2, torch.device("cpu")).next_batch(4)[0]
    assert torch.equal(first(1, 0), first(1, 0))
    assert not torch.equal(first(1, 0), first(2, 0))
    assert not torch.equal(first(1, 0), first(1, 1))


def run_script(env, timeout=240, cwd=ROOT):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(env)
    return subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_prints_config_and_parameter_count():
    r = run_script({"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "Hyperparameters:" in r.stdout and "  qk_gain_init: 5.25" in r.stdout
    assert "model_params:35945592" in r.stdout


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "3"}, "must divide 8"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR='fast' is not a valid float"),
    ({"LOOP_END": "20"}, "LOOP_END"),
    ({"COMPRESSOR": "zip"}, "COMPRESSOR"),
    ({"COMPILE_SCOPE": "layers"}, "COMPILE_SCOPE='layers': use blocks or model"),
    ({"NUM_KV_HEADS": "0"}, "NUM_KV_HEADS=0 must be at least 1"),
    ({"TRAIN_BATCH_TOKENS": "0"}, "TRAIN_BATCH_TOKENS=0 must be at least 1"),
    ({"SEED": "1.9"}, "SEED='1.9' is not a valid int"),
    ({"EVAL_SEQ_LEN": "4096"}, "EVAL_SEQ_LEN=4096 must be at most TRAIN_SEQ_LEN=2048"),
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_RESERVE_SECONDS=600.0 leaves no training time"),
])
def test_invalid_configuration_fails_with_what_to_set(env, message):
    r = run_script({"DRY_RUN": "1", **env})
    assert r.returncode != 0 and message in r.stderr


def test_integers_may_be_written_as_floats():
    hp = tg.load_hyperparameters({"ITERATIONS": "1e3", "SEED": "42.0", "TRAIN_SEQ_LEN": "2048"})
    assert (hp.iterations, hp.seed, hp.train_seq_len) == (1000, 42, 2048)


def test_measured_gptq_reserve_over_the_budget_stops_before_training(smoke_data, tmp_path):
    """The measured reserve (at least 1 s) exceeds a 0.5 s budget: a config error, not a run without a time cap."""
    r = run_script({"SMOKE": "1", "DATA_PATH": smoke_data[0], "TOKENIZER_PATH": smoke_data[1],
                    "GPTQ_RESERVE_SECONDS": "-1", "MAX_WALLCLOCK_SECONDS": "0.5", "ARTIFACT_DIR": str(tmp_path)})
    assert r.returncode != 0 and "leaves no training time in MAX_WALLCLOCK_SECONDS=0.5" in r.stderr
    assert "train_loss" not in (tmp_path / "train.log").read_text()


def test_missing_data_and_tokenizer_mismatch_fail_before_training(smoke_data, tmp_path):
    r = run_script({"DATA_PATH": str(tmp_path / "nowhere"), "TOKENIZER_PATH": smoke_data[1], "VOCAB_SIZE": "512"})
    assert r.returncode != 0 and "no training shards match" in r.stderr and "cached_challenge_fineweb.py" in r.stderr
    r = run_script({"SMOKE": "1", "DATA_PATH": smoke_data[0], "TOKENIZER_PATH": smoke_data[1], "VOCAB_SIZE": "1024"})
    assert r.returncode != 0 and "has 512 pieces but VOCAB_SIZE=1024" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fineweb_train_000000.bin").write_bytes(b"\0" * 2048)
    r = run_script({"SMOKE": "1", "DATA_PATH": str(bad), "TOKENIZER_PATH": smoke_data[1]})
    assert r.returncode != 0 and "fineweb_train_000000.bin: bad magic" in r.stderr


def test_missing_shards_message_names_the_vocabulary_variant(tmp_path):
    r = run_script({"DATA_PATH": str(tmp_path), "VOCAB_SIZE": "1024", "TOKENIZER_PATH": str(tmp_path / "none")})
    assert r.returncode != 0 and "cached_challenge_fineweb.py --variant sp1024" in r.stderr


def test_tokenizer_without_the_challenge_bos_fails_for_lora_ttt(smoke_data, tmp_path):
    """LoRA TTT finds documents by BOS id 1; a tokenizer with another BOS id (here 2) is refused before training."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    docs = [" ".join(rng.choice(words, 200)) for _ in range(200)]
    tokenizer = tg.train_sentencepiece(docs, str(tmp_path / "other_bos"), 512, bos_id=2, eos_id=1)
    env = {"SMOKE": "1", "DATA_PATH": smoke_data[0], "TOKENIZER_PATH": tokenizer, "ARTIFACT_DIR": str(tmp_path)}
    r = run_script({**env, "TTT_MODE": "lora_phased"})
    assert r.returncode != 0 and "has bos_id 2, but TTT_MODE=lora_phased find documents by BOS id 1" in r.stderr
    r = run_script({**env, "TTT_MODE": "score_first", "DRY_RUN": "1"})  # score-first TTT does not need it
    assert r.returncode == 0, r.stderr[-2000:]


def test_cpu_smoke_run_end_to_end(tmp_path):
    r = run_script({"SMOKE": "1", "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "smoke"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    for line in ("model_params:", "warmup_step: 2/2", "loop_warmup_step: 2/2", "layer_loop:enabled",
                 "stopping_early: wallclock_cap", "ema:applying EMA weights"):
        assert line in log
    # The cold start by stage adds up to the training_start figure (each to the 0.1 s of the log).
    stages = re.search(r"^startup: (.*) total:([\d.]+)s$", log, re.M)
    seconds = dict((k, float(v)) for k, v in re.findall(r"(\w+):([\d.]+)s", stages[1]))
    assert list(seconds) == ["imports", "data", "distributed", "attention_probe", "model", "compile_warmup",
                             "gptq_reserve"]
    assert abs(sum(seconds.values()) - float(stages[2])) <= 0.05 * len(seconds) and seconds["imports"] > 0
    assert re.search(rf"^training_start: {stages[2]}s after launch$", log, re.M)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] >= 3
    assert (tmp_path / "final_model.pt").stat().st_size > 0
    assert summary["total_bytes"] == (tmp_path / "final_model.int6.ptz").stat().st_size + summary["code_bytes"]
    assert set(summary["evals"]) == {"pre-quantization post-ema", "quantized", "quantized_sliding_window",
                                    "quantized_ttt_phased"}  # TTT_MODE=lora_phased, the default
    assert all(e["covered"] for k, e in summary["evals"].items() if k != "pre-quantization post-ema")

    # EVAL_ONLY evaluates the saved artifact without training and reproduces the run's quantized score exactly
    again = tmp_path / "eval_only"
    r = run_script({"SMOKE": "1", "EVAL_ONLY": "1", "ARTIFACT_PATH": str(tmp_path / "final_model.int6.ptz"),
                    "ARTIFACT_DIR": str(again), "TTT_ENABLED": "0", "SLIDING_WINDOW_ENABLED": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = (again / "train.log").read_text()
    assert "EVAL_ONLY=1" in log and "train_loss" not in log
    assert json.loads((again / "summary.json").read_text())["evals"]["quantized"]["val_loss"] == \
        summary["evals"]["quantized"]["val_loss"]


def test_non_finite_loss_stops_the_run_with_the_log_kept(smoke_data, tmp_path, monkeypatch):
    hp, ctx, trainer = make_trainer(smoke_data, tmp_path, WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", ITERATIONS="10")
    real_step = trainer.step
    monkeypatch.setattr(trainer, "step", lambda step, lr: real_step(step, lr) * (float("nan") if step == 3 else 1.0))
    with pytest.raises(SystemExit) as stop:
        tg.train(hp, ctx, trainer, 0.0, lambda step, ms: None)
    assert stop.value.code == 3
    log = (tmp_path / "train.log").read_text()
    assert "error: non-finite training loss at step 4 (rank 0: nan)" in log and "1/10 train_loss" in log


def _nan_on_rank_1(rank: int, world_size: int, data, out_dir: str) -> None:
    with gloo_group(rank, world_size, out_dir):
        hp, ctx, trainer = make_trainer(data, Path(out_dir) / f"rank{rank}", rank, world_size, WARMUP_STEPS="0",
                                        MAX_WALLCLOCK_SECONDS="0", ITERATIONS="10")
        real_step = trainer.step
        trainer.step = lambda step, lr: real_step(step, lr) * (float("nan") if step == 3 and rank == 1 else 1.0)
        try:
            tg.train(hp, ctx, trainer, 0.0, lambda step, ms: None)
            code = 0
        except SystemExit as stop:
            code = stop.code
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(code))


def test_non_finite_loss_on_another_rank_stops_every_rank(smoke_data, tmp_path):
    """Rank 1 sees the NaN; rank 0 (whose loss is finite, and which writes the log) stops at the same step instead of
    waiting for rank 1 in the next step."""
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    mp.spawn(_nan_on_rank_1, args=(2, smoke_data, str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [3, 3]
    log = (tmp_path / "rank0" / "train.log").read_text()
    assert "error: non-finite training loss at step 4 (rank 0: " in log and "4/10 train_loss" not in log
