"""Distil a teacher into a student with the teacher in the loop (one GPU, or the CPU).

    python3 -m models.train.distill --data DATA --out RUN --teacher QWEN.gguf --init STUDENT --minutes 10
    python3 -m models.train.distill --data DATA --out BASE --init STUDENT --baseline --follow RUN/train_log.jsonl

The student starts from a model folder (`--init`, e.g. prune.py's pruned teacher) and
shares the teacher's tokenizer. Each batch runs through the teacher (no gradient; the
GGUF dequantized, bf16 on CUDA, torch.compile) and the student; the loss, position by
position, is

    kl_weight · KL(teacher ‖ student) + (1 - kl_weight) · CE(next token)

with the teacher's distribution kept as its top-k tokens plus the rest of its mass as one
bucket (the student's mass outside those k tokens is the other side of that bucket).
The 152k-wide logits never exist for a whole batch: both heads run `loss_chunk`
positions at a time, and the student's gradient for each chunk is taken as it is made
(ChunkedVocabLoss), so memory holds one chunk's logits. `--baseline` runs without the teacher:
CE only, the same student init, the same batches (same seed), and with `--follow` the
distillation run's planned steps, so the two end on the same tokens; the baseline needs
no teacher and can run beside the distillation on the same GPU.

The loop (schedule by --minutes, log with tokens/s and MFU, checkpoints, --resume) is
loop.py's, as train.py's. MFU counts the student's training FLOPs plus the teacher's
forward FLOPs; `mfu_student` the student's alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..format.config import ModelConfig
from ..prune import load_teacher, teacher_model
from .data import load_meta
from .fim import FimIds
from .loop import (
    RunLog,
    finish_run,
    flops_per_token,
    load_checkpoint,
    make_batches,
    make_optimizer,
    parse_config,
    run_loop,
    start_record,
    start_session,
)
from .train import TrainConfig, model_from_weights

LOG_FLOOR = -80.0  # a bucket's log-probability when the top-k tokens hold all the mass


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = ""  # .gguf file or model folder; not read with --baseline
    kl_weight: float = 0.9  # share of the KL term; the rest is plain next-token cross-entropy
    top_k: int = 64  # teacher tokens kept per position (the rest is one bucket)
    loss_chunk: int = 4096  # positions per vocabulary-wide chunk of the loss
    baseline: bool = False  # no teacher: CE only on the same batches, for what distillation bought
    follow: str = ""  # another run's train_log.jsonl whose planned steps this run takes
    init_shape: str = ""  # with a teacher: write --init first, the teacher pruned to this shape (prune.py)
    calibration_rows: int = 32  # training rows the pruning's statistics come from
    lr: float = 1e-3
    warmup_steps: int = 100
    batch_size: int = 32
    micro_batch: int = 16


@torch.no_grad()
def teacher_targets(features: torch.Tensor, weight: torch.Tensor, k: int, chunk: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's next-token distributions at N positions, kept as (top-k ids (N, k),
    their log-probabilities (N, k), the log-probability of all other tokens (N,)), from
    its head features (N, d) and vocabulary matrix (V, d), a chunk of positions at a time."""
    ids, logp, rest = [], [], []
    for start in range(0, features.shape[0], chunk):
        z = (features[start:start + chunk] @ weight.to(features.dtype).T).float()  # (c, V)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        top, idx = z.topk(k, dim=-1)
        ids.append(idx)
        logp.append(top - lse)
        others = torch.logsumexp(z.scatter(1, idx, float("-inf")), dim=-1, keepdim=True) - lse
        rest.append(others.clamp(min=LOG_FLOOR)[:, 0])
    return torch.cat(ids), torch.cat(logp), torch.cat(rest)


def chunk_loss(features, weight, targets, top_ids, top_logp, rest_logp, kl_weight: float):
    """Sums over a chunk of positions: (loss, CE, KL). features (c, r), weight (V, r);
    the teacher tensors None for CE only."""
    z = (features @ weight.to(features.dtype).T).float()  # (c, V)
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(1, targets[:, None])[:, 0]
    if top_ids is None:
        return ce.sum(), ce.sum().detach(), torch.zeros((), device=z.device)
    logq_top = z.gather(1, top_ids) - lse[:, None]
    logq_rest = (torch.logsumexp(z.scatter(1, top_ids, float("-inf")), dim=-1) - lse).clamp(min=LOG_FLOOR)
    kl = (top_logp.exp() * (top_logp - logq_top)).sum(-1) + rest_logp.exp() * (rest_logp - logq_rest)
    loss = kl_weight * kl + (1 - kl_weight) * ce
    return loss.sum(), ce.sum().detach(), kl.sum().detach()


class ChunkedVocabLoss(torch.autograd.Function):
    """Mean loss over N positions of logits = features @ weightᵀ, a chunk at a time; each
    chunk's gradients (for the features and the vocabulary matrix) are taken in the
    forward pass, so no chunk's logits outlive it. Returns (loss, mean CE, mean KL)."""

    @staticmethod
    def forward(ctx, features, weight, targets, top_ids, top_logp, rest_logp, kl_weight, chunk, loss_fn):
        n = features.shape[0]
        grad_f = torch.empty_like(features)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        sums = torch.zeros(3, device=features.device)
        w = weight.detach().requires_grad_()
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            f = features[start:end].detach().requires_grad_()
            teacher = (None, None, None) if top_ids is None else (top_ids[start:end], top_logp[start:end],
                                                                  rest_logp[start:end])

            def with_grads(fn, f=f, teacher=teacher, start=start, end=end):
                with torch.enable_grad():
                    loss, ce, kl = fn(f, w, targets[start:end], *teacher, kl_weight)
                    return (loss, ce, kl, *torch.autograd.grad(loss, (f, w)))

            try:
                loss, ce, kl, gf, gw = with_grads(loss_fn)
            except Exception as e:  # noqa: BLE001  (a compiled loss whose backward fails: eager from now on)
                if not isinstance(loss_fn, EagerFallback) or loss_fn.fn is loss_fn.eager:
                    raise
                loss_fn.give_up(e)
                loss, ce, kl, gf, gw = with_grads(loss_fn)
            grad_f[start:end] = gf
            grad_w += gw.float()
            sums += torch.stack([loss.detach(), ce, kl])
        ctx.save_for_backward(grad_f, grad_w.to(weight.dtype))
        ctx.n = n
        means = sums / n
        ctx.mark_non_differentiable(means[1], means[2])
        return means[0], means[1], means[2]

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_f, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return grad_f * scale.to(grad_f.dtype), grad_w * scale.to(grad_w.dtype), None, None, None, None, None, None, None


def vocab_loss(features, weight, targets, teacher=None, kl_weight: float = 0.0, chunk: int = 4096,
               loss_fn=chunk_loss):
    """(loss, CE, KL) means over positions; features (N, r), targets (N,), teacher
    teacher_targets' triple or None (CE only)."""
    top_ids, top_logp, rest_logp = teacher if teacher is not None else (None, None, None)
    return ChunkedVocabLoss.apply(features, weight, targets, top_ids, top_logp, rest_logp, kl_weight, chunk, loss_fn)


@torch.no_grad()
def vocab_loss_sums(features, weight, targets, teacher=None, chunk: int = 4096) -> tuple[float, float]:
    """(Σ CE, Σ KL) over positions, no gradients (validation)."""
    ce = kl = 0.0
    for start in range(0, features.shape[0], chunk):
        part = None if teacher is None else tuple(t[start:start + chunk] for t in teacher)
        _, c, k = chunk_loss(features[start:start + chunk], weight, targets[start:start + chunk],
                             *(part or (None, None, None)), 0.0)
        ce, kl = ce + float(c), kl + float(k)
    return ce, kl


class EagerFallback:
    """A compiled function that, should its first call fail (a compiler that cannot handle
    some op on this machine), says so once and runs the eager one from then on: a run that
    starts detached on a GPU must not die of an optimisation."""

    def __init__(self, compiled, eager, name: str):
        self.fn, self.eager, self.name, self.tried = compiled, eager, name, False

    def __call__(self, *args, **kwargs):
        if self.tried:
            return self.fn(*args, **kwargs)
        self.tried = True
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (any compiler error: the eager function still works)
            self.give_up(e)
            return self.fn(*args, **kwargs)

    def give_up(self, error: Exception) -> None:
        print(json.dumps({"event": "compile_failed", "what": self.name, "error": repr(error)[:500]}), flush=True)
        self.fn = self.eager


def write_pruned_student(cfg: DistillConfig, tcfg: ModelConfig, tweights: dict, teacher, device) -> None:
    """prune.py's student of shape cfg.init_shape, calibrated on training rows, as cfg.init."""
    from ..prune import StudentShape, calibration_rows, student_config, write_student

    shape = StudentShape.parse(cfg.init_shape)
    rows = calibration_rows(cfg.data, student_config(tcfg, shape), cfg.calibration_rows, cfg.seq_len).to(device)
    info = write_student(cfg.init, tcfg, tweights, teacher, shape, rows, Path(cfg.data) / "tokenizer.json",
                         Path(cfg.teacher).name, max(2048, cfg.seq_len))
    print(json.dumps({"event": "pruned", **info}), flush=True)


def check_student(mcfg: ModelConfig, teacher_cfg: ModelConfig | None, data_vocab: int) -> None:
    if mcfg.vocab_size != data_vocab:
        raise ValueError(f"the student's vocabulary is {mcfg.vocab_size}, the data's {data_vocab}")
    if teacher_cfg is not None and teacher_cfg.vocab_size != mcfg.vocab_size:
        raise ValueError(f"the teacher's vocabulary is {teacher_cfg.vocab_size}, the student's {mcfg.vocab_size}")


def distill(cfg: DistillConfig) -> dict:
    """Run the distillation (or the baseline); returns the `end` summary."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise ValueError("distill.py runs one process (one GPU): the teacher is replicated per process otherwise")
    if not cfg.init:
        raise ValueError("--init STUDENT_FOLDER is required (prune.py init writes one, or --init-shape here)")
    if not cfg.baseline and not cfg.teacher:
        raise ValueError("--teacher is required unless --baseline")
    session = start_session(cfg)
    device = session.device
    from ..format.folder import dequantize, open_model_folder

    teacher = tcfg = None
    if not cfg.baseline:
        tcfg, tweights, _ = load_teacher(cfg.teacher)
        teacher = teacher_model(tcfg, tweights, str(device))
        if cfg.init_shape and not (Path(cfg.init) / "config.json").is_file():
            # prune the teacher here: one dequantization of the GGUF serves both
            write_pruned_student(cfg, tcfg, tweights, teacher, device)
        del tweights
    elif cfg.init_shape:
        raise ValueError("--init-shape prunes the teacher: not with --baseline")
    folder = open_model_folder(cfg.init)
    mcfg = folder.config
    model = model_from_weights(mcfg, dequantize(folder.load_weights())).to(device)
    check_student(mcfg, tcfg, load_meta(cfg.data)["vocab_size"])
    opt = make_optimizer(model, cfg, fused=device.type == "cuda")
    state = {"step": 0, "tokens": 0, "total_steps": 0, "elapsed_s": 0.0}
    if cfg.resume and (session.out / "ckpt.json").exists():
        state = load_checkpoint(session.out, model, opt)
    raw_model = model
    features_fn, teacher_fn, loss_fn = model.features, None, chunk_loss
    if teacher is not None:
        teacher_fn = teacher.features
    if cfg.compile:
        from .. import fused_triton

        fused_triton.set_enabled(False)  # compiled graphs fuse the PyTorch ops themselves
        features_fn = EagerFallback(torch.compile(model.features), model.features, "student")
        if teacher is not None:
            teacher_fn = EagerFallback(torch.compile(teacher.features), teacher.features, "teacher")
        loss_fn = EagerFallback(torch.compile(chunk_loss), chunk_loss, "loss")
    autocast = session.autocast(cfg.dtype)
    batches, val = make_batches(cfg, session, FimIds.from_config(mcfg), state["step"])
    accum = max(1, cfg.batch_size // cfg.micro_batch)
    tokens_per_step = cfg.micro_batch * accum * cfg.seq_len
    student_fpt = flops_per_token(mcfg, cfg.seq_len)
    fpt = student_fpt + (flops_per_token(tcfg, cfg.seq_len, train=False) if tcfg else 0)
    log = RunLog(session)

    def targets_of(x: torch.Tensor):
        if teacher_fn is None:
            return None
        with torch.no_grad(), autocast:
            tf = teacher_fn(x)
        return teacher_targets(tf.reshape(-1, tf.shape[-1]), teacher.vocab_weight(), cfg.top_k, cfg.loss_chunk)

    def step_loss(batch: torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        teacher_of_x = targets_of(x)
        with autocast:
            f = features_fn(x)
        loss, ce, kl = vocab_loss(f.reshape(-1, f.shape[-1]), raw_model.vocab_weight(), y.reshape(-1), teacher_of_x,
                                  0.0 if teacher_of_x is None else cfg.kl_weight, cfg.loss_chunk, loss_fn)
        return loss, {"ce": ce, "kl": kl} if teacher_of_x is not None else {}

    # the validation batches' teacher targets, once: (ids, logp, rest) per batch, and the
    # teacher's own cross-entropy on them, the floor the student aims at
    val_targets = [targets_of(b[:, :-1].to(device)) for b in val]

    @torch.no_grad()
    def evaluate() -> dict:
        raw_model.eval()
        ce = kl = 0.0
        for b, t in zip(val, val_targets, strict=True):
            b = b.to(device)
            with autocast:
                f = raw_model.features(b[:, :-1])
            c, k = vocab_loss_sums(f.reshape(-1, f.shape[-1]), raw_model.vocab_weight(), b[:, 1:].reshape(-1), t,
                                   cfg.loss_chunk)
            ce, kl = ce + c, kl + k
        raw_model.train()
        n = sum(b[:, 1:].numel() for b in val)
        return {"val_loss": ce / n} if teacher is None else {"val_loss": ce / n, "val_kl": kl / n}

    @torch.no_grad()
    def teacher_val_loss() -> dict:
        if teacher is None:
            return {}
        ce = 0.0
        for b in val:
            b = b.to(device)
            with autocast:
                tf = teacher.features(b[:, :-1])
            ce += vocab_loss_sums(tf.reshape(-1, tf.shape[-1]), teacher.vocab_weight(), b[:, 1:].reshape(-1),
                                  None, cfg.loss_chunk)[0]
        return {"teacher_val_loss": round(ce / sum(b[:, 1:].numel() for b in val), 4)}

    log.emit(start_record(cfg, mcfg, session, tokens_per_step, fpt, student_flops_per_token=student_fpt,
                          teacher=None if tcfg is None else tcfg.to_dict()))
    if not state["step"]:
        log.emit({"event": "init", "from": cfg.init, **{k: round(v, 4) for k, v in evaluate().items()},
                  **teacher_val_loss()})
    summary = run_loop(cfg, session, model, raw_model, opt, batches, step_loss, evaluate, tokens_per_step, fpt,
                       state, log, follow=cfg.follow, student_flops_per_token=student_fpt if tcfg else 0.0)
    finish_run(cfg, session, raw_model, mcfg, summary, log,
               {"teacher": "" if cfg.baseline else os.path.basename(cfg.teacher), "kl_weight": str(cfg.kl_weight)})
    return summary


def main(argv: list[str] | None = None) -> None:
    distill(parse_config(DistillConfig, argv, "distill", __doc__.split("\n")[0]))


if __name__ == "__main__":
    main()
