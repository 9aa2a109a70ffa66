"""Start-up. The kernel warm-up (section 5): processes beside the trainer compile FA4's and the fused Triton kernels
into their disk caches, with the trainer's settings and a training micro-batch's shapes; the trainer's first kernel
call waits for them. Torch's bytecode compiled where Python finds none. (The compiles themselves, and the cold start
they save, are measured on the GPU: README, Measured, and bench/RESULTS.md.)"""
import torch

import train_gpt as tg


def test_micro_batching_keeps_the_batch_on_any_number_of_gpus():
    hp = tg.load_hyperparameters({})
    for world in (1, 2, 4, 8):
        grad_accum, seqs = tg.micro_batching(hp, world)
        assert world * grad_accum * seqs * hp.train_seq_len == hp.train_batch_tokens == 786_432


def test_the_model_is_initialized_the_same_whatever_the_thread_count():
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    threads = torch.get_num_threads()
    states = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            states.append(tg.build_model(hp, torch.device("cpu")).state_dict())
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for name, t in states[0].items():
        assert torch.equal(t, states[1][name]), name


def test_triton_part_runs_one_forward_and_backward_of_a_training_micro_batch(monkeypatch):
    hp = tg.load_hyperparameters({"SMOKE": "1"})
    built, seen = [], []

    def build(hp, device):
        model = real_build(hp, device)
        model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
        built.append(model)
        return model

    real_build = tg.build_model
    monkeypatch.setattr(tg, "build_model", build)
    try:
        tg.warm_triton_kernels(hp, torch.device("cpu"), seqs=2)
    finally:
        tg.configure_attention("sdpa_math")
    assert seen == [(2, hp.train_seq_len)]
    assert all(p.grad is not None for p in built[0].parameters())  # the backward reached every weight


def test_warmup_processes_run_this_script_with_the_trainers_settings(monkeypatch, tmp_path):
    monkeypatch.setattr(tg, "_KERNEL_WARMUP", {})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # as the trainer's, whatever set it
    monkeypatch.setenv("SMOKE", "1")
    tg.start_kernel_warmup(torch.device("cpu"))
    tg.kernel_warmup_wait()
    report = tg._KERNEL_WARMUP["report"]
    assert report["failed"] == {}
    assert "WARNING" not in tg.kernel_warmup_report()


def test_a_failed_warmup_part_is_reported_and_the_trainer_goes_on(monkeypatch, tmp_path):
    """A bad setting in the environment stops both parts; the first kernel call logs why, and then compiles itself."""
    monkeypatch.setattr(tg, "_KERNEL_WARMUP", {})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("TRAIN_SEQ_LEN", "abc")
    tg.start_kernel_warmup(torch.device("cpu"))
    tg.kernel_warmup_wait()
    assert set(tg._KERNEL_WARMUP["report"]["failed"]) == set(tg.KERNEL_WARMUP_PARTS)
    line = tg.kernel_warmup_report()
    assert "WARNING: part attention exited with 1" in line and "TRAIN_SEQ_LEN='abc' is not a valid int" in line


def test_warm_kernels_dispatches_each_part_on_the_trainers_gpu_and_exits_cleanly(monkeypatch):
    """What the process runs (its CUDA calls recorded here, on a machine without a GPU): the part, on the GPU the
    trainer named (plain "cuda" is the first one), with a training micro-batch's rows; then it exits 0 at once."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    for name in ("warm_attention", "warm_triton_kernels"):
        monkeypatch.setattr(tg, name, lambda hp, device, seqs, name=name: calls.append((name, device, seqs)))

    def exit_(code):
        calls.append(("exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(tg.os, "_exit", exit_)
    seqs = tg.micro_batching(tg.load_hyperparameters({}), 2)[1]
    for part, device, name in (("attention", "cuda:1", "warm_attention"), ("triton", "cuda", "warm_triton_kernels")):
        calls.clear()
        try:
            tg.warm_kernels(part, device)
        except SystemExit:
            pass
        gpu = torch.device(device if device != "cuda" else "cuda:0")
        assert calls == [("set_device", gpu), (name, gpu, seqs), "synchronize", ("exit", 0)]


def test_bytecode_cached_sees_pycache_and_the_prefix(tmp_path, monkeypatch):
    """keep_torch_bytecode rests on this: without cached bytecode every process compiles torch."""
    import py_compile
    import sys

    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert not tg.bytecode_cached(str(source))
    py_compile.compile(str(source))
    assert tg.bytecode_cached(str(source))
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "prefix"))  # PYTHONPYCACHEPREFIX: looked up there
    assert not tg.bytecode_cached(str(source))
    py_compile.compile(str(source))
    assert tg.bytecode_cached(str(source))


def test_torch_bytecode_is_compiled_where_python_finds_none(tmp_path):
    """An image without torch's bytecode (here: an empty PYTHONPYCACHEPREFIX, and PYTHONDONTWRITEBYTECODE=1): loading
    the script compiles torch into the prefix, inductor's modules too (not imported by `import torch`), and has Python
    write there, which the processes it starts inherit; the next load finds the bytecode and changes nothing. Where
    torch has none beside its sources and the folder is filled (the default folder on the next run), it is used and
    logged as found, not compiled again."""
    import os
    import re
    import subprocess
    import sys

    prefix = tmp_path / "pycache"
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix), "PYTHONDONTWRITEBYTECODE": "1"}
    load = ("import os, runpy, sys; g = runpy.run_path(sys.argv[1], run_name='probe'); logged = []; "
            "g['log_bytecode_cache'](type('Ctx', (), {'log': staticmethod(logged.append)})()); "
            "c = g['BYTECODE_CACHE']; print(c and c.folder, os.environ.get('PYTHONDONTWRITEBYTECODE'), "
            "sys.dont_write_bytecode, sys.pycache_prefix); "
            "print(*logged)")
    run = [sys.executable, "-c", load, tg.__file__]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    state, log = first.stdout.split("\n")[:2]
    assert state.split() == [str(prefix), "None", "False", str(prefix)]
    assert re.match(rf"python_bytecode: torch had no compiled bytecode; compiled torch, Triton and SymPy into "
                    rf"{re.escape(str(prefix))} in \d+\.\ds ", log), log
    torch_dir = os.path.dirname(torch.__file__)
    saved, sys.pycache_prefix = sys.pycache_prefix, str(prefix)
    try:
        for source in (torch.__file__, os.path.join(torch_dir, "_inductor", "codegen", "triton.py")):
            assert tg.bytecode_cached(source), source
    finally:
        sys.pycache_prefix = saved
    second = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.split("\n")[:2] == [f"None 1 True {prefix}", ""], second.stderr
    # -X pycache_prefix outranks the variable: torch's own lookup finds nothing, the script's folder is filled
    found = subprocess.run([sys.executable, "-X", f"pycache_prefix={tmp_path / 'none'}", *run[1:]], env=env,
                           capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr
    state, log = found.stdout.split("\n")[:2]
    assert state.split() == [str(prefix), "None", "False", str(prefix)]
    assert log.startswith(f"python_bytecode: torch has none beside its sources; found in {prefix} "), log
    (tmp_path / "file").write_text("")  # a prefix that cannot be created: start as before, with the warning
    unusable = subprocess.run(run, env={**env, "PYTHONPYCACHEPREFIX": str(tmp_path / "file" / "pycache")},
                              capture_output=True, text=True, timeout=600)
    assert unusable.returncode == 0, unusable.stderr
    state, log = unusable.stdout.split("\n")[:2]
    assert state == f"None 1 True {tmp_path / 'file' / 'pycache'}"
    assert log.startswith("python_bytecode: WARNING torch has no compiled bytecode")


def test_warmup_runs_from_the_lzma_wrapped_script_of_a_records_folder(tmp_path, monkeypatch):
    """A records folder ships the wrapped file, and __file__ is then the wrapper: runpy must find warm_kernels there."""
    import subprocess
    import sys
    from pathlib import Path

    wrapped = tmp_path / "train_gpt.py"
    wrapped.write_text(tg.wrap_source(Path(tg.__file__).read_text()))
    monkeypatch.setenv("SMOKE", "1")
    for part in tg.KERNEL_WARMUP_PARTS:
        proc = subprocess.run([sys.executable, "-c", tg.KERNEL_WARMUP_CODE, str(wrapped), part, "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
