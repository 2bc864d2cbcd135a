"""llama.cpp on a real (tiny, random-init) Qwen3-MoE: logits, routing telemetry, plans with tensor overrides."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch

from helpers import run_cli
from localmoe.engine import GenerationConfig, llama_hooks
from localmoe.engine.llamacpp import LlamaCppEngine
from localmoe.errors import LocalmoeError
from localmoe.experts.trace import Trace
from localmoe.placement.layout import read_layout
from localmoe.placement.plan import Budget, Plan, make_plan

TOKENS = [1, 9690, 314, 253, 2362, 30, 49151, 17, 2, 1000, 4242, 12]


@pytest.fixture(scope="module")
def reference(tiny_moe):
    """transformers' logits and router top-k for TOKENS: the oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_moe[0], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([TOKENS]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    topk = [torch.topk(r.reshape(len(TOKENS), -1), k, dim=-1).indices.tolist() for r in out.router_logits]
    return out.logits[0].numpy(), topk  # topk[layer][token] -> experts


def test_logits_match_transformers(tiny_moe, reference):
    engine = LlamaCppEngine(tiny_moe[1], logits_all=True, n_ctx=256)
    got = engine.logits(TOKENS)
    engine.close()
    want, _ = reference
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.5  # a model whose logits are ~0 would match anything
    assert np.abs(got - want).max() <= 5e-3


def test_telemetry_records_the_routers_top_k(tiny_moe, reference):
    engine = LlamaCppEngine(tiny_moe[1], logits_all=True, telemetry=True, n_ctx=256)
    engine.logits(TOKENS)
    engine.close()
    _, topk = reference
    assert [t.token for t in engine.routing] == TOKENS
    for pos, t in enumerate(engine.routing):
        assert len(t.experts) == 3
        for layer, experts in enumerate(t.experts):
            assert sorted(experts) == sorted(topk[layer][pos]), (pos, layer)


def test_telemetry_during_generation_covers_every_evaluated_token(tiny_moe):
    engine = LlamaCppEngine(tiny_moe[1], telemetry=True, n_ctx=256)
    list(engine.stream([{"role": "user", "content": "hello"}], GenerationConfig(max_tokens=6, temperature=0.0)))
    s = engine.stats
    rows = engine.routing
    assert len(rows) == s.prompt_tokens + s.completion_tokens - 1  # the last sampled token is never evaluated
    assert [r.pos for r in rows] == list(range(len(rows)))
    assert {r.phase for r in rows[: s.prompt_tokens]} == {"prompt"}
    assert {r.phase for r in rows[s.prompt_tokens:]} == {"decode"}
    for r in rows:
        for layer, experts in enumerate(r.experts):
            # the last layer of a prompt batch is computed only for the token whose logits are needed
            skipped = layer == 2 and r.phase == "prompt" and r.pos < s.prompt_tokens - 1
            assert (experts == []) if skipped else (len(set(experts)) == 2 and all(0 <= e < 8 for e in experts))
    engine.close()


def test_a_dense_block_keeps_its_place_in_the_routing_rows():
    """DeepSeek-V2's first block is dense: the tap sees layers 1.. only. Given the model's block count, entry i
    is layer i (an empty entry for the dense one), as a trace's header counts blocks; the last layer computed for
    the batch's last token only is empty for the others, as before."""
    tap = llama_hooks.RoutingTap(2)
    batch = {1: np.array([[3, 4], [5, 6]], dtype=np.int32), 2: np.array([[1, 2]], dtype=np.int32)}
    tap.steps = [dict(batch)]
    assert tap.take(3) == [[[], [3, 4], []], [[], [5, 6], [1, 2]]]
    tap.steps = [dict(batch)]
    assert tap.take() == [[[3, 4], []], [[5, 6], [1, 2]]]


def test_plan_with_experts_on_the_cpu_buffer_type_loads_and_generates(tiny_moe):
    layout = read_layout(tiny_moe[1])
    plan = make_plan(layout, Budget(vram_bytes=0, ram_bytes=8 * 1024**3))
    # what a GPU machine's plan looks like: every layer offloaded, the experts of layers 0 and 2 kept in RAM
    plan.n_gpu_layers, plan.cpu_expert_layers = layout.n_layers + 1, [0, 2]
    engine = LlamaCppEngine(tiny_moe[1], plan=plan)
    text = "".join(engine.stream([{"role": "user", "content": "hi"}], GenerationConfig(max_tokens=4, temperature=0)))
    overridden = sorted(line.split()[1] for line in engine.load_log.splitlines() if "overridden to CPU" in line)
    engine.close()
    assert text and engine.stats.completion_tokens == 4
    assert overridden == sorted(f"blk.{i}.ffn_{p}_exps.weight" for i in (0, 2) for p in ("gate", "up", "down"))


def test_an_override_llama_cpp_rejects_fails_the_load_clearly(tiny_moe, monkeypatch):
    # An invalid regex proves llama.cpp really reads the array we hand it, and that its reason reaches the user.
    monkeypatch.setattr(Plan, "overrides", property(lambda self: [("blk\\.[0\\.ffn", "CPU")]))
    plan = make_plan(read_layout(tiny_moe[1]), Budget(vram_bytes=0, ram_bytes=8 * 1024**3))
    engine = LlamaCppEngine(tiny_moe[1], plan=plan)
    with pytest.raises(LocalmoeError, match="could not load tiny-moe.gguf") as exc:
        engine.load()
    assert "\n" not in str(exc.value)


def test_params_layout_mismatch_is_reported():
    class Shifted(ctypes.Structure):
        _fields_ = [("devices", ctypes.c_void_p), ("n_gpu_layers", ctypes.c_int32),
                    ("tensor_buft_overrides", ctypes.c_void_p)]

    with pytest.raises(LocalmoeError, match="does not have the layout localmoe expects"):
        llama_hooks.check_params_layout(Shifted)
    import llama_cpp

    llama_hooks.check_params_layout(llama_cpp.llama_cpp.llama_model_params)  # the installed one is fine


def test_trace_and_plan_commands(tiny_moe, tmp_path):
    out = tmp_path / "trace.jsonl"
    r = run_cli("trace", "Tell me a story", "--model", str(tiny_moe[1]), "--out", str(out), "--max-tokens", "8",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    trace = Trace.load(out)
    assert (trace.n_layers, trace.n_experts, trace.top_k, trace.backend) == (3, 8, 2, "llama.cpp")
    assert len(trace.tokens) > 8 and trace.tokens[-1].phase == "decode"
    assert f"→ {out}" in r.stdout
    # the summary counts the records the file holds
    n_prompt = sum(t.phase == "prompt" for t in trace.tokens)
    assert f"({n_prompt} prompt, {len(trace.tokens) - n_prompt} generated and evaluated of 8)" in r.stdout, r.stdout

    # the same trace feeds the cache simulator (the format is shared with the native engine)
    sim = run_cli("cache-sim", str(out), "--capacity", "2x", "--capacity", "3", "--json")
    assert sim.returncode == 0, sim.stderr
    rows = json.loads(sim.stdout)["rows"]
    best = {r["capacity"]: r["hit_rate"] for r in rows if r["policy"] == "belady"}
    assert set(best) == {4, 3}
    assert all(r["hit_rate"] <= best[r["capacity"]] + 1e-12 for r in rows if r["policy"] in ("lru", "lfu", "lfru"))
    bad = run_cli("cache-sim", str(out), "--capacity", "1")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "capacity" in bad.stderr

    plan = json.loads(run_cli("plan", str(tiny_moe[1]), "--json", "--vram", "0", "--ram", "4GiB").stdout)
    assert plan["layout"]["is_moe"] and plan["layout"]["n_experts"] == 8 and plan["plan"]["fits"]

    dense = run_cli("trace", "hi", "--model", "smollm2", "--out", str(tmp_path / "t2.jsonl"))
    assert dense.returncode == 1 and "dense model" in dense.stderr and "Traceback" not in dense.stderr


def test_unknown_architecture_is_a_clear_error(tiny_moe, tmp_path):
    import gguf
    import synthetic_moe

    src = synthetic_moe.gguf_reader(tiny_moe[1])
    path = tmp_path / "alien.gguf"
    w = gguf.GGUFWriter(str(path), "alienmoe")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del src
    r = run_cli("ask", "hi", "--model", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "unknown model architecture" in line and "alienmoe" in line
