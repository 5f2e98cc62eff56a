"""The model-format package (codecomplete.models.format): numpy only, no import cycle
with the engine or the runtimes, one int8 rule, one version, no symlinks in the package."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import codecomplete
from codecomplete.models.format.folder import dequantize, quantize_int8, quantize_rows_int8

ROOT = Path(__file__).resolve().parent.parent

IMPORT_FORMAT = textwrap.dedent("""
    import sys
    import codecomplete.models.format
    from codecomplete.models.format import config, folder, gguf_import, hf_import, source, tokenizer
    source.load_model_source(sys.argv[1])
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                    or m.startswith(("codecomplete.runtime", "codecomplete.engine", "codecomplete.lsp")))
    assert not leaked, leaked[:5]
    print("ok")
""")


def test_model_format_package_imports_neither_torch_nor_the_engine_nor_the_runtimes(tiny_model_dir):
    done = subprocess.run([sys.executable, "-c", IMPORT_FORMAT, str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_no_symlink_is_tracked():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    links = [line.split("\t")[-1] for line in listed.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_vscode_extension_version_is_the_package_version():
    manifest = ROOT / "vscode-extension" / "package.json"
    if not manifest.is_file():
        pytest.skip("no vscode-extension/ beside the tests")
    assert json.loads(manifest.read_text())["version"] == codecomplete.__version__


def test_installed_metadata_carries_the_package_version():
    from importlib.metadata import version

    assert version("codecomplete") == codecomplete.__version__


def test_int8_rows_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 33)).astype(np.float32)
    q, scale = quantize_rows_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5,)
    assert np.abs(q).max(axis=1).tolist() == [127] * 5  # each row's largest weight maps to ±127
    assert np.all(np.abs(q.astype(np.float32) * scale[:, None] - w) <= scale[:, None] / 2 + 1e-7)


def test_an_all_zero_row_gets_scale_one_and_dequantizes_to_zero():
    w = np.array([[0.0, 0.0, 0.0], [0.5, -1.0, 0.25]], dtype=np.float32)
    stored = quantize_int8({"layer.weight": w, "norm.weight": np.ones(3, np.float32)})
    assert stored["layer.weight_scale"][0] == 1.0 and not stored["layer.weight"][0].any()
    back = dequantize(stored)
    assert np.all(np.isfinite(back["layer.weight"])) and not back["layer.weight"][0].any()
    assert "norm.weight_scale" not in stored  # 1-D tensors stay float


def test_torch_int8_layers_use_the_folder_rule_for_zero_rows():
    torch = pytest.importorskip("torch")
    from codecomplete.runtime.torch import WeightOnlyInt8Linear, quantize_weight_only_int8

    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.25]]))
    holder = torch.nn.Sequential(layer)
    quantize_weight_only_int8(holder)
    q = holder[0]
    assert isinstance(q, WeightOnlyInt8Linear)
    want_q, want_scale = quantize_rows_int8(layer.weight.detach().numpy())
    assert np.array_equal(q.weight.numpy(), want_q) and np.array_equal(q.scale.numpy(), want_scale)
    out = q(torch.ones(1, 3))
    assert torch.isfinite(out).all() and out[0, 0] == 0.0


def test_encoding_a_long_prompt_leaves_the_gil_to_other_threads():
    """A batching engine's scheduler thread (a language server's event loop) runs Python
    while request threads encode their prompts: encode must not hold the GIL throughout."""
    import threading
    import time

    from codecomplete.models.format.source import load_model_source
    from codecomplete.models.testing import SAMPLE_CODE

    tok = load_model_source(None).tokenizer  # the shipped model's BPE
    text = SAMPLE_CODE * max(1, 400_000 // len(SAMPLE_CODE))
    assert tok.encode(text[:500]) == tok._tok.encode(text[:500], add_special_tokens=False).ids
    done, gaps = threading.Event(), []
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        worker = threading.Thread(target=lambda: (tok.encode(text), done.set()))
        last = time.perf_counter()
        worker.start()
        while not done.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        t_total = sum(gaps)
        worker.join()
    finally:
        sys.setswitchinterval(old)
    assert t_total > 0.05, "the text encoded too fast to tell"
    # holding the GIL, the encode would stall this loop for its whole length
    assert max(gaps) < 0.5 * t_total, f"longest stall {max(gaps):.3f} s of {t_total:.3f} s"
