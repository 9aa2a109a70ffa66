"""GPU benchmark suite: one train_gpt.py run with fixed settings, everything measured from that run.

    python3 bench/suite.py --out $OUT [--name NAME] [--nproc N] [--budget S] [--deadline S] [ENV=VALUE ...]
    python3 bench/suite.py --parse ARTIFACT_DIR [--out DIR]      (a finished run's train.log + metrics.jsonl)
    python3 bench/suite.py --compare A.json B.json

Data come from the usual variables (DATA_PATH, TOKENIZER_PATH, VAL_FILES). Fixed settings, so runs compare: the
default model configuration, MAX_WALLCLOCK_SECONDS=--budget (300), TRAIN_LOG_EVERY=10, VAL_LOSS_EVERY=0, and fresh
TorchInductor/Triton/FA4 kernel caches (every run compiles from scratch, as on a fresh pod; pass
TORCHINDUCTOR_CACHE_DIR=... TRITON_CACHE_DIR=... FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=... to reuse one). ENV=VALUE
arguments override any of these.

Writes $OUT/<name>.json and $OUT/<name>/ (train.log, metrics.jsonl, summary.json, console.log) and prints a table:
  training     tok/s per GPU and ms/step before and after looping switches on (from consecutive metrics records),
               MFU from FLOPs counted on the model configuration, peak memory
  cold_start   launch (this script starting torchrun) -> first timed step, and the compile warm-up in it
  post_training  training stop -> artifact written, with its breakdown
  eval         seconds and targets/s of each evaluation, eval compile warm-up, projected vs measured, and the
               projection for the full sp8192 validation (40,540,160 targets) on 8 GPUs
  quality      every val_bpb the run prints and the artifact bytes
The run is stopped at --deadline seconds (default 570, inside the GPU tool's 600 s per call) and whatever it had
logged is still parsed and written, with finished=false.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

FIXED_ENV = {"TRAIN_LOG_EVERY": "10", "VAL_LOSS_EVERY": "0"}
DEFAULT_BUDGET_S = 300.0
SKIP_RECORDS = 2  # the first metrics records of a phase include its warm-up transients (and, after the switch,
#                   steps taken before looping was on)
# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins, so the
# lower-clocked PCIe/NVL parts come before the SXM names ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5),
                    ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
# The TTT line's label names its mode: quantized_ttt (score_first) or quantized_ttt_phased (lora_phased).
EVAL_LABELS = {"pre_quant": "pre-quantization post-ema", "quantized": "quantized",
               "sliding": "quantized_sliding_window", "ttt": "quantized_ttt(?:_phased)?"}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and peak
# ---------------------------------------------------------------------------------------------------------------

def training_flops_per_token(hp: tg.Hyperparameters, looping: bool) -> dict:
    """FLOPs of one training token (forward + backward) counted on the configuration, not measured.

    A matmul weight touched once per token costs 2 FLOPs forward and 4 backward (input and weight gradients): 6 per
    parameter per pass, with each virtual layer of layer_schedule a pass (looping runs layers loop_start..loop_end
    num_loops + 1 times). The tied head is one more d x V matmul; the embedding lookup is free. Attention scores
    QK^T and the PV product are 2 * T_ctx * head_dim FLOPs each per head forward, over num_heads * head_dim =
    model_dim; causal, token t sees t + 1 keys, (T + 1) / 2 on average; backward doubles them: 3 * 2 * 2 * d *
    (T + 1) / 2 = 6 d (T + 1) per layer pass. GQA shares K/V heads but not the score work. Elementwise work (norms,
    RoPE, XSA, softcap, optimizer) is not counted, as in the usual MFU convention; nor is flash attention's
    recomputation in backward.
    """
    d, V, T = hp.model_dim, hp.vocab_size, hp.train_seq_len
    kv_dim = hp.num_kv_heads * (d // hp.num_heads)
    hidden = int(hp.mlp_mult * d)
    per_layer = d * d + 2 * d * kv_dim + d * d + 2 * d * hidden  # c_q, c_k + c_v, proj, mlp fc + proj
    encoder, decoder = tg.layer_schedule(hp.num_layers, hp.loop_start, hp.loop_end, hp.num_loops, looping)
    passes = len(encoder) + len(decoder)
    flops = {"layers": 6 * passes * per_layer, "attention": passes * 6 * d * (T + 1), "head": 6 * d * V}
    flops["total"] = sum(flops.values())
    flops["layer_passes"] = passes
    return flops


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and key in gpu_name:
            return tflops
    return None


# ---------------------------------------------------------------------------------------------------------------
# Running train_gpt.py
# ---------------------------------------------------------------------------------------------------------------

def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun, which passes it on to the ranks (they exit at once); SIGKILL if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_train_gpt(env: dict, nproc: int, console_path: Path, deadline: float) -> dict:
    """torchrun train_gpt.py, its output echoed and saved; the wall clock of the training_start line is noted.
    Stopped (SIGTERM, then SIGKILL) at `deadline` (time.time()) so that the caller can still write its results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train_gpt.py")]
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    marks = {}

    def pump():
        with open(console_path, "w", encoding="utf-8") as console:
            for line in proc.stdout:
                if line.startswith("training_start:") and "training_start" not in marks:
                    marks["training_start"] = time.time() - launched
                sys.stdout.write(line)
                console.write(line)
        sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    finished = True
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        finished = False
        print(f"suite: deadline reached after {time.time() - launched:.0f}s; stopping train_gpt.py", flush=True)
    finally:  # also when this script is stopped itself (main turns SIGTERM into SystemExit)
        if proc.poll() is None:
            stop_process_group(proc)
    reader.join(timeout=10)
    return {"returncode": proc.returncode, "finished": finished and proc.returncode == 0,
            "wall_s": time.time() - launched, "launch_to_training_start_s": marks.get("training_start")}


# ---------------------------------------------------------------------------------------------------------------
# Parsing a run's train.log and metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------

NUM = r"([-\d.]+)"


def grab(pattern: str, text: str, cast=float, group: int = 1):
    m = re.search(pattern, text, re.MULTILINE)
    return cast(m.group(group)) if m else None


def parse_hyperparameters(log: str) -> tg.Hyperparameters | None:
    """The run's configuration from the "Hyperparameters:" block train_gpt.py logs first."""
    m = re.search(r"^Hyperparameters:\n((?:  .*\n)+)", log, re.MULTILINE)
    if not m:
        return None
    environ = {}
    for line in m.group(1).splitlines():
        key, _, value = line.strip().partition(":")
        environ[key.upper()] = value.strip()
    return tg.load_hyperparameters(environ)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write
            pass
    return records


def phase_throughput(train_records: list[dict], looping: bool, tokens_per_step: int, world: int) -> dict:
    """Steady-state rate of one phase from the first and last of its records, after SKIP_RECORDS."""
    recs = [r for r in train_records if r.get("looping") == looping][SKIP_RECORDS:]
    if len(recs) < 2:
        return {"tok_s_per_gpu": None, "ms_per_step": None}
    steps = recs[-1]["step"] - recs[0]["step"]
    ms = recs[-1]["train_time_ms"] - recs[0]["train_time_ms"]
    return {"tok_s_per_gpu": steps * tokens_per_step / (ms / 1000) / world, "ms_per_step": ms / steps}


def parse_eval(log: str) -> dict:
    """Per evaluation: val_loss, val_bpb, seconds, targets scored, targets/s."""
    evals = {}
    for key, lab in EVAL_LABELS.items():  # regular expressions
        m = re.search(rf"^({lab}) val_loss:{NUM} val_bpb:{NUM} eval_time:(\d+)ms$", log, re.MULTILINE)
        if not m:
            evals[key] = None
            continue
        seconds = int(m.group(4)) / 1000
        targets = grab(rf"^coverage {re.escape(m.group(1))} val_tokens:(\d+)", log, int)
        evals[key] = {"label": m.group(1), "val_loss": float(m.group(2)), "val_bpb": float(m.group(3)),
                      "seconds": seconds, "targets": targets,
                      "targets_per_s": targets / seconds if targets is not None and seconds > 0 else None}
    return evals


def steps_taken(log: str, train: list[dict]) -> int | None:
    """The last step run: the final validation's "<step>/<iterations> val_loss" line, as train records come only
    every TRAIN_LOG_EVERY steps; the last record's step for a log cut off before it."""
    steps = [int(s) for s in re.findall(r"^(\d+)/\d+ val_loss:", log, re.MULTILINE)] + [r["step"] for r in train[-1:]]
    return max(steps) if steps else None


def parse_training(log: str, train: list[dict], hp: tg.Hyperparameters | None, world: int, gpu: str | None) -> dict:
    training = {"steps": steps_taken(log, train),
                "loop_enabled_step": grab(r"^layer_loop:enabled step:(\d+)", log, int),
                "final_train_loss": train[-1]["train_loss"] if train else None,
                "counted_train_s": grab(rf"counted training time {NUM}s of", log),
                "gptq_reserve_s": grab(rf"^gptq:reserving {NUM}s", log),
                "gptq_hessians_s": grab(rf"^GPTQ:collected \d+ Hessians in {NUM}s", log),
                "peak_mem_allocated_mib": grab(r"^peak memory allocated: (\d+) MiB", log, int),
                "peak_mem_reserved_mib": grab(r"^peak memory allocated: \d+ MiB reserved: (\d+) MiB", log, int)}
    if hp is not None:
        for looping, phase in ((False, "before_loop"), (True, "after_loop")):
            rate = phase_throughput(train, looping, hp.train_batch_tokens, world)
            training.update({f"{k}_{phase}": v for k, v in rate.items()})
            training.update(mfu(hp, looping, rate["tok_s_per_gpu"], gpu, phase))
    return training


def parse_startup(log: str) -> dict | None:
    """train_gpt.py's `startup:` line: seconds per stage from launch to the first timed step."""
    m = re.search(r"^startup: (.*) total:\S+$", log, re.MULTILINE)
    return {k: float(v) for k, v in re.findall(rf"(\w+):{NUM}s", m.group(1))} if m else None


def parse_evaluation(log: str) -> dict:
    evals = parse_eval(log)
    warm = re.search(rf"^eval_warmup: .* in {NUM}s, .* plain_batch:{NUM}ms sliding_batch:{NUM}ms ttt_step:{NUM}ms",
                     log, re.MULTILINE)
    warmup = dict(zip(("seconds", "plain_batch_ms", "sliding_batch_ms", "ttt_step_ms"),
                      map(float, warm.groups()))) if warm else None
    measured = [evals[k]["seconds"] for k in ("sliding", "ttt") if evals[k]]
    return {**evals, "warmup": warmup,
            "projected_sliding_s": grab(rf"^eval_projection: sliding ~{NUM}s", log),
            "projected_ttt_s": grab(rf"^eval_projection: sliding ~\S+ ttt ~{NUM}s", log),
            "measured_sliding_plus_ttt_s": sum(measured) if measured else None,
            "counted_total_s": grab(rf"total_eval_time:{NUM}s", log),
            # graphs the eval warm-up missed, compiled on the clock (train_gpt.py warns; LoRA TTT's dynamic shapes)
            "graphs_compiled_on_eval_clock": sum(map(int, re.findall(
                r"^WARNING \w+: (\d+) graph\(s\) compiled on the eval clock", log, re.MULTILINE))),
            "full_val_8gpu": full_val_projection(log)}


def parse_post_training(log: str) -> dict | None:
    """The post_training line of train_and_quantize (train_gpt.py section 8)."""
    m = re.search(rf"^post_training: {NUM}s from training stop to artifact written \(final_val\+ema:{NUM}s "
                  rf"serialize\+pre_quant_eval:{NUM}s hessians:{NUM}s quantize\+compress:{NUM}s\)", log, re.MULTILINE)
    if not m:
        return None
    post = dict(zip(("total_s", "final_val_ema_s", "serialize_pre_quant_eval_s", "hessians_s", "quantize_compress_s"),
                    map(float, m.groups())))
    post["compress_s"] = grab(rf"^artifact: quantize\+compress \S+ \(compress {NUM}s\)", log)
    return post


def parse_run(artifact_dir: Path) -> dict:
    """Everything the suite reports that one run's files hold; None where the run did not get that far (or on CPU)."""
    log_path = artifact_dir / "train.log"
    log = log_path.read_text() if log_path.exists() else ""
    hp = parse_hyperparameters(log)
    train = [r for r in read_metrics(artifact_dir / "metrics.jsonl") if r.get("event") == "train"]
    world = grab(r"^world_size:(\d+) ", log, int) or 1
    gpu = grab(r"^world_size:\d+ device:(.+?) torch:", log, str)
    evaluation = parse_evaluation(log)
    return {
        "run": {"gpu": gpu, "world_size": world, "torch": grab(r" torch:(\S+)", log, str),
                "attention": grab(r" attention:(\S+)", log, str), "model_params": grab(r"^model_params:(\d+)", log, int),
                "train_batch_tokens": hp.train_batch_tokens if hp else None,
                "max_wallclock_seconds": hp.max_wallclock_seconds if hp else None},
        "training": parse_training(log, train, hp, world, gpu),
        "cold_start": {"launch_to_first_step_s": None,  # the suite's own clock, filled in by main
                       "train_gpt_clock_s": grab(rf"^training_start: {NUM}s after launch", log),  # from its first line
                       "compile_warmup_s": grab(rf"^compile_warmup: {NUM}s", log),
                       "stages_s": parse_startup(log)},
        "post_training": parse_post_training(log),
        "eval": evaluation,
        "quality": {**{f"val_bpb_{k}": (evaluation[k] or {}).get("val_bpb") for k in EVAL_LABELS},
                    "model_bytes": grab(r"^Serialized model quantized\+\w+: (\d+) bytes", log, int),
                    "code_bytes": grab(r"^Code size: (\d+) bytes", log, int),
                    "total_bytes": grab(r"^Total submission size quantized\+\w+: (\d+) bytes", log, int)},
    }


def mfu(hp: tg.Hyperparameters, looping: bool, tok_s_per_gpu: float | None, gpu: str | None, phase: str) -> dict:
    flops = training_flops_per_token(hp, looping)["total"]
    achieved = tok_s_per_gpu * flops / 1e12 if tok_s_per_gpu else None
    peak = peak_tflops(gpu)
    return {f"gflop_per_token_{phase}": flops / 1e9, f"tflops_per_gpu_{phase}": achieved,
            f"mfu_{phase}": achieved / peak if achieved and peak else None}


def full_val_projection(log: str) -> dict | None:
    """train_gpt.py's own projection for the full validation set on 8 GPUs (from this run's step times and, for
    lora_phased, its documents), as logged."""
    m = re.search(rf"^eval_projection_full_scale: targets:\d+ gpus:\d+ counted ~{NUM}s sliding ~{NUM}s "
                  rf"ttt\(\w+\) ~{NUM}s total ~{NUM}s", log, re.MULTILINE)
    return dict(zip(("counted_s", "sliding_s", "ttt_s", "total_s"), map(float, m.groups()))) if m else None


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def flatten(result: dict, prefix: str = "") -> dict:
    rows = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.update(flatten(value, name + "."))
        else:
            rows[name] = value
    return rows


def fmt(value) -> str:
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return "-" if value is None else str(value)


def print_table(result: dict) -> None:
    """The headline figures; the JSON has every field."""
    t, c, p, e, q, r = (result.get(k) or {} for k in ("training", "cold_start", "post_training", "eval", "quality",
                                                      "run"))
    print(f"{r.get('gpu')} x{r.get('world_size')}  attention:{r.get('attention')}  torch:{r.get('torch')}  "
          f"budget:{fmt(r.get('max_wallclock_seconds'))}s  finished:{r.get('finished', '-')}  "
          f"wall:{fmt(r.get('wall_s'))}s")
    print(f"{'training':<22}{'before loop':>14}{'after loop':>14}")
    for label, key in (("tok/s per GPU", "tok_s_per_gpu"), ("ms/step", "ms_per_step"),
                       ("GFLOP/token", "gflop_per_token"), ("TFLOP/s per GPU", "tflops_per_gpu"), ("MFU", "mfu")):
        print(f"  {label:<20}{fmt(t.get(key + '_before_loop')):>14}{fmt(t.get(key + '_after_loop')):>14}")
    print(f"  steps {fmt(t.get('steps'))}, looping from step {fmt(t.get('loop_enabled_step'))}, peak memory "
          f"{fmt(t.get('peak_mem_allocated_mib'))} MiB allocated / {fmt(t.get('peak_mem_reserved_mib'))} reserved")
    print(f"cold start: launch -> first timed step {fmt(c.get('launch_to_first_step_s'))}s (train_gpt.py's own "
          f"clock {fmt(c.get('train_gpt_clock_s'))}s, of which compile warm-up {fmt(c.get('compile_warmup_s'))}s)")
    print("  by stage: " + " ".join(f"{k} {fmt(v)}s" for k, v in (c.get("stages_s") or {}).items()))
    print(f"post-training: stop -> artifact {fmt(p.get('total_s'))}s (final val + EMA {fmt(p.get('final_val_ema_s'))}, "
          f"serialize + pre-quant eval {fmt(p.get('serialize_pre_quant_eval_s'))}, Hessians {fmt(p.get('hessians_s'))}, "
          f"quantize + compress {fmt(p.get('quantize_compress_s'))})")
    print(f"{'eval':<22}{'val_bpb':>14}{'seconds':>14}{'targets/s':>14}")
    for key in EVAL_LABELS:
        ev = e.get(key) or {}
        print(f"  {key:<20}{fmt(ev.get('val_bpb')):>14}{fmt(ev.get('seconds')):>14}{fmt(ev.get('targets_per_s')):>14}")
    w, full = e.get("warmup") or {}, e.get("full_val_8gpu") or {}
    print(f"  graphs compiled on the eval clock: {fmt(e.get('graphs_compiled_on_eval_clock'))} (0 expected)")
    print(f"  compile warm-up {fmt(w.get('seconds'))}s; sliding + TTT projected {fmt(e.get('projected_sliding_s'))} + "
          f"{fmt(e.get('projected_ttt_s'))}s, measured {fmt(e.get('measured_sliding_plus_ttt_s'))}s")
    print(f"  full validation on 8 GPUs (projected): counted so far {fmt(full.get('counted_s'))}s sliding "
          f"{fmt(full.get('sliding_s'))}s TTT {fmt(full.get('ttt_s'))}s total {fmt(full.get('total_s'))}s")
    print(f"artifact: model {fmt(q.get('model_bytes'))} + code {fmt(q.get('code_bytes'))} = "
          f"{fmt(q.get('total_bytes'))} bytes")


def print_compare(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """Side by side, with B - A and the relative change for numbers."""
    fa, fb = flatten(a), flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    width = max(map(len, keys))
    print(f"{'':<{width}}  {name_a[:14]:>14}  {name_b[:14]:>14}  {'delta':>12}  {'rel':>8}")
    for key in keys:
        va, vb = fa.get(key), fb.get(key)
        delta = rel = ""
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        if numeric:
            delta = fmt(vb - va)
            rel = f"{100 * (vb - va) / abs(va):+.1f}%" if va else ""
        print(f"{key:<{width}}  {fmt(va):>14}  {fmt(vb):>14}  {delta:>12}  {rel:>8}")


def settings(args) -> dict:
    """The ENV=VALUE arguments."""
    bad = [kv for kv in args.env if "=" not in kv]
    if bad:
        raise SystemExit(f"suite: not ENV=VALUE: {bad}")
    return dict(kv.split("=", 1) for kv in args.env)


def run_env(args, artifact_dir: Path, cache_dir: str) -> dict:
    """Fixed settings, then the budget, then the ENV=VALUE arguments (which win)."""
    return {**os.environ, **FIXED_ENV, "MAX_WALLCLOCK_SECONDS": str(args.budget), "ARTIFACT_DIR": str(artifact_dir),
            "RUN_ID": args.name, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton"),
            "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": os.path.join(cache_dir, "fa4"), **settings(args)}


def main(argv=None) -> None:
    start = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that a stopped suite stops its run too
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--name", default="suite", help="result name: <out>/<name>.json")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="MAX_WALLCLOCK_SECONDS")
    ap.add_argument("--deadline", type=float, default=570.0, help="stop the run this many seconds after start")
    ap.add_argument("--parse", metavar="ARTIFACT_DIR", help="only parse a finished run's files")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    ap.add_argument("env", nargs="*", help="extra ENV=VALUE settings for train_gpt.py")
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print_compare(a, b, Path(args.compare[0]).stem, Path(args.compare[1]).stem)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.parse:
        result = parse_run(Path(args.parse))
    else:
        # The run's own files go to logs/ (its ~150 MB checkpoint stays out of $OUT); the small ones are copied.
        artifact_dir = Path(settings(args).get("ARTIFACT_DIR", ROOT / "logs" / f"bench_{args.name}"))
        shutil.rmtree(artifact_dir, ignore_errors=True)
        artifact_dir.mkdir(parents=True)
        saved = out / args.name
        saved.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="bench_cache_") as cache_dir:
            status = run_train_gpt(run_env(args, artifact_dir, cache_dir), args.nproc, saved / "console.log",
                                   start + args.deadline)
        for name in ("train.log", "metrics.jsonl", "summary.json"):
            if (artifact_dir / name).exists():
                shutil.copy(artifact_dir / name, saved / name)
        result = parse_run(artifact_dir)
        result["cold_start"]["launch_to_first_step_s"] = status.pop("launch_to_training_start_s")
        result["run"].update(status, settings=" ".join(args.env))
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print()
    print_table(result)
    print(f"\nwritten: {out / (args.name + '.json')}")
    if not args.parse and not result["run"]["finished"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
