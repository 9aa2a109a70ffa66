"""Evaluation benchmark: compile warm-up, plain, sliding-window and score-first TTT eval of one model, with the
projection checked against the measured times. A random-weight model: timings do not depend on the weights.

    python3 bench/eval_throughput.py --val VAL.bin --tokenizer TOK.model [--targets N] [-- ENV=VALUE ...]
    torchrun --standalone --nproc_per_node=N bench/eval_throughput.py ...   (several GPUs)

Defaults are the record configuration (train_gpt.py's Hyperparameters, COMPILE=1). Prints the eval log lines and
writes $OUT/eval_throughput.json (or --out): per-phase seconds, projected vs measured, graphs compiled after the
warm-up (should be 0), peak memory, and full-validation 8-GPU times scaled up from the measured ones.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

FULL_VAL_TARGETS = 40_540_160  # sp8192 (ANCHORS 1.6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--val", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--targets", type=int, default=0, help="cut the stream to this many targets (0: all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("env", nargs="*", help="extra ENV=VALUE settings")
    args = ap.parse_args()
    hp = tg.load_hyperparameters({**os.environ, **dict(kv.split("=", 1) for kv in args.env)})
    ctx = tg.setup_distributed()
    ctx.log(f"device:{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} torch:{torch.__version__} "
            f"attention:{tg.configure_attention()} world_size:{ctx.world_size}")
    tokens = tg.load_validation_tokens([args.val], hp.eval_seq_len)
    if args.targets:
        tokens = tokens[:args.targets + 1]
    n = tokens.numel() - 1
    tables = tuple(torch.from_numpy(t) for t in tg.build_byte_tables(tg.load_tokenizer(args.tokenizer, hp.vocab_size),
                                                                     hp.vocab_size))
    torch.manual_seed(hp.seed)
    model = tg.build_model(hp, ctx.device)
    model.looping = hp.num_loops > 0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    graphs = lambda: tg.torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    timings = tg.eval_warmup(model, hp, ctx)
    graphs_after_warmup = graphs()
    plain = tg.eval_val(model, tokens, tables, hp, ctx)
    projected = tg.log_eval_projection(n, timings, hp, ctx) - plain.seconds
    sliding = tg.eval_val_sliding(model, tokens, tables, hp, ctx)
    ttt_model = tg.build_model(hp, ctx.device)  # a fresh copy, as main deserializes one for TTT
    ttt_model.load_state_dict(state)
    ttt_model.looping = model.looping
    ttt = tg.eval_val_ttt(ttt_model, tokens, tables, hp, ctx)
    tg.log_eval_summary([plain, sliding, ttt], hp, ctx, timings)

    windows_local = len(tg.sliding_window_starts(n, hp.eval_seq_len, hp.eval_stride))
    windows_full = len(tg.sliding_window_starts(FULL_VAL_TARGETS, hp.eval_seq_len, hp.eval_stride))
    # Per-GPU windows (and TTT sequences) of the full validation set on 8 GPUs over this run's: a rough scale-up,
    # since 8 GPUs train on 2 sequences each per TTT chunk, less efficiently than 16 on one.
    scale = windows_full / 8 / (windows_local / ctx.world_size)
    result = {
        "targets": n, "world_size": ctx.world_size, "attention": tg.ATTENTION_BACKEND,
        "warmup_s": timings.warmup_seconds, "step_ms": {k: 1000 * v for k, v in dataclasses.asdict(timings).items()
                                                        if k != "warmup_seconds"},
        "plain_s": plain.seconds, "sliding_s": sliding.seconds, "ttt_s": ttt.seconds,
        "projected_sliding_plus_ttt_s": projected,
        "measured_sliding_plus_ttt_s": sliding.seconds + ttt.seconds,
        "extrapolated_full_val_8gpu_sliding_s": sliding.seconds * scale,
        "extrapolated_full_val_8gpu_ttt_s": ttt.seconds * scale,
        "graphs_compiled_after_warmup": graphs() - graphs_after_warmup,
        "covered": all(r.covered for r in (plain, sliding, ttt)),
        "val_bpb": {"plain": plain.val_bpb, "sliding": sliding.val_bpb, "ttt": ttt.val_bpb},
        "peak_mem_mib": torch.cuda.max_memory_allocated() // 2**20 if torch.cuda.is_available() else None,
    }
    if ctx.rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval_throughput.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    if ctx.world_size > 1:
        tg.dist.destroy_process_group()


if __name__ == "__main__":
    main()
