"""Train a model preset on prepare.py's data: a plain nanoGPT-style loop.

    python3 -m models.train.train --data DATA --out OUT --preset default --minutes 20
    torchrun --standalone --nproc_per_node 8 -m models.train.train --data DATA --out OUT ...

bf16 autocast, SDPA (inside the model), torch.compile, fused AdamW, warmup then cosine
to 10% of the peak learning rate, DDP over NCCL when started by torchrun. With
--minutes the schedule's length comes from the tokens/s measured after the first steps;
with --tokens it is fixed. Writes OUT/train_log.jsonl, OUT/config.json,
OUT/tokenizer.json, OUT/final.safetensors (fp32, model.py's parameter names) and
checkpoints OUT/ckpt.safetensors + OUT/ckpt.optim.safetensors + OUT/ckpt.json (the
optimizer state as plain tensors: no pickle anywhere; only --resume reads them).

MFU = model FLOPs / (989e12 x GPUs): 989 TFLOP/s is the H200's dense bf16 peak; model
FLOPs per token = 6 x params + 12 x layers x seq_len x dim (attention).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..format.config import ModelConfig, preset
from ..model import Transformer
from .data import PackConfig, PackedBatches, fixed_batches, load_meta
from .fim import FimIds

PEAK_FLOPS_PER_GPU = 989e12  # H200 dense bf16


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


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr down to min_lr_ratio * lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> float:
    return 6 * mcfg.n_params() + 12 * mcfg.n_layers * seq_len * mcfg.dim


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def save_checkpoint(out: Path, model, opt, state: dict) -> None:
    """Weights, optimizer moments (as named tensors) and loop state; no pickle."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for p, s in opt.state.items():
        n = names[id(p)]
        tensors[f"exp_avg.{n}"] = s["exp_avg"].detach().cpu().contiguous()
        tensors[f"exp_avg_sq.{n}"] = s["exp_avg_sq"].detach().cpu().contiguous()
        tensors[f"step.{n}"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1).cpu()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / "ckpt.safetensors.tmp"))
    save_file(tensors, str(out / "ckpt.optim.safetensors.tmp"))
    (out / "ckpt.json.tmp").write_text(json.dumps(state) + "\n")
    for name in ("ckpt.safetensors", "ckpt.optim.safetensors", "ckpt.json"):
        os.replace(out / f"{name}.tmp", out / name)


def load_checkpoint(out: Path, model, opt) -> dict:
    model.load_state_dict(load_file(str(out / "ckpt.safetensors")))
    tensors = load_file(str(out / "ckpt.optim.safetensors"))
    for n, p in model.named_parameters():
        if f"exp_avg.{n}" in tensors:
            step = tensors[f"step.{n}"].reshape(())
            opt.state[p] = {"step": step.to(p.device) if opt.defaults.get("fused") else step,
                            "exp_avg": tensors[f"exp_avg.{n}"].to(p.device),
                            "exp_avg_sq": tensors[f"exp_avg_sq.{n}"].to(p.device)}
    return json.loads((out / "ckpt.json").read_text())


def train(cfg: TrainConfig) -> dict:
    """Run the loop; returns the final summary (also the last line of train_log.jsonl)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.distributed.init_process_group("nccl")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0
    out = Path(cfg.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

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
    if cfg.resume and (out / "ckpt.json").exists():
        state = load_checkpoint(out, model, opt)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    use_autocast = device.type == "cuda" and cfg.dtype != "float32"
    autocast = (torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if use_autocast else nullcontext())

    ids = FimIds()
    accum = max(1, cfg.batch_size // cfg.micro_batch)
    pack = PackConfig(seq_len=cfg.seq_len, batch_size=cfg.micro_batch, seed=cfg.seed + state["step"])
    loader = torch.utils.data.DataLoader(
        PackedBatches(cfg.data, "train", pack, ids, rank, world), batch_size=None,
        num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers > 0 else None)
    batches = iter(loader)
    val_pack = PackConfig(seq_len=cfg.seq_len, batch_size=cfg.micro_batch, seed=12345)
    val = fixed_batches(cfg.data, "val", val_pack, ids, cfg.eval_batches, rank, world)

    tokens_per_step = cfg.micro_batch * accum * cfg.seq_len * world
    fpt = flops_per_token(mcfg, cfg.seq_len)
    total_steps = state["total_steps"] or (cfg.tokens // tokens_per_step if not cfg.minutes else 0)
    log = open(out / "train_log.jsonl", "a") if master else None

    def emit(record: dict) -> None:
        if master:
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)

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
        if ddp:
            torch.distributed.all_reduce(losses, op=torch.distributed.ReduceOp.AVG)
        return losses.item()

    emit({"event": "start", "config": asdict(cfg), "model": mcfg.to_dict(), "params": mcfg.n_params(),
          "world_size": world, "tokens_per_step": tokens_per_step, "flops_per_token": fpt,
          "peak_flops_per_gpu": PEAK_FLOPS_PER_GPU, "device": str(device)})
    if cfg.init and not state["step"]:
        # the starting point's val loss, and the source model's when its kv heads were pooled
        record = {"event": "init", "from": cfg.init, "val_loss": round(evaluate(raw_model), 4)}
        if source_cfg.n_kv_heads != mcfg.n_kv_heads:
            source = model_from_weights(source_cfg, source_weights).to(device)
            record.update(source_kv_heads=source_cfg.n_kv_heads, source_val_loss=round(evaluate(source), 4))
            del source
        emit(record)
    step = state["step"]
    budget_s = cfg.minutes * 60 - state["elapsed_s"]
    loop_start = time.time()
    window_start, window_tokens = time.time(), 0
    measure_from = step + 5  # skip compilation and warm-up of the loader
    measured_at = None
    stop = False
    while not stop:
        if cfg.minutes and not total_steps and step == measure_from:
            if device.type == "cuda":
                torch.cuda.synchronize()
            measured_at = (time.time(), step)
        if cfg.minutes and not total_steps and measured_at and step == measured_at[1] + cfg.measure_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            s_per_step = (time.time() - measured_at[0]) / cfg.measure_steps
            eval_s = s_per_step / accum / 3 * cfg.eval_batches  # forward passes only
            left_s = budget_s - (time.time() - loop_start)
            steps_left = left_s / (s_per_step + eval_s / cfg.eval_every) * 0.97
            planned = torch.tensor([step + max(1, int(steps_left))], device=device)
            if ddp:
                torch.distributed.broadcast(planned, 0)
            total_steps = int(planned.item())
            emit({"event": "schedule", "step": step, "total_steps": total_steps,
                  "s_per_step": round(s_per_step, 4),
                  "tokens_per_s": round(tokens_per_step / s_per_step), "planned_tokens": total_steps * tokens_per_step})
        lr = lr_at(step, total_steps or 10**9, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            sync = nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
            with sync:
                loss = forward_loss(next(batches)) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        state["tokens"] += tokens_per_step
        window_tokens += tokens_per_step

        if step % cfg.log_every == 0 or step == 1:
            if ddp:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            loss_value = loss_sum.item()  # synchronises
            now = time.time()
            tps = window_tokens / max(now - window_start, 1e-9)
            emit({"step": step, "loss": round(loss_value, 4), "lr": lr, "grad_norm": round(grad_norm.item(), 3),
                  "tokens": state["tokens"], "tokens_per_s": round(tps),
                  "mfu": round(fpt * tps / (PEAK_FLOPS_PER_GPU * world), 4),
                  "elapsed_s": round(state["elapsed_s"] + now - loop_start, 1)})
            window_start, window_tokens = now, 0
            # hard stop when the budget is spent whatever the plan said; rank 0's clock decides
            over = torch.tensor([int(bool(cfg.minutes) and state["elapsed_s"] + now - loop_start
                                     > cfg.minutes * 60)], device=device)
            if ddp:
                torch.distributed.broadcast(over, 0)
            stop = bool(over.item())
        if total_steps and step >= total_steps:
            stop = True
        if step % cfg.eval_every == 0 or stop:
            emit({"step": step, "val_loss": round(evaluate(), 4), "tokens": state["tokens"]})
        if master and (step % cfg.save_every == 0 or stop):
            save_checkpoint(out, raw_model, opt, {**state, "step": step, "total_steps": total_steps,
                                                  "elapsed_s": state["elapsed_s"] + time.time() - loop_start})

    summary = {"event": "end", "step": step, "tokens": state["tokens"],
               "elapsed_s": round(state["elapsed_s"] + time.time() - loop_start, 1)}
    if master:
        weights = {k: v.detach().float().cpu().contiguous() for k, v in raw_model.state_dict().items()}
        save_file(weights, str(out / "final.safetensors"), metadata={"preset": cfg.preset, "step": str(step)})
        mcfg.save(out / "config.json")
        shutil.copy(Path(cfg.data) / "tokenizer.json", out / "tokenizer.json")
        if (Path(cfg.data) / "manifest.json").exists():
            shutil.copy(Path(cfg.data) / "manifest.json", out / "manifest.json")
        emit(summary)
        log.close()
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="train", description=__doc__.split("\n")[0])
    defaults = TrainConfig(data="", out="")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value, required=name in ("data", "out"))
    train(TrainConfig(**vars(ap.parse_args(argv))))


if __name__ == "__main__":
    main()
