"""The GGUF placement planner on a table of (model layout, machine) cases, and its CLI."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from localmoe.placement import plan as plan_mod
from localmoe.placement.layout import ModelLayout, read_layout
from localmoe.placement.plan import RAM_RESERVE, VRAM_RESERVE, Budget, make_plan

GiB = 1024**3


def moe_layout(*, n_layers: int, expert_bytes: int, dense_bytes: int, n_experts: int, top_k: int, embd: int = 2048,
               vocab: int = 151936, embed_bytes: int = 190_000_000, output_bytes: int = 250_000_000,
               kv_heads: int = 4, head_dim: int = 128, ctx: int = 40960, quant: str = "Q4_K_M") -> ModelLayout:
    total = n_layers * (expert_bytes + dense_bytes) + embed_bytes + output_bytes
    return ModelLayout(
        path="shaped.gguf", format="gguf", architecture="qwen3moe" if n_experts else "llama", name="shaped",
        n_layers=n_layers, context_length=ctx, embedding_length=embd, n_heads=32, n_kv_heads=kv_heads,
        head_dim=head_dim, n_experts=n_experts, n_experts_used=top_k, quantization=quant, has_chat_template=True,
        file_bytes=total, n_params=0, expert_bytes_per_layer=[expert_bytes] * n_layers,
        dense_bytes_per_layer=[dense_bytes] * n_layers, other_bytes=embed_bytes + output_bytes,
        output_bytes=output_bytes, vocab_size=vocab,
    )


# Qwen3-30B-A3B at Q4_K_M: 48 layers × 128 experts (top-8), ~17.4 GiB.
QWEN3_30B = moe_layout(n_layers=48, expert_bytes=366_000_000, dense_bytes=13_000_000, n_experts=128, top_k=8)
# A dense 70B at Q4: ~40 GB, every weight read for every token.
DENSE_70B = moe_layout(n_layers=80, expert_bytes=0, dense_bytes=490_000_000, n_experts=0, top_k=0, embd=8192,
                       vocab=128256, kv_heads=8, ctx=131072)


def assert_within_budget(plan, layout, budget):
    assert plan.fits, plan.refusal
    assert plan.vram_bytes <= max(0, budget.vram_bytes - VRAM_RESERVE)
    # every tensor byte is placed exactly once
    assert plan.gpu_weight_bytes + plan.cpu_weight_bytes == layout.dense_bytes + layout.expert_bytes
    if not plan.paged_bytes:
        assert plan.ram_bytes <= budget.ram_bytes - RAM_RESERVE


def test_30b_a3b_on_8gb_gpu_and_32gb_ram():
    budget = Budget(vram_bytes=8 * GiB, ram_bytes=32 * GiB)
    plan = make_plan(QWEN3_30B, budget)
    assert_within_budget(plan, QWEN3_30B, budget)
    assert plan.n_gpu_layers == 49  # every layer and the output head
    # llama.cpp's --n-cpu-moe convention: the first layers keep their experts in RAM, the last ones get the GPU
    n_cpu = len(plan.cpu_expert_layers)
    assert plan.cpu_expert_layers == list(range(n_cpu)) and 24 <= n_cpu < 48
    assert plan.gpu_expert_layers == list(range(n_cpu, 48))
    assert plan.paged_bytes == 0 and not plan.warnings
    assert plan.ctx == 4096 and plan.max_ctx == 40960
    [(pattern, buft)] = plan.overrides
    assert buft == "CPU" and pattern.startswith(r"blk\.(0|1|2|")
    assert pattern.endswith(r")\.ffn_(up|down|gate|gate_up)_(ch|)exps")
    assert plan.llama_cpp_args[:4] == ["-c", "4096", "-ngl", "49"]


def test_30b_a3b_cpu_only_16gb_runs_from_mmap_with_a_warning():
    budget = Budget(vram_bytes=0, ram_bytes=16 * GiB)
    plan = make_plan(QWEN3_30B, budget)
    assert_within_budget(plan, QWEN3_30B, budget)
    assert plan.n_gpu_layers == 0 and plan.overrides == [] and plan.gpu_weight_bytes == 0
    assert plan.use_mmap and not plan.use_mlock
    assert plan.paged_bytes > 0
    assert any("read from disk" in w for w in plan.warnings)


def test_30b_a3b_cpu_only_64gb_fits_in_ram_and_locks_it(monkeypatch):
    asked = []
    monkeypatch.setattr(plan_mod, "_mlock_allowed", lambda n: asked.append(n) or True)  # RLIMIT_MEMLOCK allows it
    budget = Budget(vram_bytes=0, ram_bytes=64 * GiB)
    plan = make_plan(QWEN3_30B, budget)
    assert_within_budget(plan, QWEN3_30B, budget)
    assert plan.paged_bytes == 0 and not plan.warnings
    assert plan.use_mlock and "--mlock" in plan.llama_cpp_args
    assert asked == [plan.cpu_weight_bytes]  # the lock limit is checked against the weights to be locked


@pytest.mark.parametrize(("ram_gib", "allowed", "locked"), [
    (32, True, True),    # 18.1 GiB in RAM + 8 GiB headroom ≤ 31.5 GiB usable
    (32, False, False),  # room to spare, but RLIMIT_MEMLOCK is too small
    (20, True, False),   # fits without paging (18.1 ≤ 19.5 GiB), but not with 5 GiB headroom: no lock
])
def test_mlock_only_with_room_to_spare_and_the_lock_limit_allowing_it(monkeypatch, ram_gib, allowed, locked):
    monkeypatch.setattr(plan_mod, "_mlock_allowed", lambda n: allowed)
    plan = make_plan(QWEN3_30B, Budget(vram_bytes=0, ram_bytes=ram_gib * GiB))
    assert plan.fits and plan.paged_bytes == 0 and not plan.warnings
    assert plan.use_mlock is locked and ("--mlock" in plan.llama_cpp_args) is locked


def test_mlock_allowed_follows_the_soft_memlock_limit(monkeypatch):
    for soft, expect in ((plan_mod.resource.RLIM_INFINITY, True), (8 * GiB, True), (GiB, False), (64 << 10, False)):
        monkeypatch.setattr(plan_mod.resource, "getrlimit", lambda which, soft=soft: (soft, soft))
        assert plan_mod._mlock_allowed(2 * GiB) is expect, soft


def test_model_larger_than_ram_plus_vram_is_refused_with_a_suggestion():
    budget = Budget(vram_bytes=8 * GiB, ram_bytes=16 * GiB)
    assert DENSE_70B.file_bytes > budget.vram_bytes + budget.ram_bytes
    plan = make_plan(DENSE_70B, budget)
    assert not plan.fits
    assert "does not fit this machine" in plan.refusal and "RAM" in plan.refusal
    assert "quantisation" in plan.suggestion


def test_small_gpu_offloads_some_layers():
    budget = Budget(vram_bytes=int(1.5 * GiB), ram_bytes=48 * GiB)
    plan = make_plan(DENSE_70B, budget)
    assert_within_budget(plan, DENSE_70B, budget)
    assert 0 < plan.n_gpu_layers < 80


def test_explicit_context_that_does_not_fit_is_refused_with_the_largest_that_does():
    budget = Budget(vram_bytes=0, ram_bytes=4 * GiB)
    plan = make_plan(QWEN3_30B, budget, ctx=40960)
    assert not plan.fits and "context does not fit" in plan.refusal
    assert f"--ctx {plan.max_ctx}" in plan.suggestion and 0 < plan.max_ctx < 40960
    assert make_plan(QWEN3_30B, budget, ctx=plan.max_ctx).fits
    assert not make_plan(QWEN3_30B, budget, ctx=plan.max_ctx + 1).fits


# A small dense model with a heavy KV cache (32 KV heads × 128 × 8 layers: 128 KiB a token) trained on 32k tokens.
KV_HEAVY = moe_layout(n_layers=8, expert_bytes=0, dense_bytes=50_000_000, n_experts=0, top_k=0, embd=4096,
                      vocab=32000, embed_bytes=50_000_000, output_bytes=50_000_000, kv_heads=32, ctx=32768)


def test_default_context_is_reduced_to_the_largest_that_fits():
    budget = Budget(vram_bytes=0, ram_bytes=1200 * 1024**2)
    plan = make_plan(KV_HEAVY, budget)
    assert plan.fits and 256 < plan.max_ctx < 4096 and plan.ctx == plan.max_ctx
    assert plan.notes == [f"context reduced from 4096 to {plan.max_ctx} to fit in memory"]
    assert make_plan(KV_HEAVY, budget, ctx=plan.max_ctx).fits
    assert not make_plan(KV_HEAVY, budget, ctx=plan.max_ctx + 1).fits


def test_default_context_is_reduced_further_to_keep_the_model_in_ram():
    budget = Budget(vram_bytes=0, ram_bytes=1600 * 1024**2)
    plan = make_plan(KV_HEAVY, budget)
    assert plan.fits and plan.paged_bytes == 0 and 256 < plan.ctx < plan.max_ctx < 4096
    assert plan.notes == [f"context reduced from 4096 to {plan.max_ctx} to fit in memory",
                          f"context reduced from {plan.max_ctx} to {plan.ctx} so the whole model stays in RAM"]
    assert make_plan(KV_HEAVY, budget, ctx=plan.ctx).paged_bytes == 0
    assert make_plan(KV_HEAVY, budget, ctx=plan.ctx + 1).paged_bytes > 0  # one token more and it pages
    roomy = make_plan(KV_HEAVY, Budget(vram_bytes=0, ram_bytes=3 * GiB))
    assert roomy.ctx == 4096 and roomy.notes == []  # room enough: the default, untouched


def test_context_is_clamped_to_the_trained_length():
    short = moe_layout(n_layers=8, expert_bytes=0, dense_bytes=50_000_000, n_experts=0, top_k=0, ctx=2048)
    budget = Budget(vram_bytes=0, ram_bytes=16 * GiB)
    asked = make_plan(short, budget, ctx=8192)
    assert asked.fits and asked.ctx == 2048 and asked.max_ctx == 2048
    assert asked.notes == ["the model was trained on 2048 tokens of context; using 2048"]
    assert asked.llama_cpp_args[:2] == ["-c", "2048"]
    default = make_plan(short, budget)  # the 4096 default is already capped at the trained length, silently
    assert default.ctx == 2048 and default.notes == []
    assert make_plan(short, budget, ctx=2048).notes == []


def test_usage_statistics_put_the_busiest_layers_experts_on_the_gpu():
    budget = Budget(vram_bytes=4 * GiB, ram_bytes=32 * GiB)
    usage = {i: (1.0 if i in (3, 7, 11) else 0.1) for i in range(48)}
    plan = make_plan(QWEN3_30B, budget, layer_usage=usage)
    assert {3, 7, 11} <= set(plan.gpu_expert_layers)
    assert_within_budget(plan, QWEN3_30B, budget)


def test_embedded_model_plan(smollm):
    lay = read_layout(smollm.path)
    plan = make_plan(lay, Budget(vram_bytes=0, ram_bytes=8 * GiB))
    assert plan.fits and plan.ctx == 4096 and plan.max_ctx == 8192 and plan.n_gpu_layers == 0
    assert plan.kv_bytes == lay.kv_bytes_per_token * 4096


def test_plan_cli_with_budget_overrides(smollm):
    r = run_cli("plan", str(smollm.path), "--vram", "0", "--ram", "8GiB", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["plan"]["budget"]["ram_bytes"] == 8 * GiB and out["plan"]["budget"]["source"] == "override"
    assert out["plan"]["fits"] is True and out["layout"]["architecture"] == "llama"
    human = run_cli("plan", "smollm2", "--ram", "8GiB", "--vram", "0")
    assert "all layers in RAM" in human.stdout and "llama.cpp flags: -c 4096 -ngl 0" in human.stdout


def test_plan_cli_refusal_exits_3(smollm):
    r = run_cli("plan", str(smollm.path), "--vram", "0", "--ram", "600MiB")
    assert r.returncode == 3 and "REFUSED" in r.stdout


@pytest.mark.parametrize("bad", ["eight", "8XB", ""])
def test_plan_cli_rejects_bad_sizes(bad, smollm):
    r = run_cli("plan", str(smollm.path), "--ram", bad)
    assert r.returncode == 2 and "not a size" in r.stderr and "Traceback" not in r.stderr


def test_a_roomy_override_budget_keeps_a_small_model_in_ram_without_a_paging_warning(smollm):
    layout = read_layout(smollm.path)
    budget = Budget(vram_bytes=0, ram_bytes=800 * 1024**2, source="mixed", ram_given=True)
    plan = make_plan(layout, budget)
    assert plan.fits and plan.paged_bytes == 0 and not plan.warnings
    assert plan.ctx < 4096 and any("stays in RAM" in n for n in plan.notes)  # the default context gave way
    assert make_plan(layout, budget, ctx=4096).ctx == 4096  # an explicit one does not


def test_a_refusal_under_an_override_names_the_budget_and_its_reserve():
    budget = Budget(vram_bytes=8 * GiB, ram_bytes=16 * GiB, source="override")
    plan = make_plan(DENSE_70B, budget)
    assert not plan.fits
    assert "does not fit this budget" in plan.refusal and "this machine" not in plan.refusal
    assert "512.0 MiB held back" in plan.refusal
    r = run_cli("plan", "smollm2", "--ram", "300MiB", "--vram", "0")
    assert r.returncode == 3
    assert "both given; 512.0 MiB of it held back" in r.stdout and "this budget" in r.stdout
    assert "(mixed)" not in run_cli("plan", "smollm2", "--ram", "800MiB").stdout


def test_a_gpu_that_holds_every_expert_says_so():
    budget = Budget(vram_bytes=80 * GiB, ram_bytes=32 * GiB)
    plan = make_plan(QWEN3_30B, budget)
    assert plan.fits and plan.cpu_expert_layers == []
    text = plan_mod.describe(plan, QWEN3_30B)
    assert "every layer's experts on the GPU too" in text and "layers none" not in text
    partial = plan_mod.describe(make_plan(QWEN3_30B, Budget(vram_bytes=8 * GiB, ram_bytes=32 * GiB)), QWEN3_30B)
    assert "kept in RAM" in partial


@pytest.mark.parametrize("ctx", ["0", "-100"])
def test_plan_refuses_a_context_that_is_not_positive(home, ctx):
    from helpers import run_cli

    r = run_cli("plan", "smollm2-135m-instruct", "--ctx", ctx)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--ctx" in r.stderr, r.stderr
