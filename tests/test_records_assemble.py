"""records/make_record.py on fixture runs: the folder, submission.json, README, plot, and compliance failures."""
import json
import math

import pytest
from records_fixtures import A1493, VAL_TOKENS, bpb_of, load_make_record, write_runs

mr = load_make_record()
SUBMISSION_FIELDS = {"author", "github_id", "name", "date", "val_bpb", "val_loss", "val_bpb_std", "val_loss_std",
                     "bytes_total", "bytes_code", "seeds", "seed_results", "hardware", "pytorch_version", "track",
                     "blurb", "technique_summary", "compliance", "artifact_bytes_mean", "artifact_bytes_max",
                     "train_time_s_mean", "eval_time_s_mean", "submittable", "significance"}
BETTER_BASELINE = [l + 0.02 for l in (A1493[s][0][3] for s in (42, 314, 999))]  # we beat it by 0.02 nats


def build(tmp_path, overrides=None, **kw):
    runs = write_runs(tmp_path / "runs", overrides=overrides or {})
    kw = {"out_root": tmp_path / "records", "date": "2026-04-09", "name": "Fixture", "author": "Ada",
          "github_id": "ada", "baseline_losses": BETTER_BASELINE, **kw}
    return mr.assemble(runs, **kw)


def test_assemble_complete_folder(tmp_path):
    res = build(tmp_path)
    folder = res["folder"]
    assert folder == tmp_path / "records" / "2026-04-09_Fixture"
    assert res["submittable"], res["failures"]
    names = {p.name for p in folder.iterdir()}
    assert names == {"README.md", "submission.json", "train_gpt.py", "requirements.txt", "loss_curves.png",
                     "train_seed42.log", "train_seed314.log", "train_seed999.log"}
    assert (folder / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sub = json.loads((folder / "submission.json").read_text())
    assert SUBMISSION_FIELDS <= set(sub)
    ttt = [A1493[s][0][3] for s in (42, 314, 999)]
    assert sub["val_loss"] == pytest.approx(sum(ttt) / 3, abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(sum(bpb_of(x) for x in ttt) / 3, abs=1e-8)
    assert sub["seeds"] == [42, 314, 999] and sub["track"] == "10min_16mb" and sub["submittable"] is True
    assert sub["bytes_code"] == len((folder / "train_gpt.py").read_bytes())
    assert sub["bytes_total"] == A1493[999][2] + sub["bytes_code"]
    assert sub["seed_results"]["314"]["steps"] == 4557
    assert set(sub["seed_results"]["42"]) >= {"val_loss", "val_bpb", "artifact_bytes", "steps", "train_time_s",
                                              "eval_time_s"}
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3"
    comp = sub["compliance"]
    for key in ("train_under_600s", "artifact_under_16mb", "eval_under_600s", "score_first_ttt", "coverage_complete",
                "three_seeds", "wrapped_script_ok", "significant_improvement"):
        assert comp[key] is True, key
    assert sub["significance"]["significant"] and sub["significance"]["mean_delta_nats"] == pytest.approx(-0.02)

    readme = (folder / "README.md").read_text()
    assert readme.startswith("# Fixture: val_bpb 1.0810")
    assert "NOT SUBMITTABLE" not in readme
    for text in ("| 42 | 4550 | 1.08734789 |", "Causal", "Normalized distribution", "Score before update",
                 "Single pass", "## Reproduction", "cached_challenge_fineweb.py --variant sp8192",
                 "SEEDS=42,314,999 NAME=Fixture ./run.sh", "QK_GAIN_INIT=5.25", "**significant**",
                 "loss_curves.png", "PyTorch 2.9.1+cu128, attention fa4.", "The runs used FlashAttention-4"):
        assert text in readme, text


def test_shipped_script_round_trips(tmp_path):
    folder = build(tmp_path)["folder"]
    tg = mr.train_gpt()
    wrapped = (folder / "train_gpt.py").read_text()
    assert wrapped.startswith(tg.WRAPPER_PREFIX)
    assert tg.unwrap_source(wrapped) == tg.minify_source((tmp_path / "runs" / "train_gpt.py").read_text())


def test_baseline_from_records_folder(tmp_path):
    """The first folder as the baseline of identical runs: no 0.005-nat improvement, so not submittable."""
    first = build(tmp_path)["folder"]
    second = mr.assemble(tmp_path / "runs", out_root=tmp_path / "records2", date="2026-04-10", baseline=str(first),
                         dry_run=False)
    sig = second["submission"]["significance"]
    assert sig["baseline"] == "Fixture" and sig["mean_delta_nats"] == pytest.approx(0.0, abs=1e-12)
    assert sig["significant"] is False and not second["submittable"]
    assert any("significant_improvement" in f for f in second["failures"])


def test_baseline_with_val_bpb_only_and_one_that_tokenizes_otherwise(tmp_path):
    """The official records' seed_results hold val_bpb only: it is converted at this run's bytes per token (same
    losses back). A baseline with another bytes-per-token ratio (another tokenizer) gets no verdict."""
    first = build(tmp_path)["folder"]
    sub = json.loads((first / "submission.json").read_text())
    official = {**sub, "seed_results": {k: {"val_bpb": v["val_bpb"]} for k, v in sub["seed_results"].items()}}
    (tmp_path / "official.json").write_text(json.dumps(official))
    sig = mr.assemble(tmp_path / "runs", out_root=tmp_path / "r2", baseline=str(tmp_path / "official.json"),
                      dry_run=False)["submission"]["significance"]
    assert sig["mean_delta_nats"] == pytest.approx(0.0, abs=1e-6) and "same tokenizer assumed" in sig["note"]
    other = {**sub, "seed_results": {k: {**v, "val_bpb": v["val_bpb"] * 1.3} for k, v in sub["seed_results"].items()}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    res = mr.assemble(tmp_path / "runs", out_root=tmp_path / "r3", baseline=str(tmp_path / "other.json"),
                      dry_run=False)
    assert res["submission"]["significance"]["significant"] is None
    assert "tokenizes otherwise" in res["submission"]["significance"]["reason"]
    assert "tokenizes otherwise" in (res["folder"] / "README.md").read_text()


def set_eval_field(field, value):
    def mutate(seed_dir):
        summary = json.loads((seed_dir / "summary.json").read_text())
        for ev in summary["evals"].values():
            ev[field] = value
        (seed_dir / "summary.json").write_text(json.dumps(summary))
    return mutate


@pytest.mark.parametrize("overrides, check", [
    ({42: {"artifact_bytes": 15_999_000}}, "artifact_under_16mb"),
    ({314: {"train_time_s": 601.0}}, "train_under_600s"),
    ({999: {"eval_times": (10.0, 30.0, 150.0, 420.0)}}, "eval_under_600s"),
    ({42: {"val_tokens": VAL_TOKENS - 2048}}, "coverage_complete"),
    ({42: {"ttt": {"mode": "pre_quant_multi_epoch", "score_before_update": False}}}, "score_first_ttt"),
    ({314: {"ttt": {"mode": "score_first", "score_before_update": False}}}, "score_first_ttt"),
    ({999: {"gpu": "NVIDIA A100-SXM4-80GB"}}, "hardware_8xh100"),
    ({42: {"gpu": "NVIDIA H100 PCIe"}}, "hardware_8xh100"),
    ({314: {"data": {"train_shards": 10, "train": "0123456789abcdef", "val": "fedcba9876543210"}}},
     "same_data_all_seeds"),
])
def test_compliance_failures_are_detected(tmp_path, overrides, check):
    res = build(tmp_path, overrides, dry_run=False)
    assert not res["submittable"]
    assert any(check in f for f in res["failures"]), res["failures"]
    sub = json.loads((res["folder"] / "submission.json").read_text())
    assert sub["submittable"] is False and any(check in f for f in sub["compliance"]["failed_checks"])
    assert "> **NOT SUBMITTABLE**" in (res["folder"] / "README.md").read_text().split("## Results")[0]


def test_coverage_missing_counts_fail(tmp_path):
    runs = write_runs(tmp_path / "runs")
    for seed_dir in runs.glob("seed_*"):
        set_eval_field("expected_tokens", None)(seed_dir)
        log = seed_dir / "train.log"
        log.write_text("".join(l + "\n" for l in log.read_text().splitlines() if not l.startswith("coverage ")))
        (seed_dir / "metrics.jsonl").unlink()
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    assert any("coverage_complete" in f and "no coverage count" in f for f in res["failures"])


def test_a_custom_tokenizer_ships_with_the_record(tmp_path):
    """A run on another tokenizer (CaseOps, say) gets it copied into the folder and named in the reproduction."""
    tok = tmp_path / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    tok.write_bytes(b"sentencepiece model bytes")
    hp = {"hyperparameters": {"tokenizer_path": str(tok)}}
    res = build(tmp_path, {s: hp for s in (42, 314, 999)}, dry_run=False)
    assert (res["folder"] / tok.name).read_bytes() == tok.read_bytes()
    readme = (res["folder"] / "README.md").read_text()
    assert f"TOKENIZER_PATH={tok.name} " in readme and f"- `{tok.name}` — the tokenizer the runs used" in readme
    tok.unlink()  # not on this machine: a warning, nothing shipped
    res = build(tmp_path, {s: hp for s in (42, 314, 999)}, dry_run=False, force=True)
    assert not (res["folder"] / tok.name).exists() and any("not shipped" in w for w in res["warnings"])


def test_run_reporting_covered_false_fails_coverage(tmp_path):
    runs = write_runs(tmp_path / "runs")
    set_eval_field("covered", False)(runs / "seed_314")
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    assert any("coverage_complete" in f and "covered=false" in f for f in res["failures"])


def test_seed_folders_of_an_earlier_run_and_repeated_seeds_are_not_counted(tmp_path):
    """A seed folder run_info.json does not list (an earlier run under the same NAME) stays out, and a seed listed
    twice counts once."""
    runs = write_runs(tmp_path / "runs", seeds=(42, 314))
    write_runs(tmp_path / "earlier", seeds=(999,))
    (tmp_path / "earlier" / "seed_999").rename(runs / "seed_999")
    info = json.loads((runs / "run_info.json").read_text())
    (runs / "run_info.json").write_text(json.dumps({**info, "seeds": [42, 314, 42]}))
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    assert res["submission"]["seeds"] == [42, 314] and any("three_seeds" in f for f in res["failures"])


def test_non_finite_score_is_a_failed_seed_and_the_json_stays_valid(tmp_path):
    runs = write_runs(tmp_path / "runs")
    summary = json.loads((runs / "seed_999" / "summary.json").read_text())
    (runs / "seed_999" / "summary.json").write_text(json.dumps({**summary, "val_loss": math.nan, "val_bpb": math.nan}))
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    text = (res["folder"] / "submission.json").read_text()
    sub = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in submission.json"))
    assert sub["submittable"] is False and sub["seed_results"]["999"]["status"] == "failed"


def test_stale_log_is_caught(tmp_path):
    runs = write_runs(tmp_path / "runs")
    log = runs / "seed_42" / "train.log"
    log.write_text(log.read_text().replace("val_bpb:1.08079352", "val_bpb:1.09000000"))
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    assert any("seed 42 log_matches_summary" in f for f in res["failures"])


def test_a_kill_before_the_timeout_is_a_failure_not_a_timeout(tmp_path):
    """run.sh writes status "failed" for a SIGKILL (137) that came before SEED_TIMEOUT (the OOM killer, say)."""
    runs = write_runs(tmp_path / "runs")
    (runs / "seed_314" / "summary.json").unlink()
    (runs / "seed_314" / "run_status.json").write_text('{"seed": 314, "rc": 137, "status": "failed", "wall_s": 40}')
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    assert res["submission"]["seed_results"]["314"] == {"status": "failed", "rc": 137}


def test_failed_seed_is_reported_and_others_kept(tmp_path):
    runs = write_runs(tmp_path / "runs")
    (runs / "seed_314" / "summary.json").unlink()
    (runs / "seed_314" / "run_status.json").write_text('{"seed": 314, "rc": 124, "status": "timeout"}')
    res = mr.assemble(runs, out_root=tmp_path / "rec", dry_run=False)
    sub = res["submission"]
    assert sub["seed_results"]["314"] == {"status": "timeout", "rc": 124}
    assert sub["val_loss"] == pytest.approx((A1493[42][0][3] + A1493[999][0][3]) / 2, abs=1e-8)
    assert {"seed 314 completed", "three_seeds", "all_seeds_completed"} <= {f.split(" (")[0] for f in res["failures"]}
    assert "| 314 | TIMEOUT |" in (res["folder"] / "README.md").read_text()


def test_cli_exit_codes(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs", overrides={42: {"train_time_s": 601.0}})
    args = ["--runs-dir", str(runs), "--out-root", str(tmp_path / "rec"), "--no-dry-run", "--baseline-losses",
            ",".join(map(str, BETTER_BASELINE))]
    assert mr.main(args) == 1
    err = capsys.readouterr().err
    assert "NOT SUBMITTABLE" in err and "train_under_600s" in err
    assert mr.main(args) == 2  # the folder exists
    assert "--force" in capsys.readouterr().err
    assert mr.main(args + ["--force", "--allow-fail"]) == 0


def test_parse_train_log_formats():
    text = "\n".join([
        "0/20000 val_loss: 9.0100 val_bpb: 3.4877",
        "500/20000 train_loss: 3.1234 train_time: 1.2m tok/s: 7700000",
        "stopping_early: wallclock_cap train_time: 588047ms step: 4550/20000",
        "pre-quantization post-ema val_loss:2.80873254 val_bpb:1.08734790 eval_time:7440ms",
        "quantized_ttt val_loss:2.79180191 val_bpb:1.08079352 eval_time:366525ms",
        "coverage quantized_ttt val_tokens:40540160 val_bytes:151078222 expected_tokens:40540160",
        "Total submission size quantized+brotli: 15991930 bytes",
    ])
    log = mr.parse_train_log(text)
    assert log["evals"]["quantized_ttt"] == {"val_loss": 2.79180191, "val_bpb": 1.08079352, "eval_time_s": 366.525}
    assert log["evals"]["pre-quantization post-ema"]["val_bpb"] == 1.0873479
    assert log["coverage"]["quantized_ttt"]["expected_tokens"] == 40540160
    assert log["total_bytes"] == 15991930 and log["stop"] == {"train_time_ms": 588047, "step": 4550}
    assert log["train"] == [(500, 3.1234)] and log["val"] == [(0, 9.01)]


def test_techniques_name_the_ttt_mode():
    """The records README's technique list describes the TTT the run used (TTT_MODE), and none when it was off."""
    base = {"ttt_enabled": 1, "ttt_lr": 0.005, "ttt_epochs": 3, "ttt_chunk_tokens": 32768, "ttt_lora_rank": 96,
            "ttt_lora_lr": 1e-4, "ttt_chunk_size": 48, "phased_ttt_num_phases": 3, "global_ttt_lr": 0.001}
    lora = [t for t in mr.describe_techniques({**base, "ttt_mode": "lora_phased"}) if "test-time" in t]
    assert lora == ["score-first test-time training: per-document LoRA (rank 96, AdamW lr 0.0001, a step per 48 "
                    "scored predictions) and 3 global SGD phases (lr 0.001)"]
    for hp in ({**base, "ttt_mode": "score_first"}, base):  # a run from before TTT_MODE was score-first
        assert [t for t in mr.describe_techniques(hp) if "test-time" in t] == [
            "score-first test-time training (SGD lr 0.005, 3 epochs per 32768-token chunk)"]
    assert not [t for t in mr.describe_techniques({**base, "ttt_enabled": 0, "ttt_mode": "lora_phased"})
                if "test-time" in t]
