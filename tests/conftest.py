import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def forward_logits(model, ids, isolate_docs: bool = False):
    """Softcapped logits of a whole forward: the reference path the tests compare against."""
    return model.logits(model.hidden(ids, isolate_docs=isolate_docs))


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """(data_path, tokenizer_path) of the synthetic smoke dataset, made once per test session."""
    import train_gpt

    return train_gpt.make_smoke_data(str(tmp_path_factory.mktemp("smoke")), 512)


def run_interpreted(script: str, *args: str) -> dict:
    """The JSON a test file's worker prints (its last line) when the file runs as a script under Triton's CPU
    interpreter (TRITON_INTERPRET=1, read at import: hence a subprocess), which runs the Triton kernels."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["interpret"] is True
    return result


def shared_file(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def forbid_recompiles():
    """Call it to make every later recompilation in the test an error, until teardown. Not monkeypatch.setattr: newer
    pytest undoes that on torch's config module with delattr, which hides the option from torch for the session."""
    import torch

    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
