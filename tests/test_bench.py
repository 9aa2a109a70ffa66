"""bench/suite.py: FLOP counting by hand, and the parser against a real SMOKE run of train_gpt.py (catches log drift)."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import suite  # noqa: E402

# Fields a CPU run cannot have; every other field the suite reports must be found in a SMOKE run's files.
GPU_ONLY = {"training.peak_mem_allocated_mib", "training.peak_mem_reserved_mib", "training.mfu_before_loop",
            "training.mfu_after_loop"}


def tiny_hp(**kw):
    return dataclasses.replace(tg.Hyperparameters(), vocab_size=16, num_layers=3, model_dim=8, num_heads=2,
                               num_kv_heads=1, mlp_mult=2.0, rope_dims=2, train_seq_len=4, num_loops=2, loop_start=1,
                               loop_end=1, xsa_last_n=0, parallel_residual_start=-1, **kw)


def test_flops_per_token_by_hand():
    # d=8, 2 heads of 4, 1 KV head (kv dim 4), MLP hidden 16, V=16, T=4.
    # Per layer pass: q 8*8 + k,v 2*8*4 + proj 8*8 + mlp 2*8*16 = 64 + 64 + 64 + 256 = 448 weights.
    # Attention: 3 (fwd + bwd) * 2 matmuls * 2 FLOPs * d * mean context (T + 1)/2 = 3*2*2*8*2.5 = 240 per pass.
    # Head: 6 * 8 * 16 = 768.
    hp = tiny_hp()
    plain = suite.training_flops_per_token(hp, looping=False)  # 3 passes
    assert plain == {"layers": 6 * 3 * 448, "attention": 3 * 240, "head": 768, "total": 8064 + 720 + 768,
                     "layer_passes": 3}
    looped = suite.training_flops_per_token(hp, looping=True)  # layer 1 runs 3 times: 5 passes
    assert looped["layer_passes"] == 5 and looped["total"] == 6 * 5 * 448 + 5 * 240 + 768
    assert suite.training_flops_per_token(dataclasses.replace(hp, num_loops=0), looping=True) == plain


def test_counted_matmul_weights_are_the_models():
    for hp in (tiny_hp(), tg.Hyperparameters()):
        with torch.device("meta"):
            model = tg.GPT(hp)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear))
        flops = suite.training_flops_per_token(hp, looping=False)
        assert flops["layers"] == 6 * linear
        assert flops["head"] == 6 * model.tok_emb.weight.numel()


def test_default_config_flops_and_mfu():
    hp = tg.Hyperparameters()
    before, after = (suite.training_flops_per_token(hp, lp) for lp in (False, True))
    assert (before["layer_passes"], after["layer_passes"]) == (11, 17)  # layers 3-5 three times
    # 6 * (11 * 2,883,584 + 512 * 8192) + 11 * 6 * 512 * 2049
    assert before["total"] == 6 * (11 * 2_883_584 + 4_194_304) + 11 * 6 * 512 * 2049
    m = suite.mfu(hp, False, 1.0e6, "NVIDIA H100 80GB HBM3", "x")
    assert m["mfu_x"] == pytest.approx(1.0e6 * before["total"] / 989.4e12)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5), ("cpu", None)])
def test_peak_table(name, peak):
    assert suite.peak_tflops(name) == peak


def test_phase_throughput_skips_transients_and_splits_phases():
    recs = [dict(step=s, train_time_ms=100.0 * s + (50 if s > 1 else 0), looping=False) for s in (1, 2, 3, 4, 5, 10)]
    recs += [dict(step=s, train_time_ms=1050 + 200.0 * (s - 10), looping=True) for s in (20, 30, 40, 50)]
    before = suite.phase_throughput(recs, False, 1000, world=2)
    assert before["ms_per_step"] == pytest.approx(100.0)  # steps 3 -> 10; steps 1, 2 skipped
    assert before["tok_s_per_gpu"] == pytest.approx(1000 / 0.1 / 2)
    assert suite.phase_throughput(recs, True, 1000, world=2)["ms_per_step"] == pytest.approx(200.0)  # 40 -> 50
    assert suite.phase_throughput(recs[:3], False, 1000, 1) == {"tok_s_per_gpu": None, "ms_per_step": None}


def test_steps_are_the_last_step_run_not_the_last_logged_one():
    log = "310/20000 train_loss: 2.0588\nstopping_early: wallclock_cap train_time: 287479ms step: 317/20000\n" \
          "317/20000 val_loss: 4.3238 val_bpb: 1.6922\n"
    train = [dict(step=300, train_loss=2.1), dict(step=310, train_loss=2.0588)]  # TRAIN_LOG_EVERY=10
    assert suite.parse_training(log, train, None, 1, None)["steps"] == 317
    assert suite.parse_training(log.split("stopping")[0], train, None, 1, None)["steps"] == 310  # cut off before
    assert suite.parse_training("", [], None, 1, None)["steps"] is None


def run_suite(tmp_path, smoke_data, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT")}
    cmd = [sys.executable, str(ROOT / "bench" / "suite.py"), "--out", str(tmp_path), "--name", "smoke", *args,
           "SMOKE=1", f"DATA_PATH={smoke_data[0]}", f"TOKENIZER_PATH={smoke_data[1]}", "CUDA_VISIBLE_DEVICES=",
           "ITERATIONS=8", "ENABLE_LOOPING_AT=0.5", "TRAIN_LOG_EVERY=1", "EVAL_STRIDE=64",
           f"ARTIFACT_DIR={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)  # ~30 s on an idle 2-core machine
    except subprocess.TimeoutExpired:
        proc.terminate()  # the suite stops its train_gpt.py run on SIGTERM
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke_data):
    """The suite around a real SMOKE run: 8 steps, looping from step 4, no wallclock cap (deterministic steps)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_suite(out, smoke_data, "--budget", "0", "--deadline", "3000")  # no deadline on a loaded machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "smoke.json").read_text())


def test_suite_finds_every_field_in_a_smoke_run(smoke_run):
    out, stdout, result = smoke_run
    missing = sorted(k for k, v in suite.flatten(result).items() if v is None and k not in GPU_ONLY)
    assert not missing, f"not found in the SMOKE run's log (format drift?): {missing}"
    summary = json.loads((out / "smoke" / "summary.json").read_text())
    assert result["run"]["finished"] and result["run"]["gpu"] == "cpu" and result["run"]["world_size"] == 1
    t = result["training"]
    assert (t["steps"], t["loop_enabled_step"]) == (8, 4)
    assert t["tok_s_per_gpu_before_loop"] > 0 and t["ms_per_step_after_loop"] > 0
    assert set(summary["evals"]) == {result["eval"][key]["label"] for key in suite.EVAL_LABELS}
    for key in suite.EVAL_LABELS:
        label = result["eval"][key]["label"]
        assert result["quality"][f"val_bpb_{key}"] == pytest.approx(summary["evals"][label]["val_bpb"], abs=1e-7)
        assert result["eval"][key]["targets"] == 13824
    assert result["quality"]["total_bytes"] == summary["total_bytes"]
    p = result["post_training"]
    assert p["total_s"] == pytest.approx(summary["post_training_s"], abs=0.06)
    parts = p["final_val_ema_s"] + p["serialize_pre_quant_eval_s"] + p["hessians_s"] + p["quantize_compress_s"]
    assert parts <= p["total_s"] + 0.25 and parts >= 0.8 * p["total_s"] - 0.25
    assert result["cold_start"]["launch_to_first_step_s"] >= result["cold_start"]["train_gpt_clock_s"]
    for name in ("train.log", "metrics.jsonl", "summary.json", "console.log"):
        assert (out / "smoke" / name).stat().st_size > 0
    assert "tok/s per GPU" in stdout and "stop -> artifact" in stdout


def test_parse_only_matches_and_survives_a_truncated_log(smoke_run, tmp_path):
    out, _, result = smoke_run
    parsed = suite.parse_run(out / "smoke")
    assert parsed["eval"] == result["eval"] and parsed["training"] == result["training"]
    log = (out / "smoke" / "train.log").read_text()
    (tmp_path / "train.log").write_text(log[:log.index("training_start:")])  # killed during the compile warm-up
    partial = suite.parse_run(tmp_path)
    assert partial["cold_start"]["compile_warmup_s"] is not None
    assert partial["training"]["steps"] is None and partial["eval"]["ttt"] is None
    assert suite.parse_run(tmp_path / "nothing")["run"]["gpu"] is None


def test_compare_prints_deltas(smoke_run, tmp_path, capsys):
    out, _, result = smoke_run
    b = json.loads(json.dumps(result))
    b["training"]["steps"] = 10
    (tmp_path / "b.json").write_text(json.dumps(b))
    suite.main(["--compare", str(out / "smoke.json"), str(tmp_path / "b.json")])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("training.steps "))
    assert line.split()[1:] == ["8", "10", "2", "+25.0%"]


def test_deadline_stops_the_run_and_still_writes_results(tmp_path, smoke_data):
    proc = run_suite(tmp_path, smoke_data, "--deadline", "3")
    assert proc.returncode == 1, proc.stderr[-3000:]  # results written, and the failure reported
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["run"]["finished"] is False and result["run"]["returncode"] != 0
    assert result["run"]["wall_s"] < 30


def test_every_kernel_cache_is_fresh_unless_an_argument_names_one(tmp_path):
    args = argparse.Namespace(budget=60.0, name="x", env=[])
    env = suite.run_env(args, tmp_path / "run", str(tmp_path / "cache"))
    caches = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    assert all(env[k].startswith(str(tmp_path / "cache")) for k in caches) and len({env[k] for k in caches}) == 3
    args.env = ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/kept"]
    assert suite.run_env(args, tmp_path / "run", str(tmp_path / "cache"))["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == "/kept"


def test_graphs_compiled_on_the_eval_clock_are_counted():
    warning = "WARNING ttt_phased: 3 graph(s) compiled on the eval clock; eval_warmup should have compiled them all"
    clean = "quantized val_loss:1.0 val_bpb:1.0 eval_time:5ms\n"
    assert suite.parse_evaluation(clean)["graphs_compiled_on_eval_clock"] == 0
    assert suite.parse_evaluation(clean + warning + "\n")["graphs_compiled_on_eval_clock"] == 3


def test_block_bench_variants_compute_what_train_gpt_computes():
    """bench/block.py times alternative forwards against train_gpt.py's; they must stay the same math (CPU)."""
    import block

    hp = tg.load_hyperparameters({"SMOKE": "1"})
    tg.configure_attention("sdpa_math")
    torch.manual_seed(0)
    model = tg.build_model(hp, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.size(1) ** -0.5)
    attn, u = model.blocks[0].attn, torch.randn(2, 16, hp.model_dim)
    original = tg.Attention.forward
    reference = original(attn, u)
    try:
        for name in ("rewritten", "kv_expand", "bhtd"):
            block.VARIANTS[name](model)
            torch.testing.assert_close(tg.Attention.forward(attn, u), reference, rtol=1e-5, atol=1e-5)
    finally:
        tg.Attention.forward = original
    q = torch.randn(2, 16, hp.num_heads, hp.model_dim // hp.num_heads)
    torch.testing.assert_close(block.rotary_swapped(attn.rotary, q), attn.rotary(q))
