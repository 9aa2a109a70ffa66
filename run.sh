#!/usr/bin/env bash
# Multi-seed runner: preflight, one train_gpt.py run per seed, then records/make_record.py.
#
#   SEEDS=42,314,999 NAME=MyIdea ./run.sh            # 8xH100: three seeds -> records/track_10min_16mb/<date>_MyIdea
#   SMOKE=1 SEEDS=1,2 ./run.sh                        # CPU smoke test of the whole workflow
#
# Settings (all optional): SEEDS (42,314,999), NPROC (number of GPUs, 1 without), NAME (run_<time>, smoke_<time>
# with SMOKE=1), RUNS_DIR (runs/<NAME>), SEED_TIMEOUT seconds per seed (2400; 900 with SMOKE=1), MIN_FREE_MB (4096;
# 200 with SMOKE=1), SKIP_DONE=1 (keep seeds that already completed in RUNS_DIR, rerun the rest), OVERWRITE=1
# (delete RUNS_DIR's seed folders first, other seeds' too), BASELINE (records folder to test significance against),
# RECORD_ARGS (extra make_record.py arguments), RECORDS_ROOT (where the folder goes; RUNS_DIR/records with SMOKE=1),
# ASSEMBLE=0 (skip make_record.py), PYTHON (python3), TRAIN_SCRIPT (train_gpt.py).
# Everything else in the environment (hyperparameters, DATA_DIR, ...) passes through to train_gpt.py.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")" || exit 1
PYTHON=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-train_gpt.py}
SMOKE=${SMOKE:-0}
SEEDS=${SEEDS:-42,314,999}
stamp=$(date -u +%Y%m%d_%H%M%S)
if [ "$SMOKE" = 1 ]; then NAME=${NAME:-smoke_$stamp}; else NAME=${NAME:-run_$stamp}; fi
RUNS_DIR=${RUNS_DIR:-runs/$NAME}
if [ "$SMOKE" = 1 ]; then SEED_TIMEOUT=${SEED_TIMEOUT:-900}; MIN_FREE_MB=${MIN_FREE_MB:-200}
else SEED_TIMEOUT=${SEED_TIMEOUT:-2400}; MIN_FREE_MB=${MIN_FREE_MB:-4096}; fi

say() { printf '[run.sh] %s\n' "$*"; }
die() { printf '[run.sh] PREFLIGHT FAILED: %s\n' "$*" >&2; exit 2; }

IFS=',' read -r -a seed_list <<< "${SEEDS// /}"
[ "${#seed_list[@]}" -gt 0 ] || die "SEEDS is empty"
declare -A listed=()
for s in "${seed_list[@]}"; do
  [[ "$s" =~ ^[0-9]+$ ]] || die "SEEDS must be comma-separated integers, got '$SEEDS'"
  [ -z "${listed[$s]:-}" ] || die "seed $s is listed twice in SEEDS=$SEEDS (a repeated seed is no new evidence)"
  listed[$s]=1
done
[[ "$NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "NAME may hold only letters, digits, '_', '.' and '-', got '$NAME'"
[[ "$SEED_TIMEOUT" =~ ^[0-9]+$ ]] || die "SEED_TIMEOUT must be a whole number of seconds, got '$SEED_TIMEOUT'"
[ -f "$TRAIN_SCRIPT" ] || die "$TRAIN_SCRIPT not found in $(pwd)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=...)"
command -v timeout >/dev/null || die "the 'timeout' command (coreutils) is missing"

# --- preflight 1: python packages, GPUs -------------------------------------------------------------------------
ngpu=$(ASSEMBLE="${ASSEMBLE:-1}" "$PYTHON" - <<'EOF'
import importlib, os, sys
assemble = os.environ["ASSEMBLE"] == "1"  # records/make_record.py needs scipy (Welch test) and matplotlib (plot)
missing = []
for name in ("torch", "numpy", "sentencepiece", "brotli") + (("scipy", "matplotlib") if assemble else ()):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("missing Python packages: " + "; ".join(missing) + ". Install them: pip install -r requirements.txt"
             + (" scipy matplotlib (records assembly; or ASSEMBLE=0)" if assemble else ""))
import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)
EOF
) || die "python imports failed (see above)"
NPROC=${NPROC:-$(( ngpu > 0 ? ngpu : 1 ))}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
if [ "$NPROC" -eq 1 ] && [ "$ngpu" -eq 0 ]; then
  launch=("$PYTHON" "$RUNS_DIR/train_gpt.py")
else
  launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$RUNS_DIR/train_gpt.py")
fi

# --- runs dir and the code snapshot (every seed runs the same code, and that code is what gets shipped) ----------
mkdir -p "$RUNS_DIR" || die "cannot create RUNS_DIR=$RUNS_DIR"
for d in "$RUNS_DIR"/seed_*; do  # seeds of an earlier run under this NAME would be assembled with these
  s=${d##*/seed_}
  [[ "$s" =~ ^[0-9]+$ ]] && [ -z "${listed[$s]:-}" ] && [ -n "$(ls -A "$d")" ] || continue
  if [ "${OVERWRITE:-0}" = 1 ]; then rm -rf "$d"
  else die "$d is from another run (seed $s is not in SEEDS=$SEEDS); use another NAME, or OVERWRITE=1 to start over"
  fi
done
for s in "${seed_list[@]}"; do
  d="$RUNS_DIR/seed_$s"
  [ -d "$d" ] && [ -n "$(ls -A "$d")" ] || continue
  if [ "${OVERWRITE:-0}" = 1 ]; then rm -rf "$d"
  elif [ "${SKIP_DONE:-0}" != 1 ]; then
    die "$d already has outputs; set SKIP_DONE=1 to keep completed seeds, OVERWRITE=1 to start over, or another NAME"
  fi
done
if [ -f "$RUNS_DIR/train_gpt.py" ] && [ "${SKIP_DONE:-0}" = 1 ] && [ "${OVERWRITE:-0}" != 1 ] \
   && ! cmp -s "$RUNS_DIR/train_gpt.py" "$TRAIN_SCRIPT"; then
  die "$TRAIN_SCRIPT changed since the seeds in $RUNS_DIR ran; SKIP_DONE would mix code versions (use OVERWRITE=1)"
fi
cp "$TRAIN_SCRIPT" "$RUNS_DIR/train_gpt.py"

# --- preflight 2: config (DRY_RUN), data, GPU count, disk -----------------------------------------------------------
say "preflight: DRY_RUN=1 of $TRAIN_SCRIPT on $NPROC process(es)"
DRY_RUN=1 SEED="${seed_list[0]}" RUN_ID="${NAME}_preflight" ARTIFACT_DIR="$RUNS_DIR/preflight" \
  timeout 600 "${launch[@]}" > "$RUNS_DIR/preflight.log" 2>&1
rc=$?
if [ $rc -ne 0 ] || ! grep -q '^model_params:' "$RUNS_DIR/preflight.log"; then
  tail -n 25 "$RUNS_DIR/preflight.log" >&2
  die "DRY_RUN=1 of $TRAIN_SCRIPT exited $rc$(grep -q '^model_params:' "$RUNS_DIR/preflight.log" || echo ' without a model_params line') (log: $RUNS_DIR/preflight.log)"
fi
say "preflight: config ok, $(grep -m1 '^model_params:' "$RUNS_DIR/preflight.log")"
hp() { sed -n "s/^  $1: //p" "$RUNS_DIR/preflight.log" | head -n 1; }
if [ "$SMOKE" != 1 ]; then
  data_path=$(hp data_path); tok=$(hp tokenizer_path); val_glob=$(hp val_files)
  train_glob=$data_path/fineweb_train_*.bin
  [ -n "$data_path" ] || die "the DRY_RUN output names no data_path"
  compgen -G "$train_glob" >/dev/null || die "no training shards match $train_glob. Download the data first, e.g.
    MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 128
  or set DATA_DIR / DATA_PATH"
  compgen -G "${val_glob:-$data_path/fineweb_val_*.bin}" >/dev/null || die "no validation shards match ${val_glob:-$data_path/fineweb_val_*.bin}"
  [ -f "$tok" ] || die "tokenizer $tok not found (set TOKENIZER_PATH or download the data)"
  say "preflight: data ok ($(compgen -G "$train_glob" | wc -l) train shards, tokenizer $tok)"
  [ "$ngpu" -ge "$NPROC" ] || die "$ngpu CUDA GPU(s) visible but NPROC=$NPROC (SMOKE=1 runs on CPU)"
fi
free_mb=$(df -Pm "$RUNS_DIR" | awk 'NR==2 {print $4}')
[ "${free_mb:-0}" -ge "$MIN_FREE_MB" ] || die "only ${free_mb} MB free under $RUNS_DIR (need MIN_FREE_MB=$MIN_FREE_MB)"
say "preflight: ${free_mb} MB free, $ngpu GPU(s), NPROC=$NPROC, seeds ${seed_list[*]}, timeout ${SEED_TIMEOUT}s per seed"

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=false; [ -n "$(git status --porcelain -- "$TRAIN_SCRIPT" 2>/dev/null)" ] && dirty=true
seeds_json=$(IFS=,; echo "${seed_list[*]}")
cat > "$RUNS_DIR/run_info.json" <<EOF
{"name": "$NAME", "seeds": [$seeds_json], "nproc": $NPROC, "smoke": $SMOKE, "git_commit": "$commit",
 "git_dirty": $dirty, "command": "SEEDS=$seeds_json NAME=$NAME ./run.sh", "started_utc": "$stamp"}
EOF

# --- seeds ------------------------------------------------------------------------------------------------------
failed=()
for s in "${seed_list[@]}"; do
  d="$RUNS_DIR/seed_$s"
  if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$d/summary.json" ] && grep -q '"rc": 0' "$d/run_status.json" 2>/dev/null; then
    say "seed $s: already completed, kept"
    continue
  fi
  [ -d "$d" ] && [ -n "$(ls -A "$d")" ] && mv "$d" "$(mktemp -u "$d.failed_$(date -u +%H%M%S)_XXXX")"
  mkdir -p "$d"
  say "seed $s: running (log: $d/console.log)"
  t0=$(date +%s)
  # In the background and waited for: timeout runs the trainer in a process group of its own, which a Ctrl-C at the
  # terminal does not reach, so the trap passes it on and run.sh stops instead of starting the next seed.
  SEED="$s" RUN_ID="${NAME}_seed$s" ARTIFACT_DIR="$d" PYTHONUNBUFFERED=1 \
    timeout --kill-after=60 "$SEED_TIMEOUT" "${launch[@]}" > "$d/console.log" 2>&1 &
  trainer=$!
  trap 'kill -TERM "$trainer" 2>/dev/null; wait "$trainer"; printf "[run.sh] interrupted during seed %s\n" "$s" >&2; exit 130' INT TERM
  wait "$trainer"
  rc=$?
  trap - INT TERM
  wall=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124) status=timeout ;;
    137) if [ "$wall" -ge "$SEED_TIMEOUT" ]; then status=timeout; else status=failed; fi ;;  # else killed (OOM?)
    *) status=failed ;;
  esac
  [ $status = ok ] && [ ! -f "$d/summary.json" ] && status=failed
  printf '{"seed": %s, "rc": %s, "status": "%s", "wall_s": %s}\n' "$s" "$rc" "$status" "$wall" > "$d/run_status.json"
  if [ $status = ok ]; then
    say "seed $s: ok in ${wall}s"
  else
    failed+=("$s")
    printf '[run.sh] seed %s: %s (exit code %s after %ss); last lines of %s:\n' "$s" "${status^^}" "$rc" "$wall" \
      "$d/console.log" >&2
    tail -n 20 "$d/console.log" >&2
  fi
done

# --- records folder ---------------------------------------------------------------------------------------------
rec_rc=0
if [ "${ASSEMBLE:-1}" = 1 ]; then
  args=(--runs-dir "$RUNS_DIR" --name "$NAME")
  [ "$SMOKE" = 1 ] && args+=(--allow-fail --out-root "${RECORDS_ROOT:-$RUNS_DIR/records}")
  [ "$SMOKE" != 1 ] && [ -n "${RECORDS_ROOT:-}" ] && args+=(--out-root "$RECORDS_ROOT")
  [ -n "${BASELINE:-}" ] && args+=(--baseline "$BASELINE")
  # shellcheck disable=SC2206  # RECORD_ARGS is split on purpose
  [ -n "${RECORD_ARGS:-}" ] && args+=(${RECORD_ARGS})
  say "assembling: $PYTHON records/make_record.py ${args[*]}"
  "$PYTHON" records/make_record.py "${args[@]}"
  rec_rc=$?
fi
if [ ${#failed[@]} -gt 0 ]; then
  printf '[run.sh] FAILED SEEDS: %s (see %s/seed_<S>/console.log)\n' "${failed[*]}" "$RUNS_DIR" >&2
  exit 1
fi
[ $rec_rc -eq 0 ] || { printf '[run.sh] make_record.py exited %s\n' "$rec_rc" >&2; exit 1; }
say "done: $RUNS_DIR"
