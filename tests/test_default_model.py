"""The shipped default model: size budget, a clean training manifest, and it completes code."""

from __future__ import annotations

import json
from pathlib import Path

from codecomplete.models.format.folder import DEFAULT_MODEL_DIR, open_model_folder

BUDGET_BYTES = 64 * 2**20
HOLDOUT_FALLBACK = (
    "black django flask sqlalchemy tornado paramiko astroid pylint docutils sphinx isort pyflakes "
    "pycodestyle flake8 bottle marshmallow celery kombu scrapy twisted fastapi starlette pydantic boto3 "
    "botocore httpie invoke fabric poetry-core mypy jedi parso libcst werkzeug-contrib arrow pendulum "
    "tomlkit express koa lodash chalk commander yargs axios moment"
).split()


def _holdout_names() -> set[str]:
    """Package names of ../shared/HOLDOUT.md when it is there, else the list as of writing."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "HOLDOUT.md"
    names = set(HOLDOUT_FALLBACK)
    if path.is_file():
        for line in path.read_text().splitlines():
            if "," in line and not line.startswith("#"):
                names.update(x.strip().lower() for x in line.split(",") if x.strip())
    return {n.replace("_", "-") for n in names}


def test_shipped_model_files_fit_the_64_mib_budget():
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file())
    assert total <= BUDGET_BYTES, f"{total / 2**20:.1f} MiB"


def test_shipped_model_folder_is_complete_and_int8():
    folder = open_model_folder(DEFAULT_MODEL_DIR)
    assert folder.quantization == "int8-per-channel"
    assert folder.config.has_fim and folder.config.fim_order == "spm"
    assert folder.config.max_seq_len >= 2048
    # grouped-query attention: 9 query heads read 3 kv heads, a third of the KV bytes per step
    assert (folder.config.n_heads, folder.config.n_kv_heads) == (9, 3)


def test_training_manifest_lists_no_held_out_package():
    manifest = json.loads((DEFAULT_MODEL_DIR / "MANIFEST.json").read_text())
    names = {s["name"].lower().replace("_", "-") for s in manifest["sources"]}
    assert len(names) > 100
    assert not names & _holdout_names()
    assert sum(s["bytes"] for s in manifest["sources"]) == manifest["tokenized"]["bytes"]


def test_default_model_completes_an_everyday_call(tmp_path):
    from codecomplete.engine import Engine
    from codecomplete.request import CompletionOptions, CompletionRequest

    engine = Engine.load(None, runtime="onnx")
    text = (Path(__file__).parent / "data" / "example.py").read_text()
    offset = text.index("        pri") + len("        pri")
    completion = engine.complete(CompletionRequest(text=text, offset=offset, language="python", path="example.py",
                                                   options=CompletionOptions(n=2, deadline_ms=60_000)))
    assert completion.candidates
    assert completion.candidates[0].text.startswith("nt(")
    assert all(c.syntax_ok for c in completion.candidates[:1])


def test_the_readme_quickstart_completes_from_the_checkout_root():
    # `pip install . && codecomplete complete tests/data/example.py ...` from the checkout: the
    # engine's child process must import the installed package, not the checkout's codecomplete/
    # folder (which lacks codecomplete.lsp and codecomplete.models); PYTHONSAFEPATH, which the
    # test session sets, would hide that
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = Path(sys.executable).with_name("codecomplete")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([str(script), "complete", "tests/data/example.py", "--line", "21", "--character", "11"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nt(line" in done.stdout
