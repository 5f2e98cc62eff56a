"""A short CPU training run of the tiny preset on a tiny corpus."""

import json

import torch
from safetensors.torch import load_file

from codecomplete.models.format.config import ModelConfig
from codecomplete.models.format.folder import read_safetensors, save_model_folder
from codecomplete.models.model import Transformer
from codecomplete.models.train.corpus import ShardWriter
from codecomplete.models.train.prepare import prepare
from codecomplete.models.train.tokenizer import train_tokenizer
from codecomplete.models.train.train import TrainConfig, lr_at, train


def make_docs(n: int) -> list[str]:
    return [
        f"def func_{i}(x, y):\n    \"\"\"Add {i}.\"\"\"\n    total = x + y + {i}\n    return total\n\n\n"
        f"class Thing{i}:\n    def __init__(self, value):\n        self.value = value\n"
        for i in range(n)
    ]


def make_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = make_docs(300)
    w = ShardWriter(corpus, "tiny")
    for i, text in enumerate(docs):
        w.add("synthetic", "0", f"pkg/mod_{i}.py", text.encode())
    w.close()
    tok = train_tokenizer(iter(docs), vocab_size=512)
    tok.save(str(tmp_path / "tokenizer.json"))
    meta = prepare([str(corpus)], str(tmp_path / "tokenizer.json"), tmp_path / "data")
    assert meta["splits"]["val"]["docs"] >= 1
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["totals"]["tokens"] == sum(s["tokens"] for s in meta["splits"].values())


def test_twenty_cpu_steps_lower_the_loss_and_write_loadable_weights(tmp_path):
    make_data(tmp_path)
    out = tmp_path / "run"
    torch.set_num_threads(2)
    train(TrainConfig(data=str(tmp_path / "data"), out=str(out), preset="test-tiny", tokens=20 * 4 * 64,
                      batch_size=4, micro_batch=2, seq_len=64, lr=3e-3, warmup_steps=3, eval_every=10,
                      eval_batches=2, log_every=1, save_every=10, workers=0, compile=False))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) == 20 and len(vals) == 2
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert log[-1]["event"] == "end"

    cfg = ModelConfig.load(out / "config.json")
    assert cfg.eos_ids == [0] and cfg.fim_prefix_id == 1 and cfg.fim_order == "spm"
    model = Transformer(cfg)
    model.load_state_dict(load_file(str(out / "final.safetensors")))
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, cfg.vocab_size)
    assert (out / "ckpt.optim.safetensors").exists() and (out / "tokenizer.json").exists()


def test_learning_rate_warms_up_then_decays_to_ten_percent():
    cfg = TrainConfig(data="", out="", lr=1e-3, warmup_steps=10)
    assert lr_at(0, 100, cfg) == 1e-4
    assert abs(lr_at(9, 100, cfg) - 1e-3) < 1e-12
    assert abs(lr_at(100, 100, cfg) - 1e-4) < 1e-12
    assert lr_at(50, 100, cfg) < lr_at(20, 100, cfg)


def test_uptraining_starts_from_a_model_folder_with_its_kv_heads_pooled(tmp_path):
    """--init DIR --kv-heads G: the run starts from the folder's (int8) weights grouped into
    G kv heads, logs both starting val losses, and trains the grouped model further."""
    make_data(tmp_path)
    torch.set_num_threads(2)
    common = dict(data=str(tmp_path / "data"), preset="test-tiny", batch_size=4, micro_batch=2, seq_len=64,
                  warmup_steps=3, eval_batches=2, log_every=1, workers=0, compile=False)
    first = tmp_path / "first"
    train(TrainConfig(out=str(first), tokens=20 * 4 * 64, lr=3e-3, eval_every=20, save_every=20, **common))
    cfg = ModelConfig.load(first / "config.json")
    folder = tmp_path / "mha"
    save_model_folder(folder, cfg, read_safetensors(first / "final.safetensors"), first / "tokenizer.json", int8=True)
    mha_val = [json.loads(x)["val_loss"] for x in (first / "train_log.jsonl").read_text().splitlines()
               if "val_loss" in x][-1]

    out = tmp_path / "gqa"
    train(TrainConfig(out=str(out), tokens=10 * 4 * 64, lr=1e-3, eval_every=10, save_every=10,
                      init=str(folder), kv_heads=1, **common))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    init = next(r for r in log if r.get("event") == "init")
    assert init["source_kv_heads"] == cfg.n_kv_heads == 4
    assert abs(init["source_val_loss"] - mha_val) < 0.05  # the int8 folder is the trained model
    assert init["val_loss"] > init["source_val_loss"]  # pooling four heads into one costs something
    assert log[-2]["val_loss"] < init["val_loss"]  # which the further steps win back in part
    new = ModelConfig.load(out / "config.json")
    assert new.n_kv_heads == 1 and new.n_heads == 4 and new.eos_ids == cfg.eos_ids
    model = Transformer(new)
    model.load_state_dict(load_file(str(out / "final.safetensors")))
    assert model.state_dict()["layers.0.attention.wk.weight"].shape == (new.head_dim, new.dim)
