"""run.sh end to end: with a stand-in trainer (fast), and with the real SMOKE=1 pipeline (RECORDS_SKIP_SMOKE=1 skips it)."""
import json
import os
import signal
import subprocess
import time

import pytest
from records_fixtures import REPO_ROOT, fake_env, fake_repo


SUMMARY_KEYS = ("val_loss", "val_bpb", "final_label", "evals", "artifact_bytes", "total_bytes", "eval_time_s", "ttt")


def read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def run_sh(repo, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["./run.sh"], cwd=repo, env=fake_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def repo(tmp_path):
    return fake_repo(tmp_path)


def test_smoke_two_seeds_with_stand_in(repo):
    proc = run_sh(repo, SMOKE="1", SEEDS="1,2", NAME="sm", TRAIN_SCRIPT="fake_train.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = repo / "runs" / "sm"
    assert (runs / "train_gpt.py").read_text() == (repo / "fake_train.py").read_text()  # the snapshot that ran
    info = json.loads((runs / "run_info.json").read_text())
    assert info["seeds"] == [1, 2] and info["nproc"] == 1
    for s in (1, 2):
        status = json.loads((runs / f"seed_{s}" / "run_status.json").read_text())
        assert status["rc"] == 0 and status["status"] == "ok"
        assert (runs / f"seed_{s}" / "console.log").is_file()
    (folder,) = (runs / "records").iterdir()
    assert folder.name.endswith("_sm")
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == [1, 2] and sub["submittable"] is False  # a smoke run never is
    assert "NOT SUBMITTABLE" in proc.stderr


def test_failed_seed_does_not_stop_the_others(repo):
    proc = run_sh(repo, SMOKE="1", SEEDS="1,2,3", NAME="f", TRAIN_SCRIPT="fake_train.py", FAKE_FAIL_SEED="2")
    assert proc.returncode == 1
    assert "seed 2: FAILED (exit code 3" in proc.stderr and "FAILED SEEDS: 2" in proc.stderr
    runs = repo / "runs" / "f"
    assert json.loads((runs / "seed_3" / "run_status.json").read_text())["status"] == "ok"
    (folder,) = (runs / "records").iterdir()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seed_results"]["2"] == {"status": "failed", "rc": 3} and "val_bpb" in sub["seed_results"]["3"]

    # SKIP_DONE=1 keeps seeds 1 and 3 and reruns seed 2 only.
    proc = run_sh(repo, SMOKE="1", SEEDS="1,2,3", NAME="f", TRAIN_SCRIPT="fake_train.py", SKIP_DONE="1",
                  RECORD_ARGS="--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "seed 1: already completed, kept" in proc.stdout and "seed 2: ok" in proc.stdout
    assert list(runs.glob("seed_2.failed_*"))


def test_seed_timeout(repo):
    proc = run_sh(repo, SMOKE="1", SEEDS="5", NAME="t", TRAIN_SCRIPT="fake_train.py", FAKE_SLEEP="30",
                  SEED_TIMEOUT="2")
    assert proc.returncode == 1 and "seed 5: TIMEOUT (exit code 124" in proc.stderr
    assert json.loads((repo / "runs" / "t" / "seed_5" / "run_status.json").read_text())["status"] == "timeout"


@pytest.mark.parametrize("env, message", [
    (dict(SEEDS="1,x"), "SEEDS must be comma-separated integers"),
    (dict(DATA_DIR="/nonexistent"), "no training shards match /nonexistent/datasets/fineweb10B_sp8192"),
    (dict(SMOKE="1", MIN_FREE_MB="999999999"), "MB free"),
    (dict(SMOKE="1", SEEDS="5,6,5"), "seed 5 is listed twice"),
])
def test_preflight_failures(repo, env, message):
    proc = run_sh(repo, NAME="p", TRAIN_SCRIPT="fake_train.py", **env)
    assert proc.returncode == 2 and "PREFLIGHT FAILED" in proc.stderr and message in proc.stderr, proc.stderr
    assert not list((repo / "runs").glob("p/seed_*/console.log"))


def test_existing_outputs_are_not_overwritten(repo):
    (repo / "runs" / "o" / "seed_1").mkdir(parents=True)
    (repo / "runs" / "o" / "seed_1" / "train.log").write_text("old")
    proc = run_sh(repo, SMOKE="1", SEEDS="1", NAME="o", TRAIN_SCRIPT="fake_train.py")
    assert proc.returncode == 2 and "SKIP_DONE=1" in proc.stderr


def test_seed_folders_of_another_run_stop_it_unless_overwritten(repo):
    (repo / "runs" / "o" / "seed_7").mkdir(parents=True)
    (repo / "runs" / "o" / "seed_7" / "train.log").write_text("an earlier run's seed")
    proc = run_sh(repo, SMOKE="1", SEEDS="1", NAME="o", TRAIN_SCRIPT="fake_train.py")
    assert proc.returncode == 2 and "seed_7 is from another run" in proc.stderr
    proc = run_sh(repo, SMOKE="1", SEEDS="1", NAME="o", TRAIN_SCRIPT="fake_train.py", OVERWRITE="1")
    assert proc.returncode == 0, proc.stderr
    assert not (repo / "runs" / "o" / "seed_7").exists()


def test_interrupt_stops_the_seed_and_the_run(repo):
    """SIGINT (Ctrl-C) reaches the trainer, which timeout keeps in a process group of its own, and no later seed
    starts."""
    proc = subprocess.Popen(["./run.sh"], cwd=repo, env=fake_env(SMOKE="1", SEEDS="1,2", NAME="i",
                                                                  TRAIN_SCRIPT="fake_train.py", FAKE_SLEEP="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    console = repo / "runs" / "i" / "seed_1" / "console.log"
    deadline = time.time() + 120
    while not console.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted during seed 1" in err, err
    assert time.time() - t0 < 30 and not (repo / "runs" / "i" / "seed_2").exists()


def test_real_smoke_two_seeds(tmp_path):
    """SMOKE=1 SEEDS=1,2 ./run.sh with the repository's train_gpt.py: about a minute per seed on CPU.

    RECORDS_SKIP_SMOKE=1 skips it.
    """
    if os.environ.get("RECORDS_SKIP_SMOKE") == "1":
        pytest.skip("RECORDS_SKIP_SMOKE=1")
    runs = tmp_path / "runs"
    proc = subprocess.run(["./run.sh"], cwd=REPO_ROOT, env=fake_env(SMOKE="1", SEEDS="1,2", NAME="pytest_smoke",
                                                                    RUNS_DIR=str(runs)),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for seed in (1, 2):
        assert set(SUMMARY_KEYS) <= set(read_json(runs / f"seed_{seed}" / "summary.json"))
    assert read_json(runs / "seed_1" / "summary.json")["data"] == read_json(runs / "seed_2" / "summary.json")["data"]
    (folder,) = (runs / "records").iterdir()
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "submission.json", "train_gpt.py", "requirements.txt", "train_seed1.log",
            "train_seed2.log", "loss_curves.png"} <= names
    sub = json.loads((folder / "submission.json").read_text())
    assert set(sub["seed_results"]) == {"1", "2"} and all("val_bpb" in r for r in sub["seed_results"].values())
    failed = " ".join(sub["compliance"]["failed_checks"])
    # A smoke run fails only the checks a smoke run must fail: CPU, SMOKE config, two seeds.
    for check in ("coverage_complete", "score_first_ttt", "log_matches_summary", "wrapped_roundtrip",
                  "python310_syntax", "dry_run_in_folder", "same_config_all_seeds", "same_data_all_seeds"):
        assert check not in failed, failed
