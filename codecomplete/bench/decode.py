"""The batched decode step (Runtime.decode_many): correctness of the varlen kernel, the
graph-captured step and the batched step against each request alone; step time per row
count against the memory-traffic floor; the shipped model's keystrokes with graphs on/off.

Made for one unattended run on a GPU machine: every check and every timing prints what it
did or what failed and goes on; a short table comes last, the full JSON goes to --json-out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import traceback
from collections.abc import Callable

import numpy as np

from codecomplete.bench.common import format_table, progress
from codecomplete.runtime import DEVICES

VARIANTS = {  # name -> TorchRuntime keywords (launch mode, attention of the context)
    "loop": dict(cuda_graphs=False, varlen=False),  # a loop over the requests per layer (the CPU path)
    "eager": dict(cuda_graphs=False),  # one varlen kernel per layer, launched from Python
    "graphs": dict(cuda_graphs=True),  # the varlen step replayed from CUDA graphs (bifurcated)
    "plain": dict(cuda_graphs=True, batch_attention="plain"),  # the same, each row reading the context itself
    # graphs with every matrix product through cuBLAS: captured without the few-row Triton
    # products that tune_model chose (models/skinny_triton.py), to compare the two in one run
    "graphs-cublas": dict(cuda_graphs=True),
}
ALIASES = {"bifurcated": "graphs"}
TINY = dict(vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=4096)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=DEVICES)
    p.add_argument("--model", default="random-7b",
                   help="random-7b (Qwen2.5-Coder-7B-shaped, random bf16 weights made on the device), tiny "
                        "(a small random model, for CPU smoke runs), or a model folder / .gguf")
    p.add_argument("--gguf-tokenizer", default=None, help="random-7b: take the tokenizer of this GGUF file")
    p.add_argument("--layers", type=int, default=0, help="random-7b: layers (default 28)")
    p.add_argument("--rows", default="1,4,16,32,128", help="rows per step (requests = rows / --n)")
    p.add_argument("--n", type=int, default=4, help="rows (candidates) per request")
    p.add_argument("--contexts", default="2048", help="context lengths, comma-separated: requests take them in turn")
    p.add_argument("--decoded", type=int, default=8, help="branch tokens decoded before the timed steps")
    p.add_argument("--steps", type=int, default=16, help="timed steps per repeat (a keystroke's new tokens)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--variants", default="loop,eager,graphs,plain",
                   help=f"comma-separated: {', '.join(VARIANTS)} (bifurcated = graphs)")
    p.add_argument("--checks", default="on", choices=("on", "off"))
    p.add_argument("--latency", default="on", choices=("on", "off"),
                   help="the shipped model's keystrokes through Engine, graphs on and off")
    p.add_argument("--keystrokes", type=int, default=60)
    p.add_argument("--cold", type=int, default=3)
    p.add_argument("--copy-gbps", type=float, default=0.0, help="copy bandwidth for the floor (default: measured)")
    p.add_argument("--json", action="store_true", help="print the full JSON too")
    p.add_argument("--json-out", default=None, help="write the full JSON to this file")


# ------------------------------------------------------------------ random request mixes


def random_requests(rt, seed: int, count: int, max_new: int = 12, context_max: int = 70) -> list[list]:
    """[context, branches] per request after a random history: some decode steps, then
    select_branches, adopt (the context grows along a branch) or branch_from. The same
    seed gives the same requests on any runtime over the same model."""
    rng = np.random.default_rng(seed)
    vocab = rt.config.vocab_size
    out = []
    for _ in range(count):
        state, _ = rt.prefill(rng.integers(0, vocab, int(rng.integers(1, context_max))).tolist())
        n = int(rng.integers(1, 6))
        branches = rt.start_branches(state, n, max_new)
        fed = []
        for _ in range(int(rng.integers(0, 4))):
            fed.append(rng.integers(0, vocab, n).tolist())
            rt.decode(state, branches, fed[-1])
        kind = rng.choice(["as is", "select", "adopt", "branch_from"])
        if kind == "select" and n > 1:
            keep = rng.permutation(n)[: int(rng.integers(1, n))].tolist()
            branches = rt.select_branches(branches, keep)
        elif kind == "adopt" and len(fed) >= 2:
            row = int(rng.integers(0, n))
            state = rt.adopt(state, branches, row, [f[row] for f in fed[1:]], start=1)
            if state is None:
                raise AssertionError("adopt refused a continuation that fits")
            branches = rt.start_branches(state, int(rng.integers(1, 6)), max_new)
        elif kind == "branch_from" and fed:
            rows = rng.integers(0, n, int(rng.integers(1, 5))).tolist()
            branches = rt.branch_from(state, branches, rows, 0, len(fed), max_new)
            if branches is None:
                raise AssertionError("branch_from refused steps that fit")
        out.append([state, branches])
    return out


def batched_against_alone(batched, alone, seed: int, count: int, steps: int):
    """Random subsets of the same random requests step together through decode_many on
    `batched` and one by one through decode on `alone`; yields (batched, alone) logits
    of every request at every step."""
    from codecomplete.runtime.base import DecodeStep

    together, single = random_requests(batched, seed, count), random_requests(alone, seed, count)
    rng = np.random.default_rng(seed + 1000)
    vocab = batched.config.vocab_size
    for _ in range(steps):
        open_ = [i for i, (_, b) in enumerate(together) if b.step < b.max_new_tokens]
        chosen = [i for i in open_ if rng.random() < 0.7] or open_[:1]
        if not chosen:
            return
        tokens = {i: rng.integers(0, vocab, together[i][1].n).tolist() for i in chosen}
        outs = batched.decode_many([DecodeStep(*together[i], tokens[i]) for i in chosen])
        for i, out in zip(chosen, outs, strict=True):
            ref = alone.decode(*single[i], tokens[i])
            if together[i][1].step != single[i][1].step:
                raise AssertionError("decode_many did not advance every request's branches by one step")
            yield out, ref


def tiny_model(seed: int = 0, device: str = "cpu", dtype: str = "fp32", **overrides):
    """A small random Transformer (weights large enough for real argmaxes)."""
    from codecomplete.models.format.config import ModelConfig
    from codecomplete.models.testing import random_torch_model

    return random_torch_model(ModelConfig(**{**TINY, **overrides}), device, dtype, seed, std=0.1)


# ------------------------------------------------------------------ correctness checks


def check_varlen_kernel(device: str, dtype_name: str = "fp32", seed: int = 0) -> dict:
    """The varlen kernel against a float64 reference over random mixes (MHA and GQA,
    contexts of 1..300 tokens, branch steps 0..9, plain and bifurcated layouts, padding
    rows). Poisoned: the cache beyond each context and branch step and the padding rows
    hold NaN; only this step's key may change in the branch caches."""
    import torch

    from codecomplete.bench.reference import bifurcated_attention
    from codecomplete.models import varlen_triton as vt

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    worst, cases = 0.0, 0
    for g, p, d in [(2, 3, 16), (4, 1, 32), (1, 7, 64), (2, 2, 128)]:
        h, layers = g * p, 2
        for plain in (False, True):
            specs = [(int(rng.integers(1, 300)), int(rng.integers(0, 10)), int(rng.integers(1, 6)))
                     for _ in range(int(rng.integers(1, 4)))]
            reqs = []
            for m, step, n in specs:
                ck, cv = (torch.randn(layers, g, m + 33, d, generator=gen) for _ in range(2))
                bk, bv = (torch.randn(layers, n, g, 11, d, generator=gen) for _ in range(2))
                for t in (ck, cv):
                    t[:, :, m:] = float("nan")
                for t in (bk, bv):
                    t[:, :, :, step + 1:] = float("nan")
                reqs.append(vt.VarlenRequest(*(t.to(device, dtype) for t in (ck, cv)), m,
                                             *(t.to(device, dtype) for t in (bk, bv)), step))
            rows = sum(n for *_, n in specs)
            slots = rows + int(rng.integers(0, 3))
            meta = np.zeros((vt.FIELDS, slots), np.int64)
            scratch = [torch.zeros(layers, 1, g, 1, d, device=device, dtype=dtype) for _ in range(2)]
            vt.fill_meta(meta, reqs, *scratch, plain=plain)
            q, kn, vn = (torch.randn(slots, x, d, generator=gen).to(device, dtype) for x in (h, g, g))
            for t in (q, kn, vn):
                t[rows:] = float("nan")
            layer = int(rng.integers(0, layers))
            before = [(r.branch_k.clone(), r.branch_v.clone()) for r in reqs]
            plan = vt.plan_varlen(slots, 8, h, g, 132 if device == "cuda" else 4)
            out = vt.varlen_bifurcated_attention(q, kn, vn, torch.from_numpy(meta).to(device), layer, plan, d ** -0.5)
            r0 = 0
            for req, (m, step, n), (bk0, bv0) in zip(reqs, specs, before, strict=True):
                kd = torch.cat([bk0[layer, :, :, :step], kn[r0:r0 + n, :, None]], 2).double()
                vd = torch.cat([bv0[layer, :, :, :step], vn[r0:r0 + n, :, None]], 2).double()
                ref = bifurcated_attention(q[r0:r0 + n].double(), req.context_k[layer, :, :m].double(),
                                           req.context_v[layer, :, :m].double(), kd, vd, d ** -0.5)
                err = float((out[r0:r0 + n].double() - ref).abs().max())
                if not err <= tol:  # NaN fails too
                    raise AssertionError(f"rows {r0}..{r0 + n} (context {m}, step {step}, G={g} P={p} D={d}, "
                                         f"plain={plain}): max error {err:.3g} > {tol}")
                worst = max(worst, err)
                expect_k, expect_v = bk0.clone(), bv0.clone()
                expect_k[layer, :, :, step] = kn[r0:r0 + n]
                expect_v[layer, :, :, step] = vn[r0:r0 + n]
                for got, want in ((req.branch_k, expect_k), (req.branch_v, expect_v)):
                    if not torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0)):
                        raise AssertionError("the kernel changed the branch cache beyond this step's key")
                r0 += n
                cases += 1
    return {"cases": cases, "max_abs_error": worst, "tolerance": tol}


def check_decode_many(batched, alone, seeds=(0, 1), tol: float = 1e-4) -> dict:
    """decode_many on `batched` against decode on `alone` over random request mixes."""
    worst, compared = 0.0, 0
    for seed in seeds:
        for out, ref in batched_against_alone(batched, alone, seed, count=6, steps=6):
            err = float(np.abs(out - ref).max() / max(1.0, float(np.abs(ref).max())))
            if not err <= tol:
                raise AssertionError(f"seed {seed}: decode_many differs from the request alone by {err:.3g} > {tol}")
            worst = max(worst, err)
            compared += 1
    return {"compared": compared, "max_rel_error": worst, "tolerance": tol}


def check_top_rows(reducing, whole, seed: int = 0, tol: float = 1e-4) -> dict:
    """decode_many_top on `reducing` (rows reduced on the device, TopRows) against
    decode_many on `whole` over the same random requests: the same best tokens and values,
    the log-sum-exp the sampler computes, and whole rows that survive the next step."""
    from codecomplete.runtime.base import DecodeStep, TopRows
    from codecomplete.sampler import TAIL, TOP_K

    reducing.reduces_rows = True
    mine, ref = random_requests(reducing, seed, 6), random_requests(whole, seed, 6)
    rng = np.random.default_rng(seed + 2000)
    vocab = whole.config.vocab_size
    banned = rng.choice(vocab, size=vocab // 10, replace=False)
    kept: list[tuple[TopRows, np.ndarray]] = []
    compared = 0
    for step in range(4):
        ban = banned if step != 2 else None  # a step that bans nothing, then the banned ids again
        chosen = [i for i, (_, b) in enumerate(mine) if b.step < b.max_new_tokens]
        tokens = {i: rng.integers(0, vocab, mine[i][1].n).tolist() for i in chosen}
        tops = reducing.decode_many_top([DecodeStep(*mine[i], tokens[i]) for i in chosen], [False] * len(chosen),
                                        ban, TOP_K, TAIL)
        fulls = whole.decode_many([DecodeStep(*ref[i], tokens[i]) for i in chosen])
        for top, full in zip(tops, fulls, strict=True):
            if not isinstance(top, TopRows):
                raise AssertionError(f"decode_many_top returned {type(top).__name__}, not TopRows")
            allowed = np.array(full, dtype=np.float32)
            if ban is not None:
                allowed[:, ban] = -np.inf
            best = -np.sort(-allowed, axis=1)[:, :top.values.shape[1]]
            if not np.allclose(-np.sort(-top.values, axis=1), best, atol=tol, rtol=tol):
                raise AssertionError("the reduced rows' best values differ from the whole rows'")
            m = allowed.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.where(allowed >= m - TAIL, np.exp(allowed - m), 0.0).sum(axis=1))
            if not np.allclose(top.lse, lse, atol=1e-3):
                raise AssertionError(f"log-sum-exp differs by {np.abs(top.lse - lse).max():.3g}")
            kept.append((top, np.array(full)))
            compared += 1
    for top, full in kept:  # later steps (graph replays) did not touch the rows kept
        if not np.allclose(top.full(), full, atol=tol, rtol=tol):
            raise AssertionError("a reduced step's whole rows changed after later steps")
    return {"compared": compared, "tolerance": tol}


def check_graph_prefill(batched, alone, tol: float = 1e-4) -> dict:
    """Short prefills (a fresh prompt of 1-2 tokens, a prompt grown by 1 and 2 tokens),
    which a runtime with graphs runs as one-row replays, against the eager prefill; then
    a decode step over each context."""
    rng = np.random.default_rng(11)
    vocab = batched.config.vocab_size
    worst = 0.0
    for first, grown in ((2, 2), (1, 1), (40, 41), (40, 42), (300, 302)):
        prompt = rng.integers(0, vocab, grown).tolist()
        results = []
        for rt in (batched, alone):
            state, logits = rt.prefill(prompt[:first])
            if grown > first:
                state, logits = rt.prefill(prompt, state)
            branches = rt.start_branches(state, 2, 2)
            results.append((logits, rt.decode(state, branches, [3, 4]), state.new_tokens))
        (a, da, na), (b, db, nb) = results
        if na != nb:
            raise AssertionError(f"new_tokens {na} against {nb}")
        scale = max(1.0, float(np.abs(b).max()))
        err = max(float(np.abs(a - b).max()), float(np.abs(da - db).max())) / scale
        if not err <= tol:
            raise AssertionError(f"prefill of {first} then {grown} tokens: error {err:.3g} > {tol}")
        worst = max(worst, err)
    return {"max_rel_error": worst, "tolerance": tol}


def check_fused_chunk(batched, alone, seed: int = 0, tol: float = 1e-4) -> dict:
    """Prefill chunks riding a decode step (decode_many(chunk=)) on `batched` against the
    eager prefill on `alone`: a fresh prompt as long as the graphs' chunk, a short one, a
    chunk after a prefix, a one-token chunk, and one longer than the chunk (a plain prefill
    first). Compared: the chunk's logits and KV (a decode step over its context), and the
    step's other requests' logits."""
    from codecomplete.runtime.base import DecodeStep, PrefillChunk

    c = batched.fused_chunk_tokens
    if c < 2:
        raise AssertionError(f"the runtime fuses no chunks (fused_chunk_tokens {c})")
    rng = np.random.default_rng(seed + 21)
    vocab = batched.config.vocab_size
    worst, fused = 0.0, 0
    cases = ((0, c), (0, 3), (37, c), (37, 1), (70, c - 5), (20, c + 9))
    for k, (prefix, new) in enumerate(cases):
        prompt = rng.integers(0, vocab, prefix + new).tolist()
        mine, ref = random_requests(batched, seed + k, 3), random_requests(alone, seed + k, 3)
        previous = batched.prefill(prompt[:prefix])[0] if prefix else None
        previous_ref = alone.prefill(prompt[:prefix])[0] if prefix else None
        tokens = [rng.integers(0, vocab, b.n).tolist() for _, b in mine]
        chunk = PrefillChunk(prompt, previous, capacity_tokens=len(prompt) + 5)
        outs = batched.decode_many([DecodeStep(*r, t) for r, t in zip(mine, tokens, strict=True)], chunk=chunk)
        refs = [alone.decode(*r, t) for r, t in zip(ref, tokens, strict=True)]
        state_ref, logits_ref = alone.prefill(prompt, previous_ref)
        if chunk.state.tokens != prompt or chunk.state.new_tokens != state_ref.new_tokens:
            raise AssertionError(f"case {k}: the chunk's state holds {len(chunk.state.tokens)} tokens, "
                                 f"{chunk.state.new_tokens} new, against {state_ref.new_tokens}")
        after = [batched.decode(chunk.state, batched.start_branches(chunk.state, 2, 2), [3, 4])]
        after_ref = [alone.decode(state_ref, alone.start_branches(state_ref, 2, 2), [3, 4])]
        for name, a, b in (("other requests", outs, refs), ("chunk logits", [chunk.logits], [logits_ref]),
                           ("decode over the chunk", after, after_ref)):
            for x, y in zip(a, b, strict=True):
                err = float(np.abs(np.asarray(x) - y).max() / max(1.0, float(np.abs(y).max())))
                if not err <= tol:
                    raise AssertionError(f"case {k} (prefix {prefix}, {new} new): {name} differ by {err:.3g} > {tol}")
                worst = max(worst, err)
        if chunk.fused != (new <= c):
            raise AssertionError(f"case {k}: a chunk of {new} tokens (graphs' chunk {c}) fused={chunk.fused}")
        fused += chunk.fused
    return {"cases": len(cases), "fused": fused, "max_rel_error": worst, "tolerance": tol}


def check_varlen_decoder(device: str = "cpu", seed: int = 0) -> dict:
    """The batched CUDA step against the per-request loop and the eager prefill, fp32,
    bifurcated and plain, with and without graphs of buckets up to 8 rows (batches split).
    On CPU it runs through Triton's interpreter (TRITON_INTERPRET=1): a CPU runtime given a
    VarlenDecoder that pads its batches as the graphs do, and DecodeGraphs with its
    replays emulated."""
    from codecomplete.runtime.torch import TorchRuntime
    from codecomplete.runtime.torch_graphs import DecodeGraphs, VarlenDecoder
    from codecomplete.sampler import TAIL, TOP_K

    model = tiny_model(seed, device, n_layers=1, dim=64, ffn_dim=64, vocab_size=97)
    cuda = device == "cuda"
    result = {}
    for attention, graphs in (("bifurcated", False), ("plain", False), ("bifurcated", True), ("plain", True)):
        if cuda:
            batched = TorchRuntime.from_model(model, device="cuda", precision="fp32", batch_attention=attention,
                                              cuda_graphs=graphs, max_batch_rows=8)
        else:
            batched = TorchRuntime.from_model(model, batch_attention=attention)
            batched.varlen = VarlenDecoder(batched, 8, pad_rows=True)
            if graphs:  # reducing the rows in the replay, as TorchRuntime's graphs do
                batched.graphs = DecodeGraphs(batched.varlen, 8, emulate=True, top_k=TOP_K, tail=TAIL)
                batched.graphs.capture_all()
        alone = TorchRuntime.from_model(model, device=device, precision="fp32", cuda_graphs=False, varlen=False)
        name = f"{attention}, {'graphs' if graphs else 'eager'}"
        result[name] = check_decode_many(batched, alone, seeds=(seed,))
        if graphs:
            result[f"short prefill, {name}"] = check_graph_prefill(batched, alone)
            if not batched.graphs.top_k:
                raise AssertionError("the graphs do not reduce their rows in the replay")
            result[f"top rows in the replay, {name}"] = check_top_rows(batched, alone, seed)
    # a prefill chunk riding the step: two layers (the cache's layer offsets), chunks of 16
    model = tiny_model(seed, device, n_layers=2, dim=64, ffn_dim=64, vocab_size=97)
    if cuda:
        batched = TorchRuntime.from_model(model, device="cuda", precision="fp32", max_batch_rows=8,
                                          fused_chunk_tokens=16)
    else:
        batched = TorchRuntime.from_model(model)
        batched.varlen = VarlenDecoder(batched, 8, pad_rows=True)
        batched.graphs = DecodeGraphs(batched.varlen, 8, emulate=True, chunk_tokens=16)
        batched.graphs.capture_all()
    alone = TorchRuntime.from_model(model, device=device, precision="fp32", cuda_graphs=False, varlen=False)
    result["fused prefill chunks"] = check_fused_chunk(batched, alone, seed)
    return result


def _check(report: list, name: str, fn: Callable[[], dict]) -> None:
    """Run one check; record and print its outcome whatever happens."""
    t0 = time.perf_counter()
    try:
        detail = fn()
        report.append({"check": name, "ok": True, "seconds": round(time.perf_counter() - t0, 2), **detail})
        progress(f"  ok    {name} ({time.perf_counter() - t0:.1f} s) {detail}")
    except Exception as e:  # noqa: BLE001 - an unattended run reports every failure and goes on
        report.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=6)})
        progress(f"  FAIL  {name}: {type(e).__name__}: {e}")


def run_checks(args, runtimes: dict) -> list[dict]:
    import torch

    from codecomplete.runtime.torch import TorchRuntime

    report: list[dict] = []
    cuda = args.device == "cuda"
    from codecomplete.models import varlen_triton

    if cuda and varlen_triton.AVAILABLE:
        for dt in ("fp32", "bf16"):
            _check(report, f"varlen kernel vs float64 reference ({dt}, CUDA)", lambda dt=dt: check_varlen_kernel("cuda", dt))
    elif varlen_triton.AVAILABLE and __import__("os").environ.get("TRITON_INTERPRET") == "1":
        _check(report, "varlen kernel vs float64 reference (interpreter)", lambda: check_varlen_kernel("cpu"))
        _check(report, "varlen decode_many vs the loop (interpreter)", check_varlen_decoder)
    else:
        progress("  skip  kernel checks: no Triton on this device (or CPU without TRITON_INTERPRET=1)")
    tiny = tiny_model(1, args.device)
    alone = TorchRuntime.from_model(tiny, device=args.device, precision="fp32", cuda_graphs=False, varlen=False)
    for name in ("loop", "eager", "graphs", "plain"):
        if cuda or name in ("loop", "plain"):
            kw = dict(VARIANTS[name]) if cuda else {"batch_attention": VARIANTS[name].get("batch_attention", "bifurcated")}
            _check(report, f"decode_many ({name}) vs each request alone, fp32 tiny model",
                   lambda kw=kw: check_decode_many(TorchRuntime.from_model(tiny, device=args.device, precision="fp32",
                                                                           **kw), alone, tol=1e-4))
    for name in ("loop", "eager", "graphs"):
        if cuda or name == "loop":
            kw = dict(VARIANTS[name]) if cuda else {}
            _check(report, f"decode_many_top ({name}) vs decode_many, fp32 tiny model",
                   lambda kw=kw: check_top_rows(TorchRuntime.from_model(tiny, device=args.device, precision="fp32", **kw),
                                                alone))
    if cuda:
        _check(report, "short prefill through the graphs vs eager prefill, fp32 tiny model",
               lambda: check_graph_prefill(TorchRuntime.from_model(tiny, device="cuda", precision="fp32",
                                                                   cuda_graphs=True), alone))
        _check(report, "batched step and prefill with graphs of up to 8 rows (batches split), fp32",
               lambda: check_varlen_decoder("cuda"))
    if runtimes:
        _check(report, f"one batched step: every variant vs loop on the timed model ({runtimes['loop'].precision})",
               lambda: _variants_agree(args, runtimes))
    if cuda:
        torch.cuda.empty_cache()
    return report


def _variants_agree(args, runtimes: dict) -> dict:
    """One step of 3 requests (n, 1, n rows) on every variant runtime: logits vs loop's."""
    from codecomplete.runtime.base import DecodeStep

    loop = runtimes["loop"]
    rng = np.random.default_rng(3)
    vocab = loop.config.vocab_size
    contexts = [loop.prefill(rng.integers(0, vocab, m).tolist())[0] for m in (300, 77, 1025)]
    ns = [args.n, 1, args.n]
    tokens = [rng.integers(0, vocab, n).tolist() for n in ns]

    def step(rt):
        branches = [rt.start_branches(c, n, 4) for c, n in zip(contexts, ns, strict=True)]
        rt.decode_many([DecodeStep(c, b, [1] * b.n) for c, b in zip(contexts, branches, strict=True)])
        return np.concatenate(rt.decode_many([DecodeStep(c, b, t) for c, b, t in zip(contexts, branches, tokens,
                                                                                        strict=True)]))

    ref = step(loop)
    out = {}
    for name, rt in runtimes.items():
        if name == "loop":
            continue
        got = step(rt)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        out[name] = {"rel_error": err, "top1_agreement": top1}
        tol = 1e-1 if rt.precision != "fp32" else 1e-4  # bf16 through many random layers drifts (bench attention: 1e-1)
        if not err <= tol:
            raise AssertionError(f"{name}: relative error {err:.3g} against loop > {tol} ({out})")
    return out


# ------------------------------------------------------------------ timing


def variant_runtimes(args, model, tokenizer, names: list[str]) -> dict:
    """A runtime per variant over the same weights (plus 'loop', the reference)."""
    from codecomplete.models import skinny_triton
    from codecomplete.runtime.torch import TorchRuntime

    precision = "bf16" if args.device == "cuda" and args.model != "tiny" else "fp32"
    out = {}
    for name in ["loop"] + [n for n in names if n != "loop"]:
        kw = dict(VARIANTS[name])
        if args.device != "cuda":
            if name not in ("loop", "plain"):
                continue
            kw = {"batch_attention": kw.get("batch_attention", "bifurcated"), "cuda_graphs": False, "varlen": False}
        t0 = time.perf_counter()
        with skinny_triton.disabled() if name == "graphs-cublas" else contextlib.nullcontext():
            out[name] = TorchRuntime.from_model(model, tokenizer, device=args.device, precision=precision, **kw)
        progress(f"  runtime {name}: ready in {time.perf_counter() - t0:.1f} s (warm-up and capture)")
    return out


def measure_copy_gbps(device: str) -> float:
    """Bytes read + written per second by a large device-to-device (or host) copy."""
    import torch

    n = (1 << 30) if device == "cuda" else (1 << 27)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    times = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n / min(times) / 1e9


def time_steps(rt, contexts, n: int, decoded: int, steps: int, repeat: int) -> dict:
    """decode_many over all requests: `decoded` untimed steps, then `steps` timed ones, per
    repeat with fresh branches; step time as the engine sees it (logits on the host)."""
    from codecomplete.runtime.base import DecodeStep

    per_step, keystrokes = [], []
    for _ in range(repeat):
        branches = [rt.start_branches(c, n, decoded + steps) for c in contexts]
        batch = [DecodeStep(c, b, [1] * n) for c, b in zip(contexts, branches, strict=True)]
        for _ in range(decoded):
            rt.decode_many(batch)
        total = 0.0
        for i in range(steps):
            batch = [DecodeStep(c, b, [(i * 7 + j) % rt.config.vocab_size for j in range(n)])
                     for c, b in zip(contexts, branches, strict=True)]
            t0 = time.perf_counter()
            rt.decode_many(batch)
            ms = (time.perf_counter() - t0) * 1000
            per_step.append(ms)
            total += ms
        keystrokes.append(total)
    return {"step_ms": statistics.median(per_step), "step_p95_ms": float(np.percentile(per_step, 95)),
            "keystroke_ms": statistics.median(keystrokes)}


def run_timing(args, runtimes: dict, names: list[str], gbps: float) -> list[dict]:
    import torch

    from codecomplete.runtime.traffic import floor_ms, step_traffic_bytes

    first = next(iter(runtimes.values()))
    cfg = first.config
    lengths = [int(x) for x in args.contexts.split(",")]
    rows_list = [int(x) for x in args.rows.split(",")]
    max_requests = max(max(1, r // args.n) for r in rows_list)
    rng = np.random.default_rng(0)
    progress(f"  prefilling {max_requests} contexts of {lengths} tokens")
    contexts = [first.prefill(rng.integers(0, cfg.vocab_size, lengths[i % len(lengths)]).tolist(),
                              capacity_tokens=lengths[i % len(lengths)])[0] for i in range(max_requests)]
    out = []
    for rows in rows_list:
        n = min(rows, args.n)
        chosen = contexts[:max(1, rows // n)]
        for name, rt in runtimes.items():
            if name not in names:
                continue
            row = {"variant": name, "rows": n * len(chosen), "requests": len(chosen), "n": n,
                   "context": lengths[0] if len(lengths) == 1 else args.contexts}
            try:
                row.update(time_steps(rt, chosen, n, args.decoded, args.steps, args.repeat))
            except Exception as e:  # noqa: BLE001 - report and go on to the next row
                row["error"] = f"{type(e).__name__}: {e}"
                progress(f"  FAIL  timing {name} at {rows} rows: {row['error']}")
                out.append(row)
                continue
            traffic = step_traffic_bytes(cfg, rt.precision, [len(c.tokens) for c in chosen], n,
                                         bifurcated=name != "plain", decoded=args.decoded + args.steps // 2)
            row["floor_ms"] = floor_ms(traffic, gbps)
            row["floor_bifurcated_ms"] = floor_ms(step_traffic_bytes(
                cfg, rt.precision, [len(c.tokens) for c in chosen], n, True, args.decoded + args.steps // 2), gbps)
            row["vs_floor"] = row["step_ms"] / row["floor_ms"]
            row["keystroke_vs_16_floor"] = row["keystroke_ms"] / (args.steps * row["floor_bifurcated_ms"])
            out.append(row)
            progress(f"  {name:7s} rows {row['rows']:4d}: step {row['step_ms']:.3f} ms, floor {row['floor_ms']:.3f} ms "
                     f"(x{row['vs_floor']:.2f}), keystroke {row['keystroke_ms']:.1f} ms")
    for r in out:  # one typist's step at the same variant: the 'many typists for the price of one' figure
        one = next((x for x in out if x["variant"] == r["variant"] and x["requests"] == 1 and "step_ms" in x), None)
        if one and "step_ms" in r:
            r["step_vs_one_request"] = r["step_ms"] / one["step_ms"]
        plain = next((x for x in out if x["variant"] == "plain" and x["rows"] == r["rows"] and "step_ms" in x), None)
        if plain and "step_ms" in r and r["variant"] != "plain":
            r["plain_over_this"] = plain["step_ms"] / r["step_ms"]
    if args.device == "cuda":
        row_peak = torch.cuda.max_memory_allocated() / 2**30
        for r in out:
            r["peak_gib_so_far"] = round(row_peak, 2)
    return out


def run_latency(args) -> dict:
    """The shipped model through Engine, one typist: graphs on against off."""
    from codecomplete.bench.common import TYPING_SAMPLE, bench_prompt_path
    from codecomplete.bench.latency import default_start, replay_engines
    from codecomplete.engine import Engine
    from codecomplete.models.format.source import load_model_source
    from codecomplete.runtime.torch import TorchRuntime

    source = load_model_source(None)
    engines = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        t0 = time.perf_counter()
        rt = TorchRuntime(source, device=args.device, cuda_graphs=graphs if args.device == "cuda" else False)
        engines[name] = Engine(rt)
        progress(f"  engine {name}: loaded in {time.perf_counter() - t0:.1f} s ({rt.describe()})")
    from pathlib import Path

    text = Path(TYPING_SAMPLE).read_text(encoding="utf-8")
    start = default_start(text, args.keystrokes)
    opts = dict(n=4, max_new_tokens=16, deadline_ms=2000.0, multiline=False, prefix_tokens=768, suffix_tokens=256)
    replays = replay_engines(engines, text, bench_prompt_path(str(TYPING_SAMPLE)), "python", start, args.keystrokes,
                             opts, args.cold)
    return {name: {k: r[k] for k in ("warm_p50_ms", "warm_p95_ms", "cold_p50_ms", "cold_p95_ms", "warm_requests",
                                     "cold_requests", "warm_model_calls_mean")} for name, r in replays.items()}


def load_timed_model(args):
    """(model, tokenizer) to time."""
    import torch

    if args.model == "tiny":
        return tiny_model(0, args.device), None
    if args.model == "random-7b":
        from codecomplete.models.testing import (
            gguf_tokenizer,
            qwen7b_shape_config,
            random_torch_model,
            standin_tokenizer,
        )

        cfg = qwen7b_shape_config(**({"n_layers": args.layers} if args.layers else {}))
        tok = gguf_tokenizer(args.gguf_tokenizer, cfg.vocab_size) if args.gguf_tokenizer else standin_tokenizer(cfg)
        return random_torch_model(cfg, args.device, "bf16" if args.device == "cuda" else "fp32"), tok
    from codecomplete.models.format.source import load_model_source
    from codecomplete.runtime.torch import build_torch_model

    source = load_model_source(args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return build_torch_model(source, args.device, dtype), source.tokenizer


def run(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("codecomplete bench decode: --device cuda but torch sees no CUDA device", flush=True)
        return 2
    names = []
    for v in (x.strip() for x in args.variants.split(",") if x.strip()):
        v = ALIASES.get(v, v)
        if v not in VARIANTS:
            raise SystemExit(f"bench decode: unknown variant {v!r} ({', '.join([*VARIANTS, *ALIASES])})")
        if v not in names:
            names.append(v)
    t_start = time.perf_counter()
    result = {"benchmark": "decode", "device": args.device, "model": args.model, "n": args.n,
              "steps": args.steps, "decoded": args.decoded, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    progress(f"bench decode: {args.device}, model {args.model}, variants {names}")
    model = tokenizer = None
    try:
        model, tokenizer = load_timed_model(args)
        result["config"] = model.cfg.to_dict()
    except Exception as e:  # noqa: BLE001
        result["model_error"] = f"{type(e).__name__}: {e}"
        progress(f"  FAIL  loading {args.model}: {result['model_error']}")
    gbps = args.copy_gbps or measure_copy_gbps(args.device)
    result["copy_gbps"] = gbps
    progress(f"  copy bandwidth {gbps:.0f} GB/s (read + write)")
    runtimes = {}
    if model is not None:
        progress("runtimes over the timed model:")
        try:
            runtimes = variant_runtimes(args, model, tokenizer, names)
            # which matrix products run as few-row Triton kernels (chosen at the first load)
            result["few_row_products"] = [c.as_dict() for c in getattr(model, "skinny_choices", [])]
        except Exception as e:  # noqa: BLE001
            result["runtime_error"] = f"{type(e).__name__}: {e}"
            result["runtime_traceback"] = traceback.format_exc(limit=8)
            progress(f"  FAIL  building the variant runtimes: {result['runtime_error']}")
    if args.checks == "on":
        progress("checks:")
        result["checks"] = run_checks(args, runtimes)
    if runtimes:
        progress("timing:")
        try:
            result["rows"] = run_timing(args, runtimes, names, gbps)
        except Exception as e:  # noqa: BLE001
            result["timing_error"] = f"{type(e).__name__}: {e}"
            result["timing_traceback"] = traceback.format_exc(limit=8)
            progress(f"  FAIL  timing: {result['timing_error']}")
    del model, runtimes
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if args.latency == "on":
        progress("the shipped model through Engine, one typist:")
        try:
            result["latency"] = run_latency(args)
        except Exception as e:  # noqa: BLE001
            result["latency_error"] = f"{type(e).__name__}: {e}"
            result["latency_traceback"] = traceback.format_exc(limit=8)
            progress(f"  FAIL  latency: {result['latency_error']}")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    print_summary(result)
    failed = [c for c in result.get("checks", []) if not c["ok"]]
    errors = failed or any(k.endswith("_error") for k in result) or any("error" in r for r in result.get("rows", []))
    return 1 if errors else 0


def print_summary(result: dict) -> None:
    """The short tables, printed last."""
    print(f"\n== bench decode on {result.get('gpu') or result['device']} ({result['model']}), "
          f"{result['seconds']} s; copy bandwidth {result['copy_gbps']:.0f} GB/s", flush=True)
    checks = result.get("checks", [])
    if checks:
        print(format_table([{"check": c["check"], "ok": "ok" if c["ok"] else "FAIL",
                             "detail": c.get("error") or {k: v for k, v in c.items()
                                                          if k not in ("check", "ok", "seconds")}}
                            for c in checks], ["check", "ok", "detail"]))
    if result.get("few_row_products"):
        print(format_table([{**c, "plan": c["plan"] or "cuBLAS"} for c in result["few_row_products"]],
                           ["name", "shape", "matrices", "cublas_us", "best_us", "plan"]))
    if result.get("rows"):
        print(format_table(result["rows"], ["variant", "rows", "requests", "step_ms", "floor_ms", "vs_floor",
                                            "keystroke_ms", "keystroke_vs_16_floor", "step_vs_one_request",
                                            "plain_over_this"]))
    if result.get("latency"):
        print(format_table([{"engine": k, **v} for k, v in result["latency"].items()],
                           ["engine", "warm_p50_ms", "warm_p95_ms", "cold_p50_ms", "cold_p95_ms"]))
    for key in ("model_error", "runtime_error", "timing_error", "latency_error"):
        if key in result:
            print(f"{key}: {result[key]}")
