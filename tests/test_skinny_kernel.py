"""The few-row matrix product (models/skinny_triton.py) against torch: plans with and without
split K, bias and residual, 1 to 16 rows; a model whose layers carry plans decodes and
prefills as without them; tune_model on CUDA keeps only plans that fit. On CUDA when there
is one, else through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag is
read when kernels are defined); skipped where Triton is not installed (CI). What CI runs
without Triton is at the end."""

from __future__ import annotations

import textwrap

import pytest
from triton_check import needs_triton, run_check

torch = pytest.importorskip("torch")

CHECK = textwrap.dedent("""
    import torch
    from codecomplete.models import skinny_triton as sk
    from codecomplete.models.format.config import ModelConfig
    from codecomplete.models.model import Transformer, rope_tables

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tol = 3e-2 if dev == "cuda" else 1e-4
    torch.manual_seed(0)
    sk.set_graphs_only(False)  # compare eager outputs on CUDA too
    plans = [sk.SkinnyPlan(32, 64, 4, 3), sk.SkinnyPlan(64, 64, 4, 3, 2), sk.SkinnyPlan(32, 128, 4, 2, 4)]
    for n, k in ((128, 512), (192, 1024)):
        w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
        b = torch.randn(n, device=dev, dtype=dtype)
        for rows in (1, 3, 16, 17, 40, 64):
            x = torch.randn(rows, k, device=dev, dtype=dtype)
            r = torch.randn(rows, n, device=dev, dtype=dtype)
            for plan in plans:
                for bias, res in ((None, None), (b, None), (None, r), (b, r)):
                    ref = x.float() @ w.float().T + (0 if bias is None else bias.float()) + (0 if res is None else res.float())
                    out = sk.linear(x, w, bias, plan, res)
                    assert out.shape == (rows, n) and out.dtype == dtype
                    err = float((out.float() - ref).abs().max())
                    assert err < tol * max(1.0, float(ref.abs().max())), (n, k, rows, plan, err)
    # leading dimensions, a strided x, and the refusals
    x = torch.randn(2, 1, 2 * 512, device=dev, dtype=dtype)[..., ::2]
    w = torch.randn(128, 512, device=dev, dtype=dtype)
    assert sk.linear(x, w, None, plans[0]).shape == (2, 1, 128)
    for bad in (torch.randn(65, 512, device=dev, dtype=dtype),):
        try:
            sk.linear(bad, w, None, plans[0])
        except ValueError as e:
            assert "at most 64 rows" in str(e)
        else:
            raise AssertionError("65 rows accepted")
    assert [sk.block_rows(m) for m in (1, 16, 17, 32, 33, 64, 65)] == [16, 16, 32, 32, 64, 64, 0]
    assert not sk.SkinnyPlan(64, 64, 4, 3).fits(96, 512) and not sk.SkinnyPlan(32, 64, 4, 3, 3).fits(128, 512)

    # a model whose every product has a plan gives what it gives without them
    cfg = ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256,
                      qkv_bias=True)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    model = model.to(device=dev, dtype=dtype).eval()
    tokens = torch.randint(0, 256, (12,), device=dev)
    positions = torch.arange(40, 52, device=dev)
    k_cache, v_cache = model.new_cache(80)

    def attend(i, q, k, v, scale):  # each row alone over its own key: enough to exercise every product
        return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    def outputs():  # rows of each class (12, 5; 20; 40) and past them (70)
        with torch.inference_mode():
            return (model.decode_rows(tokens, positions, attend), model.prefill(tokens[:5], k_cache, v_cache, 0),
                    *(model.prefill(torch.arange(t, device=dev), k_cache, v_cache, 0, last_only=False)
                      for t in (20, 40, 70)))

    before = outputs()
    for role, (weights, biases, residual, owners) in sk.model_products(model).items():
        chosen = {16: sk.SkinnyPlan(32, 64, 4, 3, 2 if residual else 1), 32: sk.SkinnyPlan(64, 64, 4, 2),
                  64: sk.SkinnyPlan(32, 64, 4, 2, 1 if residual else 2)}
        sk._assign(owners, chosen)
    assert {"wqkv", "wo", "w13", "w2", "head"} <= set(sk.model_products(model))
    after = outputs()
    for a, b in zip(before, after):
        scale = max(1.0, float(a.float().abs().max()))
        assert float((a.float() - b.float()).abs().max()) < 4 * tol * scale
    with sk.disabled():
        again = outputs()
    assert all(torch.equal(a, b) for a, b in zip(before, again))  # cuBLAS (or the CPU's products) again
    sk.clear_plans(model)
    assert all(not o.skinny_plans for _, (_, _, _, os_) in sk.model_products(model).items()
               for o in os_ if isinstance(o, torch.nn.Linear)) and not model.head_skinny_plans
    if dev == "cuda":
        sk.set_graphs_only(True)
        with torch.inference_mode():
            x = torch.randn(4, 128, device=dev, dtype=dtype)
            lin = model.layers[0].attention.wo
            lin.skinny_plans = {16: plans[0]}
            assert sk.plan_for(x, lin.skinny_plans) is None  # eager: cuBLAS
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    assert sk.plan_for(x, lin.skinny_plans) == plans[0]
                    assert sk.plan_for(x.float(), lin.skinny_plans) is None  # tuned for half precision
        choices = sk.tune_model(model, candidates={16: plans, 32: plans, 64: plans})
        assert {(c.name, c.rows) for c in choices} == {(r, c) for r in ("wqkv", "wo", "w13", "w2", "head")
                                                        for c in (16, 32, 64)}
        for c in choices:
            assert c.plan is None or (c.plan.fits(*c.shape) and c.best_us < c.cublas_us)
        kept = {c.rows: c.plan for c in choices if c.name == "wo" and c.plan is not None}
        assert model.layers[0].attention.wo.skinny_plans == kept
    print("ok")
""")


@needs_triton
def test_few_row_products_match_torch_and_a_model_with_plans_answers_as_without():
    assert "ok" in run_check(CHECK, timeout=600)


def test_products_keep_torch_without_a_plan_on_a_cpu_or_while_training(monkeypatch):
    """Which products take a plan: one for the row class, kernels on, no gradient, CUDA (or
    Triton's interpreter, stood in for here); otherwise the layer itself runs, and the
    residual (scaled where the architecture scales it) is added after it."""
    from codecomplete.models import skinny_triton as sk
    from codecomplete.models.model import project

    lin = torch.nn.Linear(64, 32, bias=True)
    x, r = torch.randn(3, 64), torch.randn(3, 32)
    assert torch.allclose(project(lin, x, r, 0.5), r + 0.5 * lin(x))
    assert torch.equal(project(lin, x), lin(x))
    plan = sk.SkinnyPlan(32, 64, 4, 3)
    lin.skinny_plans = {16: plan}
    monkeypatch.setattr(sk, "_enabled", True)
    monkeypatch.setattr(sk, "_INTERPRET", False)
    assert sk.plan_for(x, lin.skinny_plans) is None  # a CPU tensor, no interpreter
    monkeypatch.setattr(sk, "_INTERPRET", True)
    assert sk.plan_for(x, lin.skinny_plans) == plan
    with torch.enable_grad():
        assert sk.plan_for(x.clone().requires_grad_(), lin.skinny_plans) is None  # training
    assert sk.plan_for(torch.randn(17, 64), lin.skinny_plans) is None  # the 32-row class has none
    assert sk.plan_for(torch.randn(65, 64), {16: plan, 32: plan, 64: plan}) is None  # past every class
    assert sk.plan_for(x, None) is None
    with sk.disabled():
        assert sk.plan_for(x, lin.skinny_plans) is None
    monkeypatch.setattr(sk, "_INTERPRET", False)
    assert torch.allclose(project(lin, x, r), r + lin(x))


def test_tuning_chooses_nothing_on_a_cpu_model():
    from codecomplete.models import skinny_triton as sk
    from codecomplete.models.format.config import ModelConfig
    from codecomplete.models.model import Transformer

    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32))
    assert sk.tune_model(model) == []
    assert not getattr(model.layers[0].attention.wo, "skinny_plans", None)
