#!/usr/bin/env python3
"""Assemble a records folder from a multi-seed runs directory (usage: records/README.md).

Reads `<runs-dir>/seed_<S>/{summary.json,train.log,metrics.jsonl,run_status.json}` (written by train_gpt.py and
run.sh), checks every seed against the challenge's budgets, runs a one-sided Welch t-test against a baseline, and
writes `records/track_10min_16mb/YYYY-MM-DD_<name>/` with README.md, submission.json, train_seed<S>.log, the
LZMA-wrapped train_gpt.py, requirements.txt and loss_curves.png.

Exit status: 0 = folder written and every check passed; 1 = folder written but a check failed (the folder is marked
NOT SUBMITTABLE; `--allow-fail` turns this into 0); 2 = nothing written (usage error, no completed seed, ...).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_CAP_BYTES = 16_000_000  # decimal bytes: compressed model + counted code
TRAIN_CAP_S = 600.0
EVAL_CAP_S = 600.0
MARGIN_NATS = 0.005  # a record must beat the previous one by this much ...
ALPHA = 0.01  # ... at this one-sided significance level
MIN_SEEDS = 3
LN2 = math.log(2.0)

# Hyperparameters that name the machine or the run rather than the configuration.
RUN_SPECIFIC_KEYS = {"seed", "run_id", "artifact_dir", "data_dir", "data_path", "tokenizer_path", "val_files", "smoke",
                     "dry_run", "eval_only", "artifact_path"}

# Results-table columns: (title, predicate on an eval label).
EVAL_COLUMNS = [
    ("pre-quant", lambda lab: "pre-quant" in lab),
    ("quantized", lambda lab: lab.removeprefix("diagnostic ") == "quantized"),
    ("sliding", lambda lab: "sliding" in lab),
    ("TTT", lambda lab: "ttt" in lab),
]

ISSUE_1017_CONDITIONS = [
    ("Causal", "each prediction depends only on the artifact and the tokens before it; the validation stream is "
               "scored left to right and no future token reaches the model."),
    ("Normalized distribution", "every score is the log-probability of a full softmax over the whole vocabulary "
                                "(no n-gram caches, no unnormalized logit mixing)."),
    ("Score before update", "test-time training (when on) updates the weights only on a chunk after every token of "
                            "that chunk has been scored; no token is scored by weights that were trained on it."),
    ("Single pass", "each validation token is scored exactly once, in one left-to-right pass (no rescoring, no "
                    "min-over-runs); the coverage count below proves every token was scored."),
]


# ---------------------------------------------------------------------------------------------------------------
# Loading train_gpt.py (the wrapper functions live there; this file does not write another wrapper)
# ---------------------------------------------------------------------------------------------------------------

def load_module(path: str | os.PathLike, name: str):
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_TRAIN_GPT = []


def train_gpt():
    """The repository's train_gpt.py as a module: wrap_source, unwrap_source, minify_source, counted_code_bytes.

    An already imported `train_gpt` of this repository is reused rather than loaded a second time."""
    if not _TRAIN_GPT:
        path = (REPO_ROOT / "train_gpt.py").resolve()
        mod = sys.modules.get("train_gpt")
        if mod is None or Path(getattr(mod, "__file__", "") or "").resolve() != path:
            mod = load_module(path, "train_gpt" if mod is None else "_records_train_gpt")
        _TRAIN_GPT.append(mod)
    return _TRAIN_GPT[0]


# ---------------------------------------------------------------------------------------------------------------
# Parsing a seed's outputs
# ---------------------------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
EVAL_LINE = re.compile(rf"(?P<label>\S.*?) val_loss:(?P<loss>{_NUM}) val_bpb:(?P<bpb>{_NUM}) eval_time:(?P<ms>{_NUM})ms")
TOTAL_LINE = re.compile(r"Total submission size[^:]*: (?P<bytes>\d+) bytes")
STOP_LINE = re.compile(r"stopping_early: wallclock_cap train_time: (?P<ms>\d+)ms step: (?P<step>\d+)/")
TRAIN_LINE = re.compile(rf"^(?P<step>\d+)/\d+ train_loss: (?P<loss>{_NUM}) train_time: ")
VAL_LINE = re.compile(rf"^(?P<step>\d+)/\d+ val_loss: (?P<loss>{_NUM}) val_bpb: (?P<bpb>{_NUM})")
COVERAGE_LINE = re.compile(r"coverage (?P<label>\S.*?) val_tokens:(?P<tokens>\d+) val_bytes:(?P<bytes>\d+) "
                           r"expected_tokens:(?P<expected>\d+)")


def parse_train_log(text: str) -> dict:
    """The figures a rank-0 log states (ANCHORS §10 formats); the last occurrence of a label wins."""
    out = {"evals": {}, "coverage": {}, "train": [], "val": [], "total_bytes": None, "stop": None}
    for raw in text.splitlines():
        line = raw.strip()
        if m := EVAL_LINE.search(line):
            out["evals"][m["label"]] = {"val_loss": float(m["loss"]), "val_bpb": float(m["bpb"]),
                                        "eval_time_s": float(m["ms"]) / 1000.0}
        elif m := COVERAGE_LINE.search(line):
            out["coverage"][m["label"]] = {"val_tokens": int(m["tokens"]), "val_bytes": int(m["bytes"]),
                                           "expected_tokens": int(m["expected"])}
        elif m := TOTAL_LINE.search(line):
            out["total_bytes"] = int(m["bytes"])
        elif m := STOP_LINE.search(line):
            out["stop"] = {"train_time_ms": int(m["ms"]), "step": int(m["step"])}
        elif m := TRAIN_LINE.match(line):
            out["train"].append((int(m["step"]), float(m["loss"])))
        elif m := VAL_LINE.match(line):
            out["val"].append((int(m["step"]), float(m["loss"])))
    return out


def read_jsonl(path: Path) -> list[dict]:
    """Events of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@dataclasses.dataclass
class Check:
    name: str
    ok: bool | None  # None: could not be checked
    detail: str = ""


@dataclasses.dataclass
class SeedRun:
    seed: int
    dir: Path
    status: str  # "ok", "failed" or "timeout"
    summary: dict | None
    log_path: Path | None
    log: dict
    metrics: list[dict]
    run_status: dict | None
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.status == "ok"

    def get(self, key, default=None):
        return (self.summary or {}).get(key, default)

    @property
    def evals(self) -> dict:
        return self.get("evals") or {}


def load_seed_run(seed_dir: Path) -> SeedRun:
    seed = int(seed_dir.name.removeprefix("seed_"))
    summary = read_json(seed_dir / "summary.json")
    run_status = read_json(seed_dir / "run_status.json")
    log_path = next((p for p in (seed_dir / "train.log", seed_dir / "console.log") if p.is_file()), None)
    log = parse_train_log(log_path.read_text(encoding="utf-8", errors="replace")) if log_path else parse_train_log("")
    rc = (run_status or {}).get("rc", 0)
    score = [(summary or {}).get(k) for k in ("val_loss", "val_bpb")]
    # run.sh's own verdict where it gave one: it tells a SIGKILL at the timeout from one before it (OOM, say)
    timed_out = run_status["status"] == "timeout" if "status" in (run_status or {}) else rc in (124, 137)
    if timed_out:
        status = "timeout"
    elif rc != 0 or summary is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in score):
        status = "failed"  # also a NaN score: no result
    else:
        status = "ok"
    return SeedRun(seed, seed_dir, status, summary, log_path, log, read_jsonl(seed_dir / "metrics.jsonl"), run_status)


def load_runs(runs_dir: Path) -> list[SeedRun]:
    """The seeds run.sh ran (run_info.json), in its order; without run_info.json every `seed_<S>` folder, by seed.
    Seed folders run_info.json does not list (an earlier run under the same NAME) are left out, with a note."""
    dirs = {int(p.name[5:]): p for p in runs_dir.glob("seed_*") if p.is_dir() and p.name[5:].lstrip("-").isdigit()}
    listed = (read_json(runs_dir / "run_info.json") or {}).get("seeds")
    order = list(dict.fromkeys(int(s) for s in listed)) if listed else sorted(dirs)  # a seed counts once
    stray = sorted(set(dirs) - set(order))
    if stray:
        print(f"note: ignoring seed folders run_info.json does not list: {stray}", file=sys.stderr)
    return [load_seed_run(dirs[s]) for s in order if s in dirs]


# ---------------------------------------------------------------------------------------------------------------
# Compliance
# ---------------------------------------------------------------------------------------------------------------

def coverage_of(run: SeedRun, label: str) -> dict:
    """val_tokens / expected_tokens of one eval: summary.json first, then metrics.jsonl, then the log's line."""
    cov = dict(run.evals.get(label) or {})
    for ev in run.metrics:
        if ev.get("event") == "eval" and ev.get("label") == label:
            cov = {**ev, **{k: v for k, v in cov.items() if v is not None}}
    return {**run.log["coverage"].get(label, {}), **{k: v for k, v in cov.items() if v is not None}}


def incomplete_reason(run: SeedRun) -> str:
    rc = (run.run_status or {}).get("rc")
    if run.status == "timeout":
        why = "timed out"
    elif run.summary is None:
        why = "wrote no summary.json"
    else:
        missing = [k for k in ("val_loss", "val_bpb", "final_label", "evals", "total_bytes") if k not in run.summary]
        why = f"summary.json lacks {', '.join(missing)}" if missing else "summary.json has no final val_loss"
    return f"seed {run.seed} {why} (exit code {rc}); see {run.dir / 'console.log'}"


def check_seed(run: SeedRun, cap: int = SIZE_CAP_BYTES) -> list[Check]:
    """The per-seed rules: budgets, coverage, score-first TTT, hardware, and that the log agrees with summary.json."""
    if not run.completed:
        return [Check("completed", False, incomplete_reason(run))]
    checks = [Check("completed", True)]
    total = run.get("total_bytes")
    checks.append(Check("artifact_under_16mb", total is not None and total <= cap,
                        f"total {total} bytes (artifact {run.get('artifact_bytes')} + code {run.get('code_bytes')}), "
                        f"cap {cap}"))
    t = run.get("train_time_s")
    checks.append(Check("train_under_600s", t is not None and t <= TRAIN_CAP_S, f"train_time_s {t} (cap {TRAIN_CAP_S:.0f})"))
    e = run.get("eval_time_s")
    if e is None and run.evals:  # not recorded: count every eval, the conservative reading
        e = sum(v.get("eval_time_s") or 0.0 for v in run.evals.values())
    checks.append(Check("eval_under_600s", e is not None and e <= EVAL_CAP_S, f"eval_time_s {e} (cap {EVAL_CAP_S:.0f})"))

    faults = []
    for label in run.evals or {run.get("final_label"): None}:
        cov = coverage_of(run, label)
        if cov.get("val_tokens") is None or cov.get("expected_tokens") is None:
            faults.append(f"{label}: no coverage count")
        elif cov["val_tokens"] != cov["expected_tokens"]:
            faults.append(f"{label}: scored {cov['val_tokens']} of {cov['expected_tokens']} tokens")
        elif cov.get("covered") is False:  # the run's own check: every target once, bytes equal to the expected
            faults.append(f"{label}: the run reports covered=false (a target scored twice or bytes off)")
    checks.append(Check("coverage_complete", not faults,
                        "; ".join(faults) or f"every eval scored all expected tokens ({len(run.evals)} evals)"))

    ttt = run.get("ttt") or {}
    mode = ttt.get("mode")
    if mode == "off":
        checks.append(Check("score_first_ttt", True, "TTT off"))
    elif mode in ("score_first", "lora_phased"):  # both score every chunk before training on it
        ok = ttt.get("score_before_update") is True
        checks.append(Check("score_first_ttt", ok, f"{mode} TTT, scored before update" if ok
                            else "TTT does not report score_before_update=true"))
    else:
        checks.append(Check("score_first_ttt", False, f"TTT mode {mode!r} is not score_first, lora_phased or off"))

    gpu, world = str(run.get("gpu", "")), run.get("world_size")
    sxm = "H100" in gpu and not any(part in gpu for part in ("PCIe", "NVL"))  # the rules' 8xH100 is SXM
    checks.append(Check("hardware_8xh100", world == 8 and sxm, f"{world} x {gpu}"))
    smoke = int((run.get("hyperparameters") or {}).get("smoke", 0) or 0)
    checks.append(Check("not_smoke", not smoke, "SMOKE=1 run (tiny CPU config)" if smoke else "full config"))
    checks.append(check_log_matches(run))
    return checks


def check_log_matches(run: SeedRun) -> Check:
    """A stale or foreign log is caught by comparing its final score and total bytes with summary.json."""
    if run.log_path is None:
        return Check("log_matches_summary", None, "no train.log")
    label = run.get("final_label")
    logged = run.log["evals"].get(label)
    faults = []
    if logged is None:
        faults.append(f"log has no '{label} val_loss:... val_bpb:...' line")
    else:
        for key in ("val_loss", "val_bpb"):  # the log prints 8 decimals
            if abs(logged[key] - float(run.get(key))) > 1e-7:
                faults.append(f"{key} log {logged[key]} vs summary {run.get(key)}")
    if run.log["total_bytes"] is not None and run.get("total_bytes") is not None \
            and run.log["total_bytes"] != run.get("total_bytes"):
        faults.append(f"total bytes log {run.log['total_bytes']} vs summary {run.get('total_bytes')}")
    return Check("log_matches_summary", not faults, "; ".join(faults) or f"{run.log_path.name} agrees with summary.json")


def bpb_consistency_warnings(runs: list[SeedRun]) -> list[str]:
    """bpb = loss/ln2 * tokens/bytes must hold for every eval, and every eval should count the same bytes."""
    warnings, byte_totals = [], set()
    for run in runs:
        for label in run.evals:
            cov = coverage_of(run, label)
            tokens, nbytes, loss, bpb = (cov.get(k) for k in ("val_tokens", "val_bytes", "val_loss", "val_bpb"))
            if None in (tokens, nbytes, loss, bpb) or not nbytes:
                continue
            byte_totals.add(nbytes)
            expect = loss / LN2 * tokens / nbytes
            if abs(expect - bpb) > 1e-6 * max(1.0, abs(bpb)):
                warnings.append(f"seed {run.seed} {label}: val_bpb {bpb} but val_loss/ln2*tokens/bytes = {expect:.8f}")
    if len(byte_totals) > 1:
        warnings.append(f"evals count different validation byte totals: {sorted(byte_totals)}")
    return warnings


def config_of(run: SeedRun) -> dict:
    return {k: v for k, v in (run.get("hyperparameters") or {}).items() if k not in RUN_SPECIFIC_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def welch_improvement_test(new: list[float], baseline: list[float], margin: float = MARGIN_NATS,
                           alpha: float = ALPHA) -> dict:
    """One-sided Welch t-test of H1: mean(baseline) - mean(new) > margin (losses in nats; lower is better).

    t = (mean_base - mean_new - margin) / sqrt(s_new^2/n_new + s_base^2/n_base), Welch-Satterthwaite df,
    p = P(T_df >= t).
    """
    from scipy import stats

    out = {"n_new": len(new), "n_baseline": len(baseline), "margin_nats": margin, "alpha": alpha,
           "mean_new": None, "mean_baseline": None, "mean_delta_nats": None, "t": None, "df": None,
           "p_value": None, "significant": None}
    if not new or not baseline:
        return {**out, "reason": "no losses"}
    out["mean_new"], out["mean_baseline"] = mean_std(new)[0], mean_std(baseline)[0]
    out["mean_delta_nats"] = out["mean_new"] - out["mean_baseline"]  # negative = better than the baseline
    if len(new) < 2 or len(baseline) < 2:
        return {**out, "reason": "the t-test needs at least 2 losses on each side"}
    if mean_std(new)[1] == 0 and mean_std(baseline)[1] == 0:  # no spread on either side: the ordering decides
        gain = out["mean_baseline"] - out["mean_new"] - margin
        return {**out, "t": math.copysign(math.inf, gain), "df": None, "p_value": 0.0 if gain > 0 else 1.0,
                "significant": gain > 0, "reason": "zero variance on both sides"}
    res = stats.ttest_ind([b - margin for b in baseline], new, equal_var=False, alternative="greater")
    return {**out, "t": float(res.statistic), "df": float(res.df), "p_value": float(res.pvalue),
            "significant": bool(res.pvalue < alpha)}


def baseline_scores_from(path: str) -> tuple[list[float], list[float], str]:
    """Per-seed val_loss and val_bpb of a records folder (or its submission.json); the official records' seed_results
    hold only val_bpb, so either list may be empty, not both."""
    p = Path(path)
    if p.is_dir():
        p = p / "submission.json"
    sub = read_json(p)
    if sub is None:
        raise SystemExit(f"baseline error: cannot read {p}")
    rows = [r for r in (sub.get("seed_results") or {}).values() if isinstance(r, dict)]
    losses = [float(r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    bpbs = [float(r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
    if not losses and not bpbs:
        raise SystemExit(f"baseline error: {p} has no seed_results with val_loss or val_bpb (mean only: "
                         f"{sub.get('val_loss')}); pass --baseline-losses a,b,c instead")
    return losses, bpbs, sub.get("name") or p.parent.name


# ---------------------------------------------------------------------------------------------------------------
# The shipped script
# ---------------------------------------------------------------------------------------------------------------

def hyperparameter_overrides(script: Path, runs: list[SeedRun]) -> dict[str, str] | None:
    """Environment settings that reproduce the runs' config from the script's defaults (None: cannot tell)."""
    hp = config_of(runs[0]) if runs else {}
    if not hp:
        return None
    out = {"SMOKE": "1"} if int((runs[0].get("hyperparameters") or {}).get("smoke", 0) or 0) else {}
    try:
        module = load_module(script, "train_gpt_for_defaults")
        base = dataclasses.asdict(module.load_hyperparameters(dict(out)))
    except Exception:  # a script without load_hyperparameters: no way to know its defaults
        return None
    for key, value in sorted(hp.items()):
        if key in base and not values_equal(base[key], value):
            out[key.upper()] = str(int(value)) if isinstance(value, bool) else str(value)
    return out


def values_equal(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def dry_run_env(hp_keys, overrides: dict[str, str] | None) -> dict[str, str]:
    """The caller's environment without any config or launcher variable, plus the runs' settings and DRY_RUN=1."""
    drop = {k.upper() for k in set(hp_keys) | RUN_SPECIFIC_KEYS} | {"RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(overrides or {})
    env.update({"DRY_RUN": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def find_python(version: str) -> str | None:
    """A working python<version> on PATH or under pyenv, else None (a pyenv shim of a version not selected fails)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


def check_wrapped_script(wrapped_path: Path, source: str, env: dict[str, str] | None,
                         timeout_s: float = 300.0) -> list[Check]:
    """The shipped script unwraps to the minified source, parses as Python 3.10, compiles, and DRY_RUNs in place.

    env=None skips the DRY_RUN.
    """
    tg = train_gpt()
    wrapped = wrapped_path.read_text(encoding="utf-8")
    checks = [Check("wrapped_roundtrip", tg.unwrap_source(wrapped) == tg.minify_source(source),
                    "unwrap_source(shipped) == minify_source(source)")]
    try:
        for text in (wrapped, tg.unwrap_source(wrapped)):
            ast.parse(text, feature_version=(3, 10))
            compile(text, str(wrapped_path), "exec")
        how = f"parses as 3.10, compiles on {sys.version.split()[0]}"
        # feature_version does not cover the f-string grammar of Python >= 3.12 (quotes reused inside): a real 3.10
        # parser does, where one is installed
        py310 = find_python("3.10")
        if py310:
            proc = subprocess.run([py310, "-c", "import ast, sys; ast.parse(sys.stdin.read())"],
                                  input=tg.unwrap_source(wrapped), capture_output=True, text=True, timeout=60)
            if proc.returncode:
                raise SyntaxError(f"python3.10 cannot parse it: {proc.stderr.strip().splitlines()[-1]}")
            how += ", parses on python3.10"
        checks.append(Check("python310_syntax", True, how))
    except SyntaxError as e:
        checks.append(Check("python310_syntax", False, f"{type(e).__name__}: {e}"))
    if env is None:
        checks.append(Check("dry_run_in_folder", None, "skipped (--no-dry-run)"))
        return checks
    try:
        proc = subprocess.run([sys.executable, wrapped_path.name], cwd=wrapped_path.parent, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        output = proc.stdout + proc.stderr
        ok = proc.returncode == 0 and "model_params:" in output
        detail = "DRY_RUN=1 python3 train_gpt.py: exit 0, model_params line printed" if ok else \
            f"DRY_RUN=1 python3 train_gpt.py in the folder: exit {proc.returncode}" + \
            ("" if "model_params:" in output else ", no model_params line") + f"; output tail: {output[-600:]!r}"
    except subprocess.TimeoutExpired:
        ok, detail = False, f"DRY_RUN did not finish in {timeout_s:.0f}s"
    checks.append(Check("dry_run_in_folder", ok, detail))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------

def loss_curves(run: SeedRun) -> tuple[list, list]:
    train = [(e["step"], e["train_loss"]) for e in run.metrics if e.get("event") == "train" and "train_loss" in e]
    val = [(e["step"], e["val_loss"]) for e in run.metrics if e.get("event") == "val" and "val_loss" in e]
    return (train or run.log["train"]), (val or run.log["val"])


def plot_losses(runs: list[SeedRun], path: Path) -> bool:
    """Training and validation loss against step, one colour per seed. False if no run logged a loss."""
    curves = {r.seed: loss_curves(r) for r in runs}
    if not any(t or v for t, v in curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (seed, (train, val)) in enumerate(curves.items()):
        if train:
            ax.plot(*zip(*train), color=f"C{i}", lw=1.2, alpha=0.85, label=f"seed {seed} train")
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", ms=4, label=f"seed {seed} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Writing the folder
# ---------------------------------------------------------------------------------------------------------------

def eval_cell(run: SeedRun, predicate) -> str:
    labels = [lab for lab in run.evals if predicate(lab)]
    return f"{run.evals[labels[-1]]['val_bpb']:.8f}" if labels else "–"


TTT_TECHNIQUES = {  # TTT_MODE -> (keys, text), as in describe_techniques
    "score_first": (("ttt_enabled", "ttt_lr", "ttt_epochs", "ttt_chunk_tokens"),
                    "score-first test-time training (SGD lr {ttt_lr}, {ttt_epochs} epochs per {ttt_chunk_tokens}-token "
                    "chunk)"),
    "lora_phased": (("ttt_enabled", "ttt_lora_rank", "ttt_lora_lr", "ttt_chunk_size", "phased_ttt_num_phases",
                     "global_ttt_lr"),
                    "score-first test-time training: per-document LoRA (rank {ttt_lora_rank}, AdamW lr {ttt_lora_lr}, "
                    "a step per {ttt_chunk_size} scored predictions) and {phased_ttt_num_phases} global SGD phases "
                    "(lr {global_ttt_lr})"),
}


def describe_techniques(hp: dict) -> list[str]:
    """A plain list of what the config turns on, from the recorded hyperparameters (items whose keys are missing
    are left out, so a renamed setting drops a line rather than printing None)."""
    items = [
        (("vocab_size",), "SentencePiece BPE vocabulary {vocab_size}"),
        (("num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult"),
         "{num_layers} layers, width {model_dim}, {num_heads} heads / {num_kv_heads} KV heads, MLP x{mlp_mult}"),
        (("num_loops", "loop_start", "loop_end", "enable_looping_at"),
         "depth recurrence: layers {loop_start}-{loop_end} run {num_loops} extra times from {enable_looping_at} of "
         "training"),
        (("parallel_residual_start",), "parallel residuals from layer {parallel_residual_start}"),
        (("matrix_lr", "muon_wd"), "Muon for matrices (lr {matrix_lr}, wd {muon_wd}), AdamW for embeddings and scalars"),
        (("ema_decay",), "EMA of weights (decay {ema_decay})"),
        (("matrix_bits", "embed_bits", "compressor"),
         "GPTQ int{matrix_bits} matrices / int{embed_bits} embeddings, {compressor} compression"),
        (("sliding_window_enabled", "eval_stride"), "sliding-window eval (stride {eval_stride})"),
        TTT_TECHNIQUES.get(hp.get("ttt_mode", "score_first"), ((None,), "")),  # runs before TTT_MODE: score-first
    ]
    off = {"num_loops": 0, "parallel_residual_start": -1, "sliding_window_enabled": 0, "ttt_enabled": 0}
    out = []
    for keys, text in items:
        if all(hp.get(k) is not None for k in keys) and not any(k in off and hp[k] <= off[k] for k in keys):
            out.append(text.format(**hp))
    return out


def custom_tokenizer(done: list[SeedRun]) -> Path | None:
    """The tokenizer the runs used when it is not a published fineweb_<V>_bpe.model (a CaseOps one, say): it ships
    with the record, since the shards and the byte accounting depend on it."""
    hp = done[0].get("hyperparameters") or {}
    path = hp.get("tokenizer_path")
    if not path or int(hp.get("smoke", 0) or 0) or Path(path).name == f"fineweb_{hp.get('vocab_size', 8192)}_bpe.model":
        return None
    return Path(path)


def default_data_command(hp: dict) -> str:
    if int(hp.get("smoke", 0) or 0):
        return "# SMOKE=1 makes its own synthetic data: nothing to download"
    vocab = hp.get("vocab_size", 8192)
    if vocab == 1024:
        return "python3 data/cached_challenge_fineweb.py --variant sp1024"
    return (f"MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py "
            f"--variant sp{vocab} --train-shards 128")


def mark(ok: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "not checked"}[ok]


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


@dataclasses.dataclass
class Record:
    """Everything a records folder says, gathered before anything is rendered."""
    folder: Path
    runs: list[SeedRun]
    bytes_code: int  # the shipped (wrapped) train_gpt.py
    overrides: dict[str, str]
    folder_checks: list[Check]
    significance: dict | None
    warnings: list[str]
    run_info: dict
    data_command: str
    submission: dict = dataclasses.field(default_factory=dict)
    plotted: bool = False
    tokenizer: str | None = None  # file name of a shipped tokenizer the runs used instead of the published one

    @property
    def done(self) -> list[SeedRun]:
        return [r for r in self.runs if r.completed]

    @property
    def failures(self) -> list[str]:
        out = [f"seed {r.seed} {c.name} ({c.detail})" for r in self.runs for c in r.checks if c.ok is False]
        return out + [f"{c.name} ({c.detail})" for c in self.folder_checks if c.ok is False]

    def all_seeds_pass(self, check_name: str) -> bool:
        return all(next((c.ok for c in r.checks if c.name == check_name), False) for r in self.runs)

    def folder_pass(self, *names: str) -> bool:
        return all(c.ok is not False for c in self.folder_checks if c.name in names)


def ship_script(script: Path) -> tuple[str, str]:
    """(source, wrapped) of the script to ship; an already wrapped script is shipped as it is."""
    tg = train_gpt()
    text = script.read_text(encoding="utf-8")
    if text.startswith(tg.WRAPPER_PREFIX):
        return tg.unwrap_source(text), text
    return text, tg.wrap_source(text)


def seed_result(run: SeedRun) -> dict:
    if not run.completed:
        return {"status": run.status, "rc": (run.run_status or {}).get("rc")}
    res = {k: run.get(k) for k in ("val_loss", "val_bpb", "artifact_bytes", "total_bytes", "steps", "train_time_s",
                                   "eval_time_s")}
    ttt_labels = [lab for lab in run.evals if "ttt" in lab]
    if ttt_labels:
        res["ttt_eval_time_s"] = run.evals[ttt_labels[-1]].get("eval_time_s")
    res["evals"] = {lab: {k: v.get(k) for k in ("val_loss", "val_bpb", "eval_time_s")} for lab, v in run.evals.items()}
    return res


def build_submission(rec: Record, *, name: str, date: str, author: str | None, github_id: str | None, blurb: str,
                     technique_summary: str) -> dict:
    done = rec.done
    loss_mean, loss_std = mean_std([float(r.get("val_loss")) for r in done])
    bpb_mean, bpb_std = mean_std([float(r.get("val_bpb")) for r in done])
    artifact = [int(r.get("artifact_bytes") or 0) for r in done]
    final_label = done[0].get("final_label")
    sig = rec.significance
    return {
        "author": author or os.environ.get("AUTHOR") or "unknown",
        "github_id": github_id or os.environ.get("GITHUB_ID") or "unknown",
        "name": name,
        "date": date,
        "track": "10min_16mb",
        "submittable": not rec.failures,
        "val_bpb": round(bpb_mean, 8),
        "val_loss": round(loss_mean, 8),
        "val_bpb_std": round(bpb_std, 8),
        "val_loss_std": round(loss_std, 8),
        "final_label": final_label,
        "bytes_total": max(max(int(r.get("total_bytes") or 0) for r in done), max(artifact) + rec.bytes_code),
        "bytes_code": rec.bytes_code,
        "seeds": [r.seed for r in rec.runs],
        "seed_results": {str(r.seed): seed_result(r) for r in rec.runs},
        "hardware": f"{done[0].get('world_size')}x{done[0].get('gpu')}",
        "pytorch_version": ", ".join(sorted({str(r.get("torch_version")) for r in done})),
        "blurb": blurb or f"{len(done)}-seed run of train_gpt.py; final metric {final_label}.",
        "technique_summary": technique_summary or "; ".join(describe_techniques(done[0].get("hyperparameters") or {})),
        "compliance": {
            "train_under_600s": rec.all_seeds_pass("train_under_600s"),
            "artifact_under_16mb": rec.all_seeds_pass("artifact_under_16mb")
            and rec.folder_pass("shipped_total_under_16mb"),
            "eval_under_600s": rec.all_seeds_pass("eval_under_600s"),
            "score_first_ttt": rec.all_seeds_pass("score_first_ttt"),
            "ttt_mode": sorted({str((r.get("ttt") or {}).get("mode")) for r in done}),
            "coverage_complete": rec.all_seeds_pass("coverage_complete"),
            "three_seeds": len(done) >= MIN_SEEDS,
            "all_seeds_completed": len(done) == len(rec.runs),
            "logs_match_summary": rec.all_seeds_pass("log_matches_summary"),
            "hardware_8xh100": rec.all_seeds_pass("hardware_8xh100"),
            "not_smoke": rec.all_seeds_pass("not_smoke"),
            "wrapped_script_ok": rec.folder_pass("wrapped_roundtrip", "python310_syntax", "dry_run_in_folder"),
            "significant_improvement": None if sig is None else sig["significant"],
            "failed_checks": rec.failures,
        },
        "significance": sig,
        "artifact_bytes_mean": round(sum(artifact) / len(artifact), 1),
        "artifact_bytes_max": max(artifact),
        "train_time_s_mean": round(mean_std([float(r.get("train_time_s") or 0) for r in done])[0], 3),
        "eval_time_s_mean": round(mean_std([float(r.get("eval_time_s") or 0) for r in done])[0], 3),
        "reproducibility_notes": {k: rec.run_info[k] for k in ("git_commit", "git_dirty", "command", "nproc")
                                  if k in rec.run_info},
    }


def render_readme(rec: Record) -> str:
    done, sub, sig = rec.done, rec.submission, rec.significance
    lines = [f"# {sub['name']}: val_bpb {fmt(sub['val_bpb'], '.5f')} "
             f"({len(done)}-seed mean, std {fmt(sub['val_bpb_std'], '.5f')})", ""]
    if not sub["submittable"]:
        lines += ["> **NOT SUBMITTABLE** — failed checks: " + "; ".join(rec.failures), ""]
    lines += [f"val_loss {fmt(sub['val_loss'], '.5f')} nats (std {fmt(sub['val_loss_std'], '.5f')}), "
              f"max total size {sub['bytes_total']:,} bytes, hardware {sub['hardware']}, PyTorch "
              f"{sub['pytorch_version']}. Author: {sub['author']} ({sub['github_id']}). Date {sub['date']}.", "",
              sub["blurb"], ""]

    lines += ["## Results", "",
              "| seed | steps | pre-quant bpb | quantized bpb | sliding bpb | TTT bpb | final val_loss | artifact bytes "
              "| total bytes | train time | eval time |", "|" + "---|" * 11]
    for run in rec.runs:
        if not run.completed:
            lines.append(f"| {run.seed} | {run.status.upper()} |" + " |" * 9)
            continue
        cells = [eval_cell(run, pred) for _, pred in EVAL_COLUMNS]
        lines.append(f"| {run.seed} | {run.get('steps')} | " + " | ".join(cells) +
                     f" | {run.get('val_loss'):.8f} | {run.get('artifact_bytes'):,} | {run.get('total_bytes'):,} | "
                     f"{fmt(run.get('train_time_s'), '.1f')} s | {fmt(run.get('eval_time_s'), '.1f')} s |")
    lines += [f"| **mean** | | | | | | **{sub['val_loss']:.8f}** (bpb **{sub['val_bpb']:.8f}**) | "
              f"{sub['artifact_bytes_mean']:,.0f} | {sub['bytes_total']:,} (max) | "
              f"{sub['train_time_s_mean']:.1f} s | {sub['eval_time_s_mean']:.1f} s |",
              f"| **std** | | | | | | {sub['val_loss_std']:.8f} (bpb {sub['val_bpb_std']:.8f}) | | | | |", "",
              f"Final metric: `{sub['final_label']}`. Std is the sample standard deviation (n-1). Code: "
              f"{sub['bytes_code']:,} bytes (the LZMA-wrapped `train_gpt.py` in this folder).", ""]
    if rec.plotted:
        lines += ["![training and validation loss](loss_curves.png)", ""]

    lines += ["## Significance", ""]
    if sig is None:
        lines += ["No baseline given (`--baseline` or `--baseline-losses`); no test was run.", ""]
    elif sig.get("p_value") is None:
        lines += [f"Not computable against {sig['baseline']}: {sig.get('reason')}.", ""]
    else:
        lines += [f"One-sided Welch t-test of the per-seed val_loss (nats) against **{sig['baseline']}** "
                  f"(losses {', '.join(f'{x:.8f}' for x in sig['baseline_losses'])}); H1: the improvement exceeds "
                  f"{sig['margin_nats']} nats.", "",
                  f"mean delta {sig['mean_delta_nats']:+.6f} nats (new - baseline), t = {sig['t']:.4f}, "
                  f"df = {fmt(sig['df'], '.2f')}, p = {sig['p_value']:.3g}: "
                  + ("**significant** (p < " if sig["significant"] else "**not significant** (p >= ")
                  + f"{sig['alpha']})." + (f" Note: {sig['note']}." if sig.get("note") else ""), ""]

    lines += ["## Techniques", ""]
    lines += [f"- {t}" for t in sub["technique_summary"].split("; ") if t] or ["(not recorded)"]
    if rec.overrides:
        lines += ["", "Settings that differ from the script's defaults: "
                  + ", ".join(f"`{k}={v}`" for k, v in rec.overrides.items()) + "."]
    lines += [""]

    lines += ["## Compliance", "", "Issue #1017's conditions for a legal score:", ""]
    lines += [f"{i}. **{name}** — {text}" for i, (name, text) in enumerate(ISSUE_1017_CONDITIONS, 1)]
    lines += ["", f"Checks per seed, from each seed's `summary.json` and log (caps: total bytes <= {SIZE_CAP_BYTES:,}, "
              f"training <= {TRAIN_CAP_S:.0f} s incl. GPTQ Hessians, evaluation <= {EVAL_CAP_S:.0f} s):", ""]
    names = [c.name for c in max((r.checks for r in rec.runs), key=len)]
    lines += ["| seed | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for run in rec.runs:
        by_name = {c.name: c for c in run.checks}
        lines.append(f"| {run.seed} | " + " | ".join(mark(by_name[n].ok) if n in by_name else "–" for n in names)
                     + " |")
    lines += ["", "Details:", ""]
    lines += [f"- seed {r.seed}: " + "; ".join(f"{c.name}: {c.detail}" for c in r.checks if c.detail) for r in rec.runs]
    lines += ["", "Folder checks:", ""]
    lines += [f"- {c.name}: {mark(c.ok)} — {c.detail}" for c in rec.folder_checks]
    if rec.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in rec.warnings]
    lines += [""]

    env = "".join(f"{k}={v} " for k, v in rec.overrides.items())
    folder_env = env + (f"TOKENIZER_PATH={rec.tokenizer} " if rec.tokenizer else "")
    seeds = ",".join(str(r.seed) for r in rec.runs)
    world = done[0].get("world_size") or 8
    one_seed = "python3 train_gpt.py" if world == 1 and done[0].get("gpu") == "cpu" else \
        f"torchrun --standalone --nproc_per_node={world} train_gpt.py"
    try:
        folder_rel = rec.folder.resolve().relative_to(REPO_ROOT)
        data_dir = os.path.relpath(REPO_ROOT / "data", rec.folder.resolve())
    except ValueError:
        folder_rel, data_dir = Path("records/track_10min_16mb") / rec.folder.name, "../../../data"
    lines += ["## Reproduction", "", "```bash",
              "# from the repository root: dependencies (install torch for your CUDA first) and data",
              "pip install -r requirements.txt",
              rec.data_command,
              "# all seeds, then this folder again (run.sh calls records/make_record.py)",
              f"{env}SEEDS={seeds} NAME={sub['name']} ./run.sh",
              "# or one seed from inside this folder",
              f"cd {folder_rel}",
              f"{folder_env}{'' if 'SMOKE' in rec.overrides else f'DATA_DIR={data_dir} '}SEED={rec.runs[0].seed} "
              f"{one_seed}", "```", ""]
    if rec.tokenizer:
        lines += [f"The runs used the tokenizer `{rec.tokenizer}` (in this folder), not the published one: build the "
                  f"shards with it (`data/build_shards.py --tokenizer {rec.tokenizer}`, see `data/README.md`) and "
                  "point `DATA_PATH` at them.", ""]
    if rec.run_info:
        lines += [f"Runs made from commit `{rec.run_info.get('git_commit', '?')}`"
                  + (" (with uncommitted changes to the script)" if rec.run_info.get("git_dirty") else "")
                  + f" with `{rec.run_info.get('command', './run.sh')}`.", ""]
    attention = sorted({str(r.get("attention")) for r in done if r.get("attention")})
    lines += ["Software: Python " + ", ".join(sorted({str(r.get('python_version')) for r in done}))
              + ", PyTorch " + sub["pytorch_version"] + (", attention " + ", ".join(attention) if attention else "")
              + ".", ""]
    if "fa4" in attention:
        lines += ["The runs used FlashAttention-4: install it as the repository README says (Dependencies) to train "
                  "at their speed; without it the script falls back to PyTorch's attention.", ""]

    lines += ["## Included files", "",
              "- `train_gpt.py` — the training script, LZMA/base85 self-extracting (runs from this folder)",
              "- `submission.json` — results, per-seed figures, compliance and significance",
              *[f"- `train_seed{r.seed}.log` — seed {r.seed}'s log" for r in rec.runs if r.log_path],
              "- `requirements.txt` — Python packages besides torch",
              *([f"- `{rec.tokenizer}` — the tokenizer the runs used"] if rec.tokenizer else [])]
    if rec.plotted:
        lines += ["- `loss_curves.png` — training and validation loss per seed"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def staged_folder(final_folder: Path):
    """Build in a hidden sibling folder; replace final_folder only when everything was written."""
    partial = final_folder.with_name(f".{final_folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final_folder, ignore_errors=True)
    partial.rename(final_folder)


def significance_against(losses: list[float], bpbs: list[float], baseline: str | None,
                         baseline_losses: list[float] | None, margin: float, alpha: float) -> dict | None:
    """The Welch test on per-token val_loss, which compares only under one tokenization: a baseline whose bytes per
    token (val_loss / (val_bpb ln 2)) differ by over 1% gets no verdict; a baseline with val_bpb only (the official
    records) is converted at this run's bytes per token."""
    note = ""
    if baseline:
        baseline_losses, baseline_bpbs, baseline_name = baseline_scores_from(baseline)
        per_token = mean_std([l / (b * LN2) for l, b in zip(losses, bpbs)])[0]  # bytes per token of this run
        if baseline_losses and baseline_bpbs:
            theirs = mean_std([l / (b * LN2) for l, b in zip(baseline_losses, baseline_bpbs)])[0]
            if abs(theirs / per_token - 1) > 0.01:
                return {**welch_improvement_test([], []), "baseline": baseline_name, "baseline_losses": baseline_losses,
                        "reason": f"the baseline tokenizes otherwise ({theirs:.4f} vs {per_token:.4f} bytes per token):"
                                  " per-token nats do not compare; compare val_bpb"}
        elif not baseline_losses:
            baseline_losses = [b * LN2 * per_token for b in baseline_bpbs]
            note = "baseline val_loss from its per-seed val_bpb at this run's bytes per token (same tokenizer assumed)"
    elif baseline_losses:
        baseline_name = "the given baseline losses"
    else:
        return None
    sig = welch_improvement_test(losses, baseline_losses, margin, alpha)
    return {**sig, "baseline": baseline_name, "baseline_losses": list(baseline_losses), "note": note}


def folder_level_checks(runs: list[SeedRun], bytes_code: int, sig: dict | None) -> list[Check]:
    done = [r for r in runs if r.completed]
    artifact_max = max(int(r.get("artifact_bytes") or 0) for r in done)
    checks = [
        Check("shipped_total_under_16mb", artifact_max + bytes_code <= SIZE_CAP_BYTES,
              f"largest artifact {artifact_max} + shipped code {bytes_code} = {artifact_max + bytes_code} bytes"),
        Check("three_seeds", len(done) >= MIN_SEEDS, f"{len(done)} completed seeds (need {MIN_SEEDS})"),
        Check("all_seeds_completed", len(done) == len(runs), ", ".join(f"seed {r.seed}: {r.status}" for r in runs)),
        Check("same_config_all_seeds", all(config_of(r) == config_of(done[0]) for r in done),
              "hyperparameters (other than seed and paths) agree across seeds"),
        Check("same_data_all_seeds", len({json.dumps(r.get("data"), sort_keys=True) for r in done
                                          if r.get("data")}) <= 1,
              "training and validation shards (names and sizes: summary.json `data`) agree across seeds; "
              + "; ".join(f"seed {r.seed}: {r.get('data')}" for r in done)),
    ]
    if sig is not None:
        detail = sig.get("reason", "") if sig["p_value"] is None else \
            f"p = {sig['p_value']:.3g}, mean delta {sig['mean_delta_nats']:+.6f} nats (need an improvement > " \
            f"{sig['margin_nats']} nats at p < {sig['alpha']})"
        checks.append(Check("significant_improvement", sig["significant"], detail))
    return checks


def assemble(runs_dir: str | os.PathLike, *, name: str | None = None, out_root: str | os.PathLike | None = None,
             date: str | None = None, author: str | None = None, github_id: str | None = None, blurb: str = "",
             technique_summary: str = "", baseline: str | None = None, baseline_losses: list[float] | None = None,
             margin: float = MARGIN_NATS, alpha: float = ALPHA, script: str | os.PathLike | None = None,
             dry_run: bool = True, force: bool = False, data_command: str | None = None) -> dict:
    """Build the records folder; returns {folder, submittable, failures, warnings, submission}."""
    runs_dir = Path(runs_dir)
    runs = load_runs(runs_dir)
    if not runs:
        raise SystemExit(f"error: no seed_<S> folders in {runs_dir}")
    done = [r for r in runs if r.completed]
    if not done:
        raise SystemExit(f"error: no seed in {runs_dir} completed: " + "; ".join(incomplete_reason(r) for r in runs))
    run_info = read_json(runs_dir / "run_info.json") or {}
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or run_info.get("name") or runs_dir.name).strip("_") or "run"
    date = date or datetime.date.today().isoformat()
    final_folder = (Path(out_root) if out_root else REPO_ROOT / "records" / "track_10min_16mb") / f"{date}_{name}"
    if final_folder.exists() and not force:
        raise SystemExit(f"error: {final_folder} exists; pass --force to rebuild it")
    # The script: run.sh's snapshot of the code that ran, else the repository's.
    script = Path(script) if script else next(p for p in (runs_dir / "train_gpt.py", REPO_ROOT / "train_gpt.py")
                                              if p.is_file())
    source, wrapped = ship_script(script)
    bytes_code = len(wrapped.encode("utf-8"))
    sig = significance_against([float(r.get("val_loss")) for r in done], [float(r.get("val_bpb")) for r in done],
                               baseline, baseline_losses, margin, alpha)
    hp = done[0].get("hyperparameters") or {}

    warnings = []
    for run in runs:
        run.checks = check_seed(run)
        warnings += [f"seed {run.seed} {c.name} not checked: {c.detail}" for c in run.checks if c.ok is None]
        if run.completed and run.get("code_bytes") not in (None, bytes_code):
            warnings.append(f"seed {run.seed} counted {run.get('code_bytes')} code bytes but the shipped train_gpt.py "
                            f"is {bytes_code} bytes: was the code changed after the run?")
    warnings += bpb_consistency_warnings(done)
    if sig is None:
        warnings.append("no baseline given: significance against the previous record not tested")
    overrides = hyperparameter_overrides(script, done)
    if overrides is None:
        warnings.append("could not derive the config's environment settings (no hyperparameters in summary.json, "
                        "or the script has no load_hyperparameters); the reproduction command shows defaults")

    tokenizers = {(r.get("hyperparameters") or {}).get("tokenizer_path") for r in done}
    if len(tokenizers) > 1:
        warnings.append(f"the seeds used different tokenizers: {sorted(map(str, tokenizers))}")
    tokenizer = custom_tokenizer(done)
    if tokenizer is not None and not tokenizer.is_file():
        warnings.append(f"the runs used the tokenizer {tokenizer}, which is not here: not shipped")
        tokenizer = None

    with staged_folder(final_folder) as folder:
        (folder / "train_gpt.py").write_text(wrapped, encoding="utf-8")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, folder / tokenizer.name)
        for run in runs:
            if run.log_path:
                shutil.copyfile(run.log_path, folder / f"train_seed{run.seed}.log")
        env = dry_run_env(hp, overrides) if dry_run else None
        folder_checks = check_wrapped_script(folder / "train_gpt.py", source, env)
        folder_checks += folder_level_checks(runs, bytes_code, sig)
        warnings += [f"{c.name} not checked: {c.detail}" for c in folder_checks if c.ok is None]
        rec = Record(final_folder, runs, bytes_code, overrides or {}, folder_checks, sig, warnings, run_info,
                     data_command or default_data_command(hp), tokenizer=tokenizer.name if tokenizer else None)
        rec.submission = build_submission(rec, name=name, date=date, author=author, github_id=github_id, blurb=blurb,
                                          technique_summary=technique_summary)
        (folder / "submission.json").write_text(json.dumps(rec.submission, indent=2, allow_nan=False) + "\n",
                                                encoding="utf-8")
        req = REPO_ROOT / "requirements.txt"
        (folder / "requirements.txt").write_text(
            f"# torch {rec.submission['pytorch_version']} was used (install it for your CUDA version first)\n"
            + (req.read_text(encoding="utf-8") if req.is_file() else "numpy\nsentencepiece\nbrotli\n"),
            encoding="utf-8")
        rec.plotted = plot_losses(runs, folder / "loss_curves.png")
        if not rec.plotted:
            warnings.append("no train/val losses in metrics.jsonl or the logs: no plot")
        (folder / "README.md").write_text(render_readme(rec), encoding="utf-8")
    return {"folder": final_folder, "submittable": not rec.failures, "failures": rec.failures, "warnings": warnings,
            "submission": rec.submission}


def print_report(result: dict) -> None:
    """Results to stdout; warnings and failed checks to stderr."""
    stream_ok, stream_bad = sys.stdout, sys.stderr
    sub = result["submission"]
    print(f"records folder: {result['folder']}", file=stream_ok)
    for seed, r in sub["seed_results"].items():
        if "val_bpb" in r:
            print(f"  seed {seed}: val_bpb {r['val_bpb']:.8f} val_loss {r['val_loss']:.8f} total {r['total_bytes']} B "
                  f"train {fmt(r['train_time_s'], '.1f')} s eval {fmt(r['eval_time_s'], '.1f')} s", file=stream_ok)
        else:
            print(f"  seed {seed}: {r['status']} (exit code {r['rc']})", file=stream_ok)
    print(f"  mean val_bpb {sub['val_bpb']:.8f} (std {sub['val_bpb_std']:.8f}), val_loss {sub['val_loss']:.8f}",
          file=stream_ok)
    sig = sub["significance"]
    if sig and sig.get("p_value") is not None:
        print(f"  Welch vs {sig['baseline']}: delta {sig['mean_delta_nats']:+.6f} nats, t {sig['t']:.3f}, "
              f"df {fmt(sig['df'], '.2f')}, p {sig['p_value']:.3g} -> "
              f"{'significant' if sig['significant'] else 'NOT significant'}", file=stream_ok)
    for w in result["warnings"]:
        print(f"warning: {w}", file=stream_bad)
    if result["failures"]:
        bar = "!" * 78
        print(f"{bar}\nNOT SUBMITTABLE: {len(result['failures'])} failed check(s):", file=stream_bad)
        for f in result["failures"]:
            print(f"  FAIL {f}", file=stream_bad)
        print(bar, file=stream_bad)


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(" ", "").split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", required=True, help="folder with seed_<S>/ subfolders (run.sh's RUNS_DIR)")
    ap.add_argument("--name", help="short description for the folder name (default: run.sh's NAME or the runs dir)")
    ap.add_argument("--out-root", help="where the folder goes (default: records/track_10min_16mb)")
    ap.add_argument("--date", help="YYYY-MM-DD (default: today)")
    ap.add_argument("--author", help="default: $AUTHOR")
    ap.add_argument("--github-id", help="default: $GITHUB_ID")
    ap.add_argument("--blurb", default="", help="one-paragraph description for submission.json and the README")
    ap.add_argument("--technique-summary", default="", help="default: derived from the hyperparameters")
    base = ap.add_mutually_exclusive_group()
    base.add_argument("--baseline", help="records folder (or its submission.json) with per-seed val_loss")
    base.add_argument("--baseline-losses", type=parse_floats, help="comma-separated per-seed val_loss in nats")
    ap.add_argument("--margin", type=float, default=MARGIN_NATS, help="required improvement in nats (0.005)")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="significance level (0.01)")
    ap.add_argument("--script", help="train_gpt.py to ship (default: the runs dir's snapshot, else the repo's)")
    ap.add_argument("--data-command", help="data download command for the README")
    ap.add_argument("--no-dry-run", action="store_true", help="skip DRY_RUN=1 of the shipped script")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    ap.add_argument("--allow-fail", action="store_true", help="exit 0 even if a check fails")
    args = ap.parse_args(argv)
    try:
        result = assemble(args.runs_dir, name=args.name, out_root=args.out_root, date=args.date, author=args.author,
                          github_id=args.github_id, blurb=args.blurb, technique_summary=args.technique_summary,
                          baseline=args.baseline, baseline_losses=args.baseline_losses, margin=args.margin,
                          alpha=args.alpha, script=args.script, dry_run=not args.no_dry_run, force=args.force,
                          data_command=args.data_command)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    print_report(result)
    return 0 if result["submittable"] or args.allow_fail else 1


if __name__ == "__main__":
    sys.exit(main())
