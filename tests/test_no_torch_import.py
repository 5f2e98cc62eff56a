"""The default code path (onnx runtime) runs without importing torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

LOAD_AND_RUN = textwrap.dedent("""
    import sys
    from codecomplete.runtime import load_runtime

    rt = load_runtime(sys.argv[1], runtime="onnx")
    state, logits = rt.prefill(rt.tokenizer.encode("def add(a, b):\\n    return"))
    branches = rt.start_branches(state, 2, 4)
    rt.decode(state, branches, [int(logits.argmax())] * 2)
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not leaked, f"torch was imported: {leaked[:5]}"
    print("ok", rt.name)
""")


def test_onnx_runtime_prefill_and_decode_import_no_torch(tiny_model_dir):
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok onnx-int8")
