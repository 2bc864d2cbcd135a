"""The planner chooses the engine for a GGUF MoE (#16 item 3): llama.cpp while the experts fit in memory, the native
expert cache when llama.cpp would page them through mmap (or cannot run at all), refused when neither fits; `--backend`
overrides. Budgets are given explicitly, so nothing here depends on this machine's memory.

The large models are header-only GGUFs: every tensor described, the data region a sparse hole (`truncate`), a legal
file to plan a 17 GB model from without writing it. Planning reads headers only, so the hole is never read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from helpers import run_cli
from localmoe import cli
from localmoe.engine import backend_for, create_engine
from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import models
from localmoe.placement import plan
from localmoe.placement.gguf_file import read_header
from localmoe.placement.layout import read_layout
from localmoe.placement.plan import Budget, CheckpointPlan, Plan, choose_engine
from localmoe.units import human_bytes

GiB = 1024**3
Q = gguf.GGMLQuantizationType
# Qwen3-30B-A3B's shape: 48 layers, 128 experts, top-8, hidden 2048, expert FFN 768, 32 heads (4 KV) of 128
QWEN3_30B = {"layers": 48, "experts": 128, "top_k": 8, "hidden": 2048, "expert_ff": 768, "heads": 32, "kv_heads": 4,
             "head_dim": 128, "vocab": 151936}
# one Q4_K expert: gate, up and down, each 768 x 2048 weights in blocks of 256 (144 bytes each)
Q4K_EXPERT_BYTES = 3 * 768 * 2048 // 256 * 144


def header_only_gguf(path: Path, *, arch: str = "qwen3moe", layers: int, experts: int, top_k: int, hidden: int,
                     expert_ff: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
                     expert_type: Q = Q.Q4_K, dense_type: Q = Q.Q8_0) -> Path:
    """A GGUF whose header describes the whole model and whose data is a sparse hole of the right size."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(40960)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(expert_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(top_k)
        w.add_expert_feed_forward_length(expert_ff)

    def tensor(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        if qtype == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)

    tensor("token_embd.weight", (vocab, hidden), dense_type)
    for i in range(layers):
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", (hidden,), Q.F32)
        tensor(b + "attn_q.weight", (heads * head_dim, hidden), dense_type)
        tensor(b + "attn_k.weight", (kv_heads * head_dim, hidden), dense_type)
        tensor(b + "attn_v.weight", (kv_heads * head_dim, hidden), dense_type)
        tensor(b + "attn_output.weight", (hidden, heads * head_dim), dense_type)
        tensor(b + "ffn_norm.weight", (hidden,), Q.F32)
        if experts:
            tensor(b + "ffn_gate_inp.weight", (experts, hidden), Q.F32)
            tensor(b + "ffn_gate_exps.weight", (experts, expert_ff, hidden), expert_type)
            tensor(b + "ffn_up_exps.weight", (experts, expert_ff, hidden), expert_type)
            tensor(b + "ffn_down_exps.weight", (experts, hidden, expert_ff), expert_type)
        else:
            tensor(b + "ffn_gate.weight", (expert_ff, hidden), dense_type)
            tensor(b + "ffn_up.weight", (expert_ff, hidden), dense_type)
            tensor(b + "ffn_down.weight", (hidden, expert_ff), dense_type)
    tensor("output_norm.weight", (hidden,), Q.F32)
    tensor("output.weight", (vocab, hidden), dense_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    os.truncate(path, max(t.offset + t.n_bytes for t in read_header(path).tensors))
    return path


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-30B-A3B shaped, Q4_K experts and Q8_0 dense weights: ~16.7 GiB, of which 15.2 GiB experts."""
    return header_only_gguf(tmp_path_factory.mktemp("big") / "qwen3-30b-shaped.gguf", **QWEN3_30B)


def _budget(ram_gib: float, vram_gib: float = 0) -> Budget:
    return Budget(vram_bytes=int(vram_gib * GiB), ram_bytes=int(ram_gib * GiB), source="override")


def _detect_as(monkeypatch: pytest.MonkeyPatch, budget: Budget) -> None:
    """What the engine and `ask` see as this machine's memory."""
    monkeypatch.setattr(Budget, "detect", classmethod(lambda cls, vram=None, ram=None: budget))


def test_the_header_only_file_is_a_17_gb_model_that_occupies_almost_no_disk(big_moe):
    lay = read_layout(big_moe)
    assert lay.is_moe and (lay.n_layers, lay.n_experts, lay.n_experts_used) == (48, 128, 8)
    assert 16 * GiB < big_moe.stat().st_size < 17 * GiB and lay.expert_bytes == 48 * 128 * Q4K_EXPERT_BYTES
    assert big_moe.stat().st_blocks * 512 < 64 * 1024**2  # sparse: the test writes headers, not 17 GB


def test_experts_that_fit_in_ram_go_to_llama_cpp_with_its_placement(big_moe):
    lay = read_layout(big_moe)
    choice = choose_engine(lay, _budget(32))
    assert choice.backend == "llama.cpp" and choice.fits and isinstance(choice.plan, Plan)
    assert choice.plan is choice.llama_plan and choice.plan.paged_bytes == 0
    assert plan.verdict(choice.plan, lay).kind == "ram"
    assert choice.reason.startswith("the experts fit in memory (15.2 GiB of experts, 32.0 GiB RAM in the budget)")
    assert choice.native_plan is None  # not needed to decide: the common case costs one plan
    # with a GPU too: llama.cpp's own placement (layers on the GPU, experts kept in RAM)
    gpu = choose_engine(lay, _budget(32, vram_gib=8))
    assert gpu.backend == "llama.cpp" and gpu.plan.n_gpu_layers > 0 and gpu.plan.cpu_expert_layers
    assert "layers on the GPU" in gpu.reason and "\n" not in gpu.reason


def test_experts_that_do_not_fit_go_to_the_native_expert_cache_with_its_slots(big_moe):
    lay = read_layout(big_moe)
    budget = _budget(8)
    assert plan.verdict(plan.make_plan(lay, budget), lay).kind == "disk"  # llama.cpp would page through mmap
    choice = choose_engine(lay, budget)
    cp = choice.plan
    assert choice.backend == "torch" and isinstance(cp, CheckpointPlan) and cp is choice.native_plan
    # experts are held packed: one expert in memory is its bytes in the file, what one miss reads
    assert cp.expert_dtype == "packed" and cp.bytes_per_expert == cp.disk_bytes_per_expert == Q4K_EXPERT_BYTES
    assert cp.budget_bytes == 8 * GiB and cp.device == "cpu" and cp.n_experts == 128 and cp.top_k == 8
    # slots from the budget: what is left after the dense weights, KV cache and reserve, in whole experts per layer
    room = 8 * GiB - plan.RAM_RESERVE - cp.dense_bytes - cp.kv_bytes
    assert cp.slots_per_layer == room // (48 * Q4K_EXPERT_BYTES) and 8 <= cp.slots_per_layer < 128
    expected = int((1 - cp.slots_per_layer / 128) * 8 * Q4K_EXPERT_BYTES * 48)
    assert cp.bytes_per_token == expected > 0
    assert choice.reason == (
        f"the experts do not fit in memory (15.2 GiB of experts, 8.0 GiB RAM in the budget): the native expert cache "
        f"holds {cp.slots_per_layer} of 128 experts per layer and reads ~{human_bytes(expected)} per token from disk; "
        f"llama.cpp would page {human_bytes(choice.llama_plan.paged_bytes)} of the file through mmap")


def test_with_a_gpu_the_native_gguf_cache_is_in_ram(big_moe):
    """The engine runs GGUF files on the CPU (its packed kernels are CPU code): the plan must not promise VRAM."""
    choice = choose_engine(read_layout(big_moe), _budget(6, vram_gib=8))
    cp = choice.plan
    assert choice.backend == "torch" and cp.device == "cpu" and cp.budget_bytes == 6 * GiB
    assert cp.warm_slots_per_layer == 0


def test_neither_fits_is_refused_in_one_line(big_moe):
    choice = choose_engine(read_layout(big_moe), _budget(1))
    assert not choice.fits and choice.backend is None and "\n" not in choice.reason
    assert choice.reason.startswith("neither engine fits this budget: llama.cpp: ")
    assert "the native expert cache: " in choice.reason
    with pytest.raises(LocalmoeError, match="neither engine fits"):
        choice.raise_if_refused()


def test_llama_cpp_refusing_a_model_the_native_cache_fits_goes_native(tiny_moe):
    """llama.cpp's working set (here its compute buffer: a batch of logits) exceeds the budget, the native plan
    (dense weights, KV cache and every expert) does not."""
    lay = read_layout(tiny_moe[1])
    native = plan.native_gguf_plan(*plan.native_gguf_view(str(tiny_moe[1])), _budget(8))
    budget = Budget(0, plan.RAM_RESERVE + native.fast_bytes + 8 * 1024**2, source="override")
    assert not plan.make_plan(lay, budget).fits
    choice = choose_engine(lay, budget)
    assert choice.backend == "torch" and choice.plan.slots_per_layer == 8 and choice.plan.bytes_per_token == 0
    assert choice.reason.startswith("llama.cpp cannot run it here") and "reads nothing from disk" in choice.reason
    assert choose_engine(lay, _budget(8)).backend == "llama.cpp"  # and with room: llama.cpp, the faster one


def test_when_the_native_cache_does_not_fit_llama_cpp_pages(big_moe):
    lay = read_layout(big_moe)
    assert choose_engine(lay, _budget(4)).backend == "torch"  # packed dense weights: 4 GiB holds the native plan
    # the smallest budget llama.cpp still pages at, if the native plan does not fit there
    budget = next(b for b in (_budget(g / 8) for g in range(8, 40)) if plan.verdict(plan.make_plan(lay, b), lay).kind
                  == "disk")
    lp = plan.make_plan(lay, budget)
    choice = choose_engine(lay, budget)
    if choice.native_plan.fits:
        pytest.skip("the native plan fits wherever llama.cpp pages")
    assert choice.backend == "llama.cpp" and "nor does the native expert cache" in choice.reason
    assert f"by paging {human_bytes(lp.paged_bytes)} from disk through mmap" in choice.reason


def test_dense_models_and_archs_the_native_engine_does_not_run_always_go_to_llama_cpp(tmp_path):
    shape = {**QWEN3_30B, "experts": 0, "expert_ff": 8192, "layers": 64}
    dense = header_only_gguf(tmp_path / "dense.gguf", arch="qwen3", **shape)
    lay = read_layout(dense)
    choice = choose_engine(lay, _budget(8))
    assert (choice.backend, choice.reason) == ("llama.cpp", "a dense model: llama.cpp runs it from RAM")
    # a dense model pages only its token embeddings (its working set is every other weight): find such a budget
    paging = next(b for b in (_budget(g / 16) for g in range(16, 128))
                  if plan.verdict(plan.make_plan(lay, b), lay).kind == "disk")
    choice = choose_engine(lay, paging)
    assert choice.backend == "llama.cpp" and choice.native_plan is None
    assert choice.reason.startswith("a dense model: llama.cpp runs it by paging")
    assert "expert cache is for MoE models" in choice.reason
    refused = choose_engine(lay, _budget(1))
    assert refused.backend is None and refused.reason.startswith("qwen3 model") and "\n" not in refused.reason

    other = header_only_gguf(tmp_path / "other-moe.gguf", arch="dbrx", **QWEN3_30B)
    choice = choose_engine(read_layout(other), _budget(8))
    assert choice.backend == "llama.cpp" and "by paging" in choice.reason
    assert "does not run architecture 'dbrx'" in choice.reason and choice.native_refusal


def test_without_torch_installed_llama_cpp_answers_and_says_why(big_moe):
    choice = choose_engine(read_layout(big_moe), _budget(8), native_installed=False)
    assert choice.backend == "llama.cpp" and "needs PyTorch" in choice.reason


def test_a_forced_backend_gets_its_plan_even_when_it_pages(big_moe, smollm):
    lay = read_layout(big_moe)
    forced = choose_engine(lay, _budget(8), backend="llama.cpp")
    assert forced.backend == "llama.cpp" and forced.plan.paged_bytes > 0
    assert forced.reason.startswith("asked for (--backend llama.cpp): llama.cpp runs it by paging")
    native = choose_engine(lay, _budget(32), backend="torch")
    assert native.backend == "torch" and native.plan.slots_per_layer == 128  # everything resident
    assert "reads nothing from disk" in native.reason
    with pytest.raises(LocalmoeError, match="does not run a llama model without experts"):
        choose_engine(read_layout(smollm.path), _budget(8), backend="torch")


# --- the function every session's engine comes from (ask, chat, bench, serve) --------------------------------


def test_the_engine_for_a_gguf_follows_the_plan(big_moe, monkeypatch):
    ref = models.resolve(str(big_moe))
    assert ref.backend == "llama.cpp" and not ref.pinned  # resolving stays cheap: no plan yet
    _detect_as(monkeypatch, _budget(8))
    backend, options = backend_for(ref, {"n_ctx": 1024, "telemetry": True})
    assert backend == "torch" and options == {"max_seq_length": 1024, "telemetry": True}
    _detect_as(monkeypatch, _budget(32))
    backend, options = backend_for(ref, {"telemetry": True})
    assert backend == "llama.cpp" and isinstance(options.pop("plan"), Plan) and options == {"telemetry": True}


def test_create_engine_builds_the_chosen_engine(big_moe, monkeypatch):
    import localmoe.engine as engines

    built = []
    monkeypatch.setattr(engines, "_engine_class", lambda backend: lambda path, **kw: built.append((backend, kw)))
    _detect_as(monkeypatch, _budget(8))
    create_engine(models.resolve(str(big_moe)))
    assert built[-1][0] == "torch"
    create_engine(models.with_backend(models.resolve(str(big_moe)), "llama.cpp"))  # --backend overrides
    assert built[-1][0] == "llama.cpp" and "plan" not in built[-1][1]  # the engine plans itself as asked
    _detect_as(monkeypatch, _budget(1))
    with pytest.raises(UsageError, match=r"^cannot load qwen3-30b-shaped: neither engine fits") as caught:
        create_engine(models.resolve(str(big_moe)))
    assert "\n" not in str(caught.value)


def test_a_refused_model_is_a_one_line_error_with_exit_2(big_moe, monkeypatch, capsys):
    _detect_as(monkeypatch, _budget(1))
    assert cli.main(["ask", "hi", "--model", str(big_moe), "--no-log"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localmoe: error: cannot load qwen3-30b-shaped: neither engine fits") and \
        err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(UsageError, match="cannot load"):
        models.check_loadable(models.resolve(str(big_moe)))  # the chat refuses it before its screen opens
    _detect_as(monkeypatch, _budget(8))
    models.check_loadable(models.resolve(str(big_moe)))  # on the native engine it loads


def test_backend_torch_is_allowed_for_a_native_gguf_moe_and_refused_otherwise(tiny_moe, smollm):
    ref = models.with_backend(models.resolve(str(tiny_moe[1])), "torch")
    assert (ref.backend, ref.pinned) == ("torch", True)
    assert backend_for(ref, {}) == ("torch", {})
    with pytest.raises(UsageError) as caught:
        models.with_backend(models.resolve(str(smollm.path)), "torch")
    msg = str(caught.value)
    assert msg.startswith(f"{smollm.path.stem.lower()} cannot run on the torch backend: the native engine does not")
    assert "\n" not in msg
    with pytest.raises(UsageError, match="runs on the torch backend, not llama.cpp"):
        models.with_backend(models.resolve(str(tiny_moe[0])), "llama.cpp")  # a checkpoint directory


def test_ask_with_backend_torch_on_a_dense_gguf_exits_2(smollm, capsys):
    assert cli.main(["ask", "hi", "--model", str(smollm.path), "--backend", "torch", "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "cannot run on the torch backend" in err and err.count("\n") == 1


def test_choosing_reads_headers_only_and_imports_no_torch(big_moe):
    code = ("import sys, time; from localmoe.home import models; from localmoe.engine import backend_for; "
            "t = time.perf_counter(); b, _ = backend_for(models.resolve(sys.argv[1]), {}); "
            "print(b, 'torch' in sys.modules, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(big_moe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    backend, imported, seconds = out.stdout.split()
    assert backend in ("llama.cpp", "torch") and imported == "False" and float(seconds) < 2.0


# --- `localmoe plan` ------------------------------------------------------------------------------------------


def test_plan_says_which_engine_answers_and_its_expert_cache(big_moe):
    r = run_cli("plan", str(big_moe), "--vram", "0", "--ram", "8GiB", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["engine"]["backend"] == "torch" and out["engine"]["fits"] is True
    assert out["engine"]["reason"].startswith("the experts do not fit in memory") and out["model"]["backend"] == "torch"
    p = out["plan"]
    assert p["expert_dtype"] == "packed" and p["bytes_per_expert"] == Q4K_EXPERT_BYTES and p["n_experts"] == 128
    assert 8 <= p["slots_per_layer"] < 128 and p["bytes_per_token"] > 0
    assert [t["name"] for t in p["tiers"]] == ["fast", "cold"] and out["layout"]["n_experts"] == 128

    text = run_cli("plan", str(big_moe), "--vram", "0", "--ram", "8GiB")
    assert text.returncode == 0, text.stderr
    first, *rest = text.stdout.splitlines()
    assert first.startswith("engine   torch: the experts do not fit in memory")
    assert any(line.startswith(f"fast     {p['slots_per_layer']} of 128 experts per layer") for line in rest)
    assert any(line.startswith("per tok") and human_bytes(p["bytes_per_token"]) in line for line in rest)
    assert f"{human_bytes(Q4K_EXPERT_BYTES)} per expert in memory" in text.stdout


def test_plan_json_for_experts_that_fit_and_for_forced_and_refused_engines(big_moe):
    out = json.loads(run_cli("plan", str(big_moe), "--vram", "0", "--ram", "32GiB", "--json").stdout)
    assert out["engine"]["backend"] == "llama.cpp" and out["plan"]["n_gpu_layers"] == 0 and out["plan"]["fits"]
    forced = json.loads(run_cli("plan", str(big_moe), "--vram", "0", "--ram", "8GiB", "--backend", "llama.cpp",
                                "--json").stdout)
    assert forced["engine"]["backend"] == "llama.cpp" and forced["plan"]["paged_bytes"] > 0
    refused = run_cli("plan", str(big_moe), "--vram", "0", "--ram", "1GiB")
    assert refused.returncode == 3 and refused.stdout.startswith("engine   none: neither llama.cpp nor the native")
    assert "REFUSED" in refused.stdout and "native   REFUSED" in refused.stdout


def test_plan_refuses_checkpoint_flags_and_impossible_backends_in_one_line(big_moe, smollm):
    r = run_cli("plan", str(big_moe), "--expert-dtype", "int8")
    assert r.returncode == 2 and "--expert-dtype applies to checkpoint directories" in r.stderr
    r = run_cli("plan", str(smollm.path), "--backend", "torch")
    assert r.returncode == 2 and "cannot run on the torch backend" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_torch_engine_flags_on_a_gguf_moe_ask_for_the_native_engine(tiny_moe, smollm):
    ref = cli._check_torch_options({"cache_policy": "lfu"}, models.resolve(str(tiny_moe[1])))
    assert (ref.backend, ref.pinned) == ("torch", True)
    pinned = models.with_backend(models.resolve(str(tiny_moe[1])), "llama.cpp")
    with pytest.raises(LocalmoeError, match="--cache-policy applies to the torch engine"):
        cli._check_torch_options({"cache_policy": "lfu"}, pinned)
    with pytest.raises(UsageError, match="--cache-policy applies to the torch engine, and .* cannot run on the torch"):
        cli._check_torch_options({"cache_policy": "lfu"}, models.resolve(str(smollm.path)))


def test_the_large_tier_may_be_a_moe_that_fits_only_on_the_native_engine(home, tiny_moe, monkeypatch):
    import shutil

    from localmoe.home import paths

    paths.models_dir().mkdir(parents=True)
    shutil.copy(tiny_moe[1], paths.models_dir() / "tiny-moe.gguf")
    native = plan.native_gguf_plan(*plan.native_gguf_view(str(tiny_moe[1])), _budget(8))
    budget = Budget(0, plan.RAM_RESERVE + native.fast_bytes + 8 * 1024**2, source="override")
    assert not plan.make_plan(read_layout(tiny_moe[1]), budget).fits  # llama.cpp alone would leave no large tier
    _detect_as(monkeypatch, budget)
    ref = models.tier_model("large")
    assert ref.id == "tiny-moe" and backend_for(ref, {})[0] == "torch"
