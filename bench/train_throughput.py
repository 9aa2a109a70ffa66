"""Training throughput benchmark: runs train_gpt.py once and reports what the issue tracker asks for.

    python3 bench/train_throughput.py [--nproc N] [--out DIR] [-- extra ENV=VALUE ...]

Prints a short table and writes <out>/train_throughput.json: tok/s (per GPU) before and after looping switches on
(instantaneous, from consecutive metrics records, skipping the first records of each phase), ms/step, peak memory,
launch -> first timed step, steps, and the final losses. Same settings every time so runs compare: default
configuration, 180 s budget, TRAIN_LOG_EVERY=10.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def phase_rate(records, looping, world):
    recs = [r for r in records if r.get("looping") == looping]
    recs = recs[2:]  # the first records of a phase include its compile/warm-up transients
    if len(recs) < 2:
        return None, None
    d_steps = recs[-1]["step"] - recs[0]["step"]
    d_ms = recs[-1]["train_time_ms"] - recs[0]["train_time_ms"]
    tokens = d_steps * 786_432
    return tokens / (d_ms / 1000) / world, d_ms / d_steps


def summarize(artifact_dir: Path, world: int) -> dict:
    records = [json.loads(l) for l in (artifact_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("event") == "train"]
    log = (artifact_dir / "train.log").read_text()
    pre, pre_ms = phase_rate(train, False, world)
    post, post_ms = phase_rate(train, True, world)
    grab = lambda pat: (m.group(1) if (m := re.search(pat, log)) else None)
    return {
        "world_size": world,
        "tok_s_per_gpu_before_loop": pre, "ms_per_step_before_loop": pre_ms,
        "tok_s_per_gpu_after_loop": post, "ms_per_step_after_loop": post_ms,
        "steps": train[-1]["step"] if train else 0,
        "peak_mem_allocated_mib": grab(r"peak memory allocated: (\d+) MiB"),
        "launch_to_first_step_s": grab(r"training_start: ([\d.]+)s after launch"),
        "compile_warmup_s": grab(r"compile_warmup: ([\d.]+)s"),
        "attention": grab(r"attention:(\S+)"),
        "device": grab(r"device:(.+?) torch:"),
        "final_train_loss": train[-1]["train_loss"] if train else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--name", default="train_throughput")
    ap.add_argument("env", nargs="*", help="extra ENV=VALUE settings")
    args = ap.parse_args()
    out = Path(args.out)
    artifact_dir = out / args.name
    env = dict(os.environ, MAX_WALLCLOCK_SECONDS="180", TRAIN_LOG_EVERY="10", VAL_LOSS_EVERY="0",
               ARTIFACT_DIR=str(artifact_dir), RUN_ID=args.name)
    env.update(kv.split("=", 1) for kv in args.env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(ROOT / "train_gpt.py")]
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    result = summarize(artifact_dir, args.nproc)
    result["returncode"] = rc
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.1f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
