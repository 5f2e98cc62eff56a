"""`codecomplete bench llamacpp`: the request it cuts, the ratios it reports, and (only where
llama-cpp-python is installed) one tiny run of both systems on the same GGUF file."""

from __future__ import annotations

import argparse
import json

import pytest

from codecomplete.bench import llamacpp
from codecomplete.bench.llamacpp import Row, cut_document, ratios

SOURCE = "".join(f"def function_{i}(value):\n    result = value + {i}\n    return result\n\n" for i in range(60))


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    llamacpp.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()] + ["--json"])


def test_cut_document_puts_the_cursor_after_two_characters_of_an_identifier():
    doc = cut_document(SOURCE, lambda s: len(s.split()), 100, 30)
    line_start = doc.text.rfind("\n", 0, doc.offset) + 1
    typed_so_far = doc.text[line_start: doc.offset].lstrip()
    assert len(typed_so_far) == 2 and (typed_so_far + doc.typed).isidentifier()
    assert 90 <= len(doc.text[: doc.offset].split()) <= 101
    assert len(doc.text[doc.offset:].split()) <= 30 + 5  # the budget plus the rest of the cursor line


def test_warm_document_types_one_character_at_the_cursor():
    doc = cut_document(SOURCE, lambda s: len(s.split()), 100, 30)
    text, offset = doc.warm()
    assert offset == doc.offset + 1 and text[doc.offset] == doc.typed
    assert text[:doc.offset] + text[offset:] == doc.text
    prompt = doc.fim_prompt(warm=True)
    assert prompt.startswith("<|fim_prefix|>") and prompt.endswith("<|fim_middle|>")
    assert prompt.index("<|fim_suffix|>") == len("<|fim_prefix|>") + offset


def test_ratios_divide_ours_by_llamacpp_per_stage_and_n():
    rows = [Row("llamacpp", "cold", 1, 100.0, 16), Row("llamacpp", "warm", 1, 20.0, 16),
            Row("onnx-int8", "cold", 1, 150.0, 16), Row("onnx-int8", "warm", 1, 10.0, 16),
            Row("onnx-int8", "cold", 4, 300.0, 64)]
    assert ratios(rows) == [{"system": "onnx-int8", "stage": "cold", "n": 1, "ratio": 1.5},
                            {"system": "onnx-int8", "stage": "warm", "n": 1, "ratio": 0.5}]


def test_missing_gguf_file_is_a_clear_error(tmp_path, capsys):
    assert llamacpp.run(_args(model=tmp_path / "absent.gguf")) == 2
    assert "no GGUF file" in capsys.readouterr().out


@pytest.mark.slow
def test_both_systems_complete_the_same_request_on_a_tiny_gguf(tmp_path, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    from test_gguf_import import write_gguf

    monkeypatch.setenv("CODECOMPLETE_CACHE", str(tmp_path / "cache"))
    model = write_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2", False, "qwen2", seed=3)
    source = tmp_path / "source.py"
    source.write_text(SOURCE)
    args = _args(model=model, systems="llamacpp,onnx-fp32", file=source, prefix_tokens=120, suffix_tokens=40,
                 max_tokens=4, n_ctx=512, threads=1)
    assert llamacpp.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {(r["system"], r["stage"], r["n"]) for r in out["rows"]}
    assert keys == {(s, st, n) for s in ("llamacpp", "onnx-fp32") for st in ("cold", "warm") for n in (1, 4)}
    assert len(out["ratios"]) == 4 and all(r["ratio"] > 0 for r in out["ratios"])
    assert out["systems"]["llamacpp"]["prompt_tokens"] > 0
