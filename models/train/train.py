"""Train a model preset on prepare.py's data: a plain nanoGPT-style loop.

    python3 -m models.train.train --data DATA --out OUT --preset default --minutes 20
    torchrun --standalone --nproc_per_node 8 -m models.train.train --data DATA --out OUT ...

bf16 autocast, SDPA (inside the model), torch.compile, fused AdamW, warmup then cosine
to 10% of the peak learning rate, DDP over NCCL when started by torchrun (the loop
itself is loop.py's, shared with distill.py). With
--minutes the schedule's length comes from the tokens/s measured after the first steps;
with --tokens it is fixed. Writes OUT/train_log.jsonl, OUT/config.json,
OUT/tokenizer.json, OUT/final.safetensors (fp32, model.py's parameter names) and
checkpoints OUT/ckpt.safetensors + OUT/ckpt.optim.safetensors + OUT/ckpt.json (the
optimizer state as plain tensors: no pickle anywhere; only --resume reads them).

MFU = model FLOPs / (989e12 x GPUs): 989 TFLOP/s is the H200's dense bf16 peak; model
FLOPs per token = 6 x params + 12 x layers x seq_len x dim (attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..format.config import ModelConfig, preset
from ..model import Transformer
from .data import load_meta
from .fim import FimIds
from .loop import (  # noqa: F401  (lr_at, flops_per_token: this module's names before loop.py)
    RunLog,
    finish_run,
    flops_per_token,
    load_checkpoint,
    lr_at,
    make_batches,
    make_optimizer,
    parse_config,
    run_loop,
    start_record,
    start_session,
)


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "default"
    minutes: float = 0.0  # time budget of the loop; 0: use --tokens
    tokens: int = 0  # total training tokens (all GPUs); used when minutes == 0
    batch_size: int = 32  # rows per GPU per optimizer step
    micro_batch: int = 32  # rows per forward pass (gradient accumulation = batch / micro)
    seq_len: int = 2048
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 300
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_batches: int = 4  # per GPU; the val split is ~0.5% of the corpus
    save_every: int = 2000
    log_every: int = 10
    measure_steps: int = 20  # steps timed (after compilation) to size the schedule
    workers: int = 4
    seed: int = 0
    compile: bool = True
    dtype: str = "bfloat16"  # autocast dtype on CUDA; "float32" disables autocast
    resume: bool = False
    init: str = ""  # start from this model folder's weights (int8 ones are dequantized), not random
    kv_heads: int = 0  # with --init: mean-pool its kv heads into this many groups first (GQA uptraining)


def model_config_for(preset_name: str, data_dir: str, seq_len: int) -> ModelConfig:
    """The preset with our tokenizer's special ids and the data's vocabulary size."""
    meta = load_meta(data_dir)
    ids = FimIds()
    return preset(preset_name, vocab_size=meta["vocab_size"], max_seq_len=seq_len,
                  eos_ids=[ids.eot], pad_id=6, fim_prefix_id=ids.prefix, fim_suffix_id=ids.suffix,
                  fim_middle_id=ids.middle, fim_pad_id=ids.pad, file_sep_id=ids.file_sep,
                  fim_order="spm")


def initial_weights(cfg: TrainConfig, vocab_size: int):
    """(config, weights) to start from: the --init folder's, kv heads grouped by --kv-heads;
    also the folder's own (config, weights) for comparison."""
    from ..format.folder import dequantize, open_model_folder
    from ..gqa import group_kv_heads

    folder = open_model_folder(cfg.init)
    if folder.config.vocab_size != vocab_size:
        raise ValueError(f"{cfg.init}: vocabulary {folder.config.vocab_size}, the data's is {vocab_size}")
    if folder.config.max_seq_len < cfg.seq_len:
        raise ValueError(f"{cfg.init}: context {folder.config.max_seq_len} < --seq-len {cfg.seq_len}")
    source = dequantize(folder.load_weights())
    mcfg, weights = group_kv_heads(folder.config, source, cfg.kv_heads or folder.config.n_kv_heads)
    return mcfg, weights, folder.config, source


def model_from_weights(mcfg: ModelConfig, weights: dict) -> Transformer:
    model = Transformer(mcfg)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=True)
    return model


def train(cfg: TrainConfig) -> dict:
    """Run the loop; returns the final summary (also the last line of train_log.jsonl)."""
    session = start_session(cfg)
    device = session.device
    if cfg.kv_heads and not cfg.init:
        raise ValueError("--kv-heads groups the kv heads of an --init model folder; give --init too")
    if cfg.init:
        mcfg, init_weights, source_cfg, source_weights = initial_weights(cfg, load_meta(cfg.data)["vocab_size"])
        model = model_from_weights(mcfg, init_weights)
    else:
        mcfg = model_config_for(cfg.preset, cfg.data, cfg.seq_len)
        model = Transformer(mcfg)
        model.init_weights(cfg.seed)
    model.to(device)
    opt = make_optimizer(model, cfg, fused=device.type == "cuda")
    state = {"step": 0, "tokens": 0, "total_steps": 0, "elapsed_s": 0.0}
    if cfg.resume and (session.out / "ckpt.json").exists():
        state = load_checkpoint(session.out, model, opt)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if session.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    autocast = session.autocast(cfg.dtype)
    batches, val = make_batches(cfg, session, FimIds(), state["step"])
    accum = max(1, cfg.batch_size // cfg.micro_batch)
    tokens_per_step = cfg.micro_batch * accum * cfg.seq_len * session.world
    fpt = flops_per_token(mcfg, cfg.seq_len)
    log = RunLog(session)

    def forward_loss(batch: torch.Tensor, net=None) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits = (model if net is None else net)(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(net=None) -> float:
        net = model if net is None else net
        net.eval()
        losses = torch.stack([forward_loss(b, net) for b in val]).mean()
        net.train()
        if session.ddp:
            torch.distributed.all_reduce(losses, op=torch.distributed.ReduceOp.AVG)
        return losses.item()

    log.emit(start_record(cfg, mcfg, session, tokens_per_step, fpt))
    if cfg.init and not state["step"]:
        # the starting point's val loss, and the source model's when its kv heads were pooled
        record = {"event": "init", "from": cfg.init, "val_loss": round(evaluate(raw_model), 4)}
        if source_cfg.n_kv_heads != mcfg.n_kv_heads:
            source = model_from_weights(source_cfg, source_weights).to(device)
            record.update(source_kv_heads=source_cfg.n_kv_heads, source_val_loss=round(evaluate(source), 4))
            del source
        log.emit(record)
    summary = run_loop(cfg, session, model, raw_model, opt, batches, lambda batch: (forward_loss(batch), {}),
                       lambda: {"val_loss": evaluate()}, tokens_per_step, fpt, state, log)
    finish_run(cfg, session, raw_model, mcfg, summary, log, {"preset": cfg.preset})
    return summary


def main(argv: list[str] | None = None) -> None:
    train(parse_config(TrainConfig, argv, "train", __doc__.split("\n")[0]))


if __name__ == "__main__":
    main()
