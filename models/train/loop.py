"""The training loop both train.py and distill.py run: devices and DDP, the loaders, the
warmup + cosine schedule sized by --minutes, gradient accumulation, clipping, the JSONL
log (tokens/s, MFU), periodic validation, checkpoints (safetensors only, no pickle) and
the final weights. A script supplies the model, the optimizer and `step_loss`.

MFU = model FLOPs / (989e12 x GPUs): 989 TFLOP/s is the H200's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format.config import ModelConfig
from .data import PackConfig, PackedBatches, fixed_batches
from .fim import FimIds

PEAK_FLOPS_PER_GPU = 989e12  # H200 dense bf16


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Linear warmup, then cosine from lr down to min_lr_ratio * lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def flops_per_token(mcfg: ModelConfig, seq_len: int, train: bool = True) -> float:
    """Model FLOPs per token: 6·params + 12·layers·seq_len·dim for a training step (forward
    and backward), a third of that for a forward pass only."""
    flops = 6 * mcfg.n_params() + 12 * mcfg.n_layers * seq_len * mcfg.dim
    return flops if train else flops / 3


def make_optimizer(model: torch.nn.Module, cfg, fused: bool) -> torch.optim.AdamW:
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


@dataclass
class Session:
    """Where this process trains: its device, its rank among DDP processes, its output folder."""

    device: torch.device
    rank: int
    world: int
    ddp: bool
    out: Path

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self, dtype: str):
        """bf16 (or the named dtype) autocast on CUDA; nothing on a CPU or for float32."""
        if self.device.type == "cuda" and dtype != "float32":
            return torch.autocast("cuda", dtype=getattr(torch, dtype))
        return nullcontext()


def start_session(cfg) -> Session:
    """DDP over NCCL when started by torchrun, else one process on CUDA or the CPU."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.distributed.init_process_group("nccl")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Session(device, rank, world, ddp, out)


def make_batches(cfg, session: Session, ids: FimIds, start_step: int) -> tuple[Iterator[torch.Tensor], list]:
    """(endless training batches of micro_batch rows, the fixed validation batches)."""
    pack = PackConfig(seq_len=cfg.seq_len, batch_size=cfg.micro_batch, seed=cfg.seed + start_step)
    loader = torch.utils.data.DataLoader(
        PackedBatches(cfg.data, "train", pack, ids, session.rank, session.world), batch_size=None,
        num_workers=cfg.workers, pin_memory=session.device.type == "cuda",
        persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers > 0 else None)
    val_pack = PackConfig(seq_len=cfg.seq_len, batch_size=cfg.micro_batch, seed=12345)
    val = fixed_batches(cfg.data, "val", val_pack, ids, cfg.eval_batches, session.rank, session.world)
    return iter(loader), val


class RunLog:
    """train_log.jsonl (one JSON object a line) and the same on stdout, rank 0 only."""

    def __init__(self, session: Session):
        self.file = open(session.out / "train_log.jsonl", "a") if session.master else None

    def emit(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            print(json.dumps(record), flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def followed_total_steps(log_path: str | Path) -> int | None:
    """The planned steps of another run's log (its `schedule` line), once it has one."""
    try:
        lines = Path(log_path).read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if '"schedule"' in line:
            return int(json.loads(line)["total_steps"])
    return None


def run_loop(cfg, session: Session, model, raw_model, opt, batches: Iterator[torch.Tensor],
             step_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]], evaluate: Callable[[], dict],
             tokens_per_step: int, model_flops_per_token: float, state: dict, log: RunLog,
             follow: str = "", student_flops_per_token: float = 0.0) -> dict:
    """Optimizer steps until the schedule (or --minutes) ends; returns the `end` summary.

    step_loss(micro batch) -> (loss to backpropagate, {name: detached scalar} to log);
    evaluate() -> {name: float} for the validation lines. With `follow` (another run's
    train_log.jsonl) the schedule's length is that run's planned steps, so two runs over
    the same batches end on the same step (a baseline beside a distillation)."""
    device, ddp, world = session.device, session.ddp, session.world
    accum = max(1, cfg.batch_size // cfg.micro_batch)
    total_steps = state["total_steps"] or (cfg.tokens // tokens_per_step if not cfg.minutes else 0)
    step = state["step"]
    budget_s = cfg.minutes * 60 - state["elapsed_s"]
    loop_start = time.time()
    window_start, window_tokens = time.time(), 0
    measure_from = step + 5  # skip compilation and warm-up of the loader
    measured_at = None
    stop = False

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    while not stop:
        if follow and not total_steps:
            total_steps = followed_total_steps(follow) or 0
            if total_steps:
                log.emit({"event": "schedule", "step": step, "total_steps": total_steps, "followed": follow,
                          "planned_tokens": total_steps * tokens_per_step})
        if cfg.minutes and not total_steps and not follow and step == measure_from:
            synchronize()
            measured_at = (time.time(), step)
        if cfg.minutes and not total_steps and not follow and measured_at and step == measured_at[1] + cfg.measure_steps:
            synchronize()
            s_per_step = (time.time() - measured_at[0]) / cfg.measure_steps
            eval_s = s_per_step / accum / 3 * cfg.eval_batches  # forward passes only
            left_s = budget_s - (time.time() - loop_start)
            steps_left = left_s / (s_per_step + eval_s / cfg.eval_every) * 0.97
            planned = torch.tensor([step + max(1, int(steps_left))], device=device)
            if ddp:
                torch.distributed.broadcast(planned, 0)
            total_steps = int(planned.item())
            log.emit({"event": "schedule", "step": step, "total_steps": total_steps,
                      "s_per_step": round(s_per_step, 4), "tokens_per_s": round(tokens_per_step / s_per_step),
                      "planned_tokens": total_steps * tokens_per_step})
        lr = lr_at(step, total_steps or 10**9, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            sync = nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
            with sync:
                loss, parts = step_loss(next(batches))
                (loss / accum).backward()
            for name, value in {"loss": loss.detach(), **parts}.items():
                sums[name] = sums.get(name, 0) + value / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        state["tokens"] += tokens_per_step
        window_tokens += tokens_per_step

        if step % cfg.log_every == 0 or step == 1:
            values = torch.stack([sums[k] for k in sums])
            if ddp:
                torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.AVG)
            logged = dict(zip(sums, values.tolist(), strict=True))  # synchronises
            now = time.time()
            tps = window_tokens / max(now - window_start, 1e-9)
            record = {"step": step, **{k: round(v, 4) for k, v in logged.items()}, "lr": lr,
                      "grad_norm": round(grad_norm.item(), 3), "tokens": state["tokens"], "tokens_per_s": round(tps),
                      "mfu": round(model_flops_per_token * tps / (PEAK_FLOPS_PER_GPU * world), 4)}
            if student_flops_per_token:
                record["mfu_student"] = round(student_flops_per_token * tps / (PEAK_FLOPS_PER_GPU * world), 4)
            record["elapsed_s"] = round(state["elapsed_s"] + now - loop_start, 1)
            log.emit(record)
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
            log.emit({"step": step, **{k: round(v, 4) for k, v in evaluate().items()}, "tokens": state["tokens"]})
        if session.master and (step % cfg.save_every == 0 or stop):
            save_checkpoint(session.out, raw_model, opt, {**state, "step": step, "total_steps": total_steps,
                                                          "elapsed_s": state["elapsed_s"] + time.time() - loop_start})
    return {"event": "end", "step": step, "tokens": state["tokens"],
            "elapsed_s": round(state["elapsed_s"] + time.time() - loop_start, 1)}


def finish_run(cfg, session: Session, raw_model, mcfg: ModelConfig, summary: dict, log: RunLog,
               metadata: dict | None = None) -> None:
    """final.safetensors (fp32, model.py's names), config.json, the data's tokenizer and
    manifest; the `end` line; DDP torn down."""
    if session.master:
        out = session.out
        weights = {k: v.detach().float().cpu().contiguous() for k, v in raw_model.state_dict().items()}
        save_file(weights, str(out / "final.safetensors"), metadata={"step": str(summary["step"]), **(metadata or {})})
        mcfg.save(out / "config.json")
        shutil.copy(Path(cfg.data) / "tokenizer.json", out / "tokenizer.json")
        if (Path(cfg.data) / "manifest.json").exists():
            shutil.copy(Path(cfg.data) / "manifest.json", out / "manifest.json")
        log.emit(summary)
    log.close()
    if session.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def start_record(cfg, mcfg: ModelConfig, session: Session, tokens_per_step: int, fpt: float, **extra) -> dict:
    """The log's first line: the run's configuration."""
    return {"event": "start", "config": asdict(cfg), "model": mcfg.to_dict(), "params": mcfg.n_params(),
            "world_size": session.world, "tokens_per_step": tokens_per_step, "flops_per_token": fpt,
            "peak_flops_per_gpu": PEAK_FLOPS_PER_GPU, "device": str(session.device), **extra}


def parse_config(config_class, argv: list[str] | None, prog: str, description: str):
    """A run's config dataclass from the command line: one flag per field (`--field-name`),
    booleans as --x/--no-x, `data` and `out` required."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    for name, value in asdict(config_class(data="", out="")).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value, required=name in ("data", "out"))
    return config_class(**vars(ap.parse_args(argv)))
