"""Distillation on the CPU, end to end: a tiny Qwen-shaped GGUF teacher -> pruned student ->
a few distillation steps (the loss falls) -> export -> the engine completes with it; the
no-teacher baseline takes the same steps; the chunked vocabulary loss equals the plain one."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from codecomplete.models.format.folder import open_model_folder  # noqa: E402
from codecomplete.models.format.gguf_import import gguf_tokenizer_json  # noqa: E402
from codecomplete.models.prune import (  # noqa: E402
    StudentShape,
    calibrate,
    factorize_embedding,
    int8_weights_bytes,
    load_teacher,
    make_student,
    prune,
    teacher_model,
)
from codecomplete.models.testing import SAMPLE_CODE, write_tiny_qwen_gguf  # noqa: E402
from codecomplete.models.train.corpus import ShardWriter  # noqa: E402
from codecomplete.models.train.distill import DistillConfig, distill, teacher_targets, vocab_loss  # noqa: E402
from codecomplete.models.train.export import export, write_pieces  # noqa: E402
from codecomplete.models.train.prepare import prepare  # noqa: E402

DOCS = [SAMPLE_CODE.replace("Point", f"Point{i}").replace("values", f"items_{i}") for i in range(120)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread (two spin against each other on a busy 2-core machine, 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    """(the tiny teacher GGUF, a prepared data folder tokenized with its tokenizer)."""
    root = tmp_path_factory.mktemp("distill")
    gguf_path = write_tiny_qwen_gguf(root / "teacher.gguf", text=SAMPLE_CODE * 3)
    (root / "tokenizer.json").write_text(gguf_tokenizer_json(gguf_path))
    corpus = root / "corpus"
    corpus.mkdir()
    w = ShardWriter(corpus, "tiny")
    for i, text in enumerate(DOCS):
        w.add("synthetic", "0", f"pkg/mod_{i}.py", text.encode())
    w.close()
    prepare([str(corpus)], str(root / "tokenizer.json"), root / "data")
    return gguf_path, root / "data"


def test_chunked_loss_and_its_gradients_equal_the_full_logits_formula():
    """KL over the teacher's top-k plus one bucket for the rest, mixed with CE, computed a
    chunk of positions at a time with the gradients taken per chunk, equals the same loss
    written over the whole logits matrix, and so do its gradients."""
    g = torch.Generator().manual_seed(0)
    n, v, r, d, k = 37, 300, 16, 24, 8
    f = torch.randn(n, r, generator=g, requires_grad=True)
    w = torch.randn(v, r, generator=g, requires_grad=True)
    tf, tw = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    loss, ce, kl = vocab_loss(f, w, y, teacher_targets(tf, tw, k, chunk=10), kl_weight=0.7, chunk=10)
    loss.backward()
    got = f.grad.clone(), w.grad.clone()
    f.grad = w.grad = None
    logq, logp = torch.log_softmax(f @ w.T, -1), torch.log_softmax(tf @ tw.T, -1)
    top = logp.topk(k, -1).indices
    p_top, q_top = logp.gather(1, top).exp(), logq.gather(1, top).exp()
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    kl_ref = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    ce_ref = -logq.gather(1, y[:, None])[:, 0]
    ref = (0.7 * kl_ref + 0.3 * ce_ref).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(ce.item() - ce_ref.mean().item()) < 1e-5
    assert abs(kl.item() - kl_ref.mean().item()) < 1e-5
    assert torch.allclose(got[0], f.grad, atol=1e-6) and torch.allclose(got[1], w.grad, atol=1e-6)


def test_full_rank_factorization_is_exact_and_a_weighted_one_fits_the_logits_better():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((200, 32)).astype(np.float32)
    a, b = factorize_embedding(table, 32)
    assert np.abs(a @ b - table).max() < 1e-4
    # hidden states with a few strong directions: the weighted fit errs less on their logits
    h = rng.standard_normal((2000, 32)) * np.r_[np.full(4, 10.0), np.full(28, 0.3)]
    cov = h.T @ h
    plain = factorize_embedding(table, 8)
    weighted = factorize_embedding(table, 8, cov)
    err = [np.linalg.norm(h @ (table - x @ y).T) for x, y in (plain, weighted)]
    assert err[1] < 0.8 * err[0]
    # statistics of fewer tokens than dims: a singular covariance, some eigenvalues a rounding
    # error below zero (float32 sums of a real calibration), still give finite factors
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    few = (q * np.r_[100.0, 50.0, 10.0, np.zeros(28), -1e-4]) @ q.T
    a, b = factorize_embedding(table, 8, few)
    assert np.isfinite(a).all() and np.isfinite(b).all() and np.abs(a @ b).max() < 10 * np.abs(table).max()


def test_pruning_keeps_the_chosen_layers_and_the_most_useful_neurons(teacher_and_data):
    gguf_path, _ = teacher_and_data
    tcfg, weights, tok = load_teacher(gguf_path)
    teacher = teacher_model(tcfg, weights)
    ids = tok.encode(SAMPLE_CODE * 2)[:4 * 48]
    stats = calibrate(teacher, torch.tensor(ids).view(4, 48))
    assert stats.tokens == 4 * 48 and len(stats.layer_order()) == tcfg.n_layers
    cfg, student, kept = prune(tcfg, weights, StudentShape(2, 48, 16, pick="ends"), stats)
    assert kept["teacher_layers"] == [0, tcfg.n_layers - 1]
    assert cfg.embed_rank == 16 and cfg.tie_embeddings and cfg.eos_ids[0] == tok.token_id("<|endoftext|>")
    assert cfg.fim_order == "spm" and (cfg.n_heads, cfg.n_kv_heads, cfg.qkv_bias) == (tcfg.n_heads, tcfg.n_kv_heads, True)
    # the kept FFN neurons of the last layer are its top 48 by E[act²]·‖w2 column‖²
    w2 = weights[f"layers.{tcfg.n_layers - 1}.feed_forward.w2.weight"]
    score = stats.ffn_sq[tcfg.n_layers - 1] * (w2.astype(np.float64) ** 2).sum(0)
    keep = np.sort(np.argsort(-score)[:48])
    assert np.array_equal(student["layers.1.feed_forward.w2.weight"], w2[:, keep])
    narrow, _, _ = prune(tcfg, weights, StudentShape(2, 48, 16, dim=48), stats)
    assert narrow.dim == 48
    with pytest.raises(ValueError, match="wider"):
        prune(tcfg, weights, StudentShape(2, 48, 16, dim=128), stats)


def test_shape_specs_read_back_and_the_size_is_exact(tmp_path, teacher_and_data):
    shape = StudentShape.parse("d640-L12-F1088-r128-ends-plain")
    assert (shape.dim, shape.n_layers, shape.ffn_dim, shape.embed_rank, shape.pick, shape.svd) == (
        640, 12, 1088, 128, "ends", "plain")
    assert StudentShape.parse(shape.describe()) == shape
    assert StudentShape.parse("L3-F64-r8-0,2,5").pick == "0,2,5"
    with pytest.raises(ValueError, match="needs"):
        StudentShape.parse("L8-r128")
    gguf_path, data = teacher_and_data
    make_student(str(gguf_path), str(data), str(tmp_path / "s"), StudentShape(2, 64, 16), 2, 64, "cpu")
    folder = open_model_folder(tmp_path / "s")
    from codecomplete.models.format.folder import param_shapes, read_safetensors, save_model_folder

    weights = read_safetensors(folder.weights_file)
    save_model_folder(tmp_path / "q", folder.config, {k: weights[k] for k in param_shapes(folder.config)},
                      folder.tokenizer_file)
    assert (tmp_path / "q" / "model.safetensors").stat().st_size == int8_weights_bytes(folder.config)


def test_distilling_a_pruned_student_lowers_its_loss_and_exports_a_folder_the_engine_runs(tmp_path, teacher_and_data):
    gguf_path, data = teacher_and_data
    init = tmp_path / "init"
    info = make_student(str(gguf_path), str(data), str(init), StudentShape(2, 64, 16), 4, 64, "cpu")
    assert json.loads((init / "prune.json").read_text())["params"] == info["params"]
    common = dict(data=str(data), init=str(init), batch_size=4, micro_batch=2, seq_len=64, lr=3e-3,
                  warmup_steps=3, eval_every=10, eval_batches=2, log_every=1, save_every=10, workers=0,
                  compile=False, loss_chunk=50, top_k=8)
    run = tmp_path / "run"
    distill(DistillConfig(out=str(run), teacher=str(gguf_path), tokens=20 * 4 * 64, **common))
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "kl" in r and "step" in r]
    assert len(steps) == 20 and all("mfu_student" in r and r["tokens_per_s"] > 0 for r in steps)
    start = log[0]  # MFU counts the teacher's forward pass beside the student's training step
    assert start["flops_per_token"] > start["student_flops_per_token"] > 0
    assert np.mean([r["kl"] for r in steps[-5:]]) < 0.8 * steps[0]["kl"]
    init_line = next(r for r in log if r.get("event") == "init")
    assert "teacher_val_loss" in init_line and "val_kl" in init_line
    assert log[-2]["val_kl"] < init_line["val_kl"]

    # the baseline: CE only, same init and batches, the distillation's planned steps
    (tmp_path / "schedule.jsonl").write_text(json.dumps({"event": "schedule", "total_steps": 6}) + "\n")
    base = tmp_path / "base"
    distill(DistillConfig(out=str(base), baseline=True, minutes=5, follow=str(tmp_path / "schedule.jsonl"), **common))
    base_log = [json.loads(x) for x in (base / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in base_log if "loss" in r and "step" in r] == list(range(1, 7))
    assert next(r for r in base_log if r.get("event") == "schedule")["total_steps"] == 6

    (run / "manifest.json").write_text((data / "manifest.json").read_text())
    out = export(run, tmp_path / "model")
    assert out["fits_64_mib"] and set(out["files"]) == {"config.json", "tokenizer.json", "model.safetensors",
                                                        "MANIFEST.json"}
    manifest = json.loads((tmp_path / "model" / "MANIFEST.json").read_text())
    assert manifest["sources"][0]["name"] == "synthetic" and manifest["run"]["teacher"] == "teacher.gguf"
    pieces = write_pieces(tmp_path / "model", run, tmp_path / "pieces", "student", piece_mib=0.05)
    assert len(pieces["pieces"]) > 1 and (tmp_path / "pieces" / "student.JOIN.txt").read_text().startswith("cat ")

    from codecomplete.engine import Engine
    from codecomplete.request import CompletionOptions, CompletionRequest

    folder = open_model_folder(tmp_path / "model")
    assert folder.quantization == "int8-per-channel" and folder.config.embed_rank == 16
    engine = Engine.load(str(tmp_path / "model"), runtime="onnx")
    text = "def print_values(values):\n    for value in values:\n        pri"
    completion = engine.complete(CompletionRequest(text=text, offset=len(text), language="python", path="x.py",
                                                   options=CompletionOptions(n=2, deadline_ms=30_000)))
    assert completion.candidates and all(c.text.strip() for c in completion.candidates)


def test_the_tokenizer_from_a_gguf_header_gives_the_engines_ids(tmp_path, teacher_and_data):
    """from-gguf reads only the header (a carried file's first piece will do); tokenizers
    from its tokenizer.json, the engine's tokenizer built from the GGUF, and transformers'
    Qwen2Tokenizer on the same vocabulary give the same ids."""
    from codecomplete.models.train.tokenizer import compare_gguf_tokenizers

    gguf_path, _ = teacher_and_data
    raw = gguf_path.read_bytes()
    first_piece = tmp_path / "part-00"
    first_piece.write_bytes(raw[: len(raw) // 3])
    assert gguf_tokenizer_json(first_piece) == gguf_tokenizer_json(gguf_path)
    texts = [SAMPLE_CODE, "naïve café — 你好 x=1\n\n\t  y\r\n", "s = '<|endoftext|>' + \"<|fim_prefix|>\"\n",
             (tmp_path.parent / "x.py").name * 3, json.dumps({"k": [1, 2.5e-3]})]
    report = compare_gguf_tokenizers(gguf_path, texts)
    assert report["texts"] == 5 and report["texts_with_special_token_text"] == 1
    assert set(report["texts_that_differ"].values()) == {0}
    assert "transformers" in report["compared_with_engine"]


def test_a_compiled_loss_that_fails_falls_back_to_the_eager_one_once():
    from codecomplete.models.train.distill import EagerFallback, chunk_loss

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("this compiler cannot")

    g = torch.Generator().manual_seed(0)
    f = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (20,), generator=g)
    fallback = EagerFallback(broken, chunk_loss, "loss")
    got = [vocab_loss(f, w, y, None, 0.0, 7, fallback)[0].item() for _ in range(2)]
    assert got[0] == got[1] == pytest.approx(vocab_loss(f, w, y, None, 0.0, 7)[0].item())
    assert len(calls) == 1 and fallback.fn is chunk_loss
