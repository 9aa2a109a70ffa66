"""Fixtures for the records tests: seed outputs in train_gpt.py's schema, and a stand-in trainer script.

The figures follow record PR #1493 (ANCHORS §8.1); bpb is derived from loss with the sp8192 validation totals so that
loss, bpb, tokens and bytes agree exactly as in a real run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VAL_TOKENS = 40_540_160
VAL_BYTES = 151_078_222

# seed -> (pre-quant, quantized, sliding, TTT) val_loss, steps, artifact bytes
A1493 = {
    42: ((2.80873254, 2.84065044, 2.79714850, 2.79180191), 4550, 15_975_300),
    314: ((2.80977929, 2.84004242, 2.79676256, 2.79241542), 4557, 15_976_325),
    999: ((2.81014279, 2.83957454, 2.79659675, 2.79281076), 4555, 15_976_638),
}
LABELS = ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt")
EVAL_TIMES_S = (7.44, 25.5, 121.0, 366.5)


def bpb_of(loss: float, tokens: int = VAL_TOKENS, nbytes: int = VAL_BYTES) -> float:
    return loss / math.log(2.0) * tokens / nbytes


def load_make_record():
    if "make_record" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_record", REPO_ROOT / "records" / "make_record.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_record"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_record"]


def wrapped_size(script_text: str) -> int:
    return len(load_make_record().train_gpt().wrap_source(script_text).encode())


def write_seed(seed_dir, seed: int, *, losses=None, steps: int = 4550, artifact_bytes: int = 15_975_300,
               code_bytes: int = 16_600, train_time_s: float = 599.047, gpu: str = "NVIDIA H100 80GB HBM3",
               world_size: int = 8, hyperparameters: dict | None = None, ttt: dict | None = None,
               val_tokens: int = VAL_TOKENS, expected_tokens: int = VAL_TOKENS, eval_times=EVAL_TIMES_S,
               rc: int = 0, curve_steps: int = 4, data: dict | None = None) -> dict:
    """One seed's train.log, metrics.jsonl, summary.json and run_status.json; returns the summary."""
    seed_dir = Path(seed_dir)
    seed_dir.mkdir(parents=True, exist_ok=True)
    losses = losses or A1493[42][0]
    evals = {}
    for label, loss, t in zip(LABELS, losses, eval_times):
        evals[label] = {"val_loss": loss, "val_bpb": round(bpb_of(loss, val_tokens), 8), "eval_time_s": t,
                        "val_tokens": val_tokens, "val_bytes": VAL_BYTES, "expected_tokens": expected_tokens}
    total = artifact_bytes + code_bytes
    log = ["Hyperparameters:", f"  seed: {seed}", "model_params:35944536"]
    metrics = []
    for i in range(curve_steps + 1):
        step = i * steps // curve_steps
        train_loss = 3.0 + 4.0 / (1 + i) + 0.01 * (seed % 7)
        log.append(f"{step}/20000 train_loss: {train_loss:.4f} train_time: {i * 2.4:.1f}m tok/s: 7700000")
        metrics.append({"event": "train", "step": step, "train_loss": train_loss, "train_time_ms": i * 144000.0,
                        "tok_s": 7.7e6})
        if i in (0, curve_steps):
            log.append(f"{step}/20000 val_loss: {train_loss + 0.1:.4f} val_bpb: {bpb_of(train_loss + 0.1):.4f}")
            metrics.append({"event": "val", "step": step, "val_loss": train_loss + 0.1,
                            "val_bpb": bpb_of(train_loss + 0.1), "train_time_ms": i * 144000.0})
    log.append(f"stopping_early: wallclock_cap train_time: {int((train_time_s - 11.0) * 1000)}ms step: {steps}/20000")
    for label, ev in evals.items():
        log.append(f"{label} val_loss:{ev['val_loss']:.8f} val_bpb:{ev['val_bpb']:.8f} "
                   f"eval_time:{ev['eval_time_s'] * 1000:.0f}ms")
        log.append(f"coverage {label} val_tokens:{val_tokens} val_bytes:{VAL_BYTES} expected_tokens:{expected_tokens}")
        metrics.append({"event": "eval", "label": label, "val_loss": ev["val_loss"], "val_bpb": ev["val_bpb"],
                        "eval_time_ms": ev["eval_time_s"] * 1000, "val_tokens": val_tokens, "val_bytes": VAL_BYTES,
                        "expected_tokens": expected_tokens})
        if label == "quantized":
            log.append(f"Total submission size quantized+brotli: {total} bytes")
    final = evals[LABELS[-1]]
    summary = {
        "seed": seed, "run_id": f"fixture_seed{seed}", "world_size": world_size, "gpu": gpu,
        "torch_version": "2.9.1+cu128", "python_version": "3.11.9", "attention": "fa4", "steps": steps, "train_time_s": train_time_s,
        "gptq_hessian_s": 11.0, "looping_enabled_step": 2018, "artifact_bytes": artifact_bytes,
        "code_bytes": code_bytes, "total_bytes": total, "size_cap_ok": total <= 16_000_000, "evals": evals,
        "eval_time_s": round(sum(eval_times), 3), "final_label": LABELS[-1], "val_loss": final["val_loss"],
        "val_bpb": final["val_bpb"], "ttt": ttt or {"mode": "score_first", "score_before_update": True},
        "data": data or {"train_shards": 80, "train": "0123456789abcdef", "val": "fedcba9876543210"},
        "hyperparameters": {"seed": seed, "vocab_size": 8192, "num_layers": 11, "model_dim": 512,
                            "qk_gain_init": 5.25, "ttt_enabled": 1, "smoke": 0, **(hyperparameters or {})},
    }
    (seed_dir / "train.log").write_text("\n".join(log) + "\n")
    (seed_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (seed_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (seed_dir / "run_status.json").write_text(json.dumps({"seed": seed, "rc": rc, "status": "ok" if rc == 0 else "failed"}))
    return summary


def write_runs(runs_dir, seeds=(42, 314, 999), script_text: str | None = None, **per_seed) -> Path:
    """A runs dir as run.sh leaves it: a snapshot train_gpt.py (the stand-in trainer), run_info.json, seed_<S>/.

    per_seed: {seed: {write_seed keyword overrides}} under the key "overrides".
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    script_text = script_text or FAKE_TRAINER
    (runs_dir / "train_gpt.py").write_text(script_text)
    (runs_dir / "run_info.json").write_text(json.dumps({"name": "fixture", "seeds": list(seeds), "nproc": 8,
                                                        "git_commit": "0" * 40, "git_dirty": False}))
    code_bytes = wrapped_size(script_text)
    overrides = per_seed.get("overrides", {})
    for seed in seeds:
        losses, steps, artifact = A1493.get(seed, A1493[42])
        kw = dict(losses=losses, steps=steps, artifact_bytes=artifact, code_bytes=code_bytes)
        kw.update(overrides.get(seed, {}))
        write_seed(runs_dir / f"seed_{seed}", seed, **kw)
    return runs_dir


# A stand-in for train_gpt.py: honours DRY_RUN, SMOKE, SEED, RUN_ID and ARTIFACT_DIR, and writes its outputs with
# write_seed (found through FAKE_FIXTURES_DIR). FAKE_FAIL_SEED=<s> makes seed s exit 3; FAKE_SLEEP=<s> sleeps.
FAKE_TRAINER = '''"""Stand-in trainer for the records tests."""
import dataclasses
import os
import sys
import time


@dataclasses.dataclass
class Hyperparameters:
    data_dir: str = "./data/"
    data_path: str = ""
    tokenizer_path: str = ""
    val_files: str = ""
    run_id: str = ""
    artifact_dir: str = ""
    seed: int = 1337
    smoke: int = 0
    dry_run: int = 0
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    qk_gain_init: float = 5.0
    ttt_enabled: int = 1


def load_hyperparameters(environ=os.environ):
    hp = Hyperparameters()
    if int(environ.get("SMOKE", "0")):
        hp.vocab_size, hp.num_layers, hp.model_dim = 512, 6, 64
    for f in dataclasses.fields(hp):
        raw = environ.get(f.name.upper())
        if raw is not None:
            setattr(hp, f.name, type(getattr(hp, f.name))(raw))
    hp.data_path = hp.data_path or os.path.join(hp.data_dir, "datasets", f"fineweb10B_sp{hp.vocab_size}")
    hp.tokenizer_path = hp.tokenizer_path or os.path.join(hp.data_dir, "tokenizers", f"fineweb_{hp.vocab_size}_bpe.model")
    hp.val_files = hp.val_files or os.path.join(hp.data_path, "fineweb_val_*.bin")
    hp.artifact_dir = hp.artifact_dir or os.path.join("logs", hp.run_id or "x")
    return hp


def main():
    hp = load_hyperparameters()
    print("Hyperparameters:")
    for k, v in sorted(dataclasses.asdict(hp).items()):
        print(f"  {k}: {v}")
    print("model_params:12345")
    if hp.dry_run:
        return
    if os.environ.get("FAKE_FAIL_SEED") == str(hp.seed):
        print("simulated failure", file=sys.stderr)
        sys.exit(3)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    sys.path.insert(0, os.environ["FAKE_FIXTURES_DIR"])
    import records_fixtures

    records_fixtures.write_seed(hp.artifact_dir, hp.seed, hyperparameters=dataclasses.asdict(hp), gpu="cpu",
                                world_size=1, code_bytes=int(os.environ.get("FAKE_CODE_BYTES", "1189")))


if __name__ == "__main__":
    main()
'''


def fake_repo(tmp_path: Path) -> Path:
    """A copy of run.sh and records/make_record.py beside the stand-in trainer, for fast run.sh tests."""
    repo = tmp_path / "repo"
    (repo / "records").mkdir(parents=True)
    for rel in ("run.sh", "records/make_record.py", "requirements.txt"):
        (repo / rel).write_bytes((REPO_ROOT / rel).read_bytes())
    (repo / "run.sh").chmod(0o755)
    # make_record.py takes wrap_source etc. from the repository's train_gpt.py: give it the real one there, and the
    # stand-in as the script that runs (TRAIN_SCRIPT).
    (repo / "train_gpt.py").write_bytes((REPO_ROOT / "train_gpt.py").read_bytes())
    (repo / "fake_train.py").write_text(FAKE_TRAINER)
    return repo


def fake_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE", "SEEDS", "NPROC", "RUNS_DIR", "NAME")}
    env.update(FAKE_FIXTURES_DIR=str(Path(__file__).resolve().parent), **extra)
    return env
