"""The LZMA-wrapped train_gpt.py round trip: wrap, unwrap, parse as Python 3.10, and run DRY_RUN=1 wrapped."""
import ast
import subprocess
import sys

import pytest
from records_fixtures import FAKE_TRAINER, REPO_ROOT, fake_env, load_make_record

mr = load_make_record()
tg = mr.train_gpt()


def run_wrapped(tmp_path, source: str, extra_env=None) -> subprocess.CompletedProcess:
    """Write wrap_source(source) as train_gpt.py in an empty folder and run it there with DRY_RUN=1."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train_gpt.py").write_text(tg.wrap_source(source))
    env = {**fake_env(), "DRY_RUN": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def test_repo_script_round_trip():
    source = (REPO_ROOT / "train_gpt.py").read_text()
    wrapped = tg.wrap_source(source)
    assert wrapped.startswith(tg.WRAPPER_PREFIX) and wrapped.count("\n") == 2
    assert tg.unwrap_source(wrapped) == tg.minify_source(source)
    for text in (wrapped, tg.unwrap_source(wrapped)):
        ast.parse(text, feature_version=(3, 10))
        compile(text, "train_gpt.py", "exec")
    assert len(wrapped.encode()) < len(source.encode())


def test_wrapped_stand_in_runs_dry_run(tmp_path):
    proc = run_wrapped(tmp_path, FAKE_TRAINER, {"QK_GAIN_INIT": "4.5"})
    assert proc.returncode == 0, proc.stderr
    assert "model_params:12345" in proc.stdout and "  qk_gain_init: 4.5" in proc.stdout


def test_wrapped_repo_script_runs_dry_run(tmp_path):
    proc = run_wrapped(tmp_path, (REPO_ROOT / "train_gpt.py").read_text())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Hyperparameters:" in proc.stdout and "model_params:" in proc.stdout


FSTRINGS = """
d, x, w = {"k": 3.14159}, "hi", 8
print(f"{d['k']:.2f}|{x!r:>{w}}|{'a' if d else 'b'}|{x=}|{f'{x}!'}|{x!s}|{x!a}|plain {w}")
"""


def test_minified_fstrings_keep_their_output_and_parse_on_3_10():
    """f-strings with quotes in their fields (dict keys, string literals, nested f-strings) print the same after
    minify_source, and none is left for Python >= 3.12's unparser to write with reused quotes."""
    minified = tg.minify_source(FSTRINGS)
    outputs = []
    for src in (FSTRINGS, minified):
        proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == "3.14|    'hi'|a|x='hi'|hi!|hi|'hi'|plain 8\n"
    fields = [n for f in ast.walk(ast.parse(minified)) if isinstance(f, ast.JoinedStr)
              for v in f.values if isinstance(v, ast.FormattedValue) for n in ast.walk(v.value)]
    assert fields and not any(isinstance(n, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(n, "value", ""), str)
                              for n in fields)  # f-strings are left only where no quote is inside a field


PY310, PY312 = mr.find_python("3.10"), mr.find_python("3.12")


@pytest.mark.skipif(not (PY310 and PY312), reason="needs python3.12 and python3.10")
def test_repo_script_minified_on_3_12_parses_on_3_10(tmp_path):
    """The records are assembled on the GPU machines' Python (3.12): what it writes must parse on 3.10 (USERS.md)."""
    minify = ("import ast, sys; src = open(sys.argv[1]).read(); tree = ast.parse(src); "
              "ns = {'ast': ast}; exec(compile(ast.Module([n for n in tree.body if getattr(n, 'name', '') in "
              "('_PortableFStrings', 'minify_source')], []), 'm', 'exec'), ns); print(ns['minify_source'](src))")
    out = subprocess.run([PY312, "-c", minify, str(REPO_ROOT / "train_gpt.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (tmp_path / "minified.py").write_text(out.stdout)
    parsed = subprocess.run([PY310, "-c", "import ast, sys; ast.parse(open(sys.argv[1]).read())",
                             str(tmp_path / "minified.py")], capture_output=True, text=True, timeout=120)
    assert parsed.returncode == 0, parsed.stderr[-2000:]


def test_check_wrapped_script_flags_a_bad_script(tmp_path):
    """A script using syntax newer than 3.10 (match is fine; except* is 3.11) fails the syntax check."""
    source = "try:\n    pass\nexcept* ValueError:\n    pass\n"
    path = tmp_path / "train_gpt.py"
    path.write_text(tg.wrap_source(source))
    checks = {c.name: c for c in mr.check_wrapped_script(path, source, env={**fake_env(), "DRY_RUN": "1"})}
    assert checks["wrapped_roundtrip"].ok is True
    assert checks["python310_syntax"].ok is False
    assert checks["dry_run_in_folder"].ok is False and "no model_params" in checks["dry_run_in_folder"].detail
