"""What the benchmarks share: the synthetic MoE they measure, and RESULTS.md, where each benchmark owns one
marked section and rewrites only that."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).with_name(".cache")


def bench_moe() -> Path:
    """DESIGN.md's benchmark model as f32 GGUF (hidden 1024, 8 layers, 32 experts, top-4, expert FFN 512; ~2 GB),
    built once into benchmarks/.cache/ with tests/synthetic_moe.py (needs the test extras)."""
    out = CACHE / "moe-1024x8x32.gguf"
    if not out.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        import synthetic_moe

        CACHE.mkdir(exist_ok=True)
        hf = synthetic_moe.build_hf_moe(CACHE / "hf", hidden=1024, layers=8, experts=32, top_k=4, expert_ff=512,
                                        heads=16, kv_heads=4, head_dim=64)
        synthetic_moe.hf_to_gguf(hf, out)
    return out


def bench_hf() -> Path:
    """The same model as a Hugging Face checkpoint (benchmarks/.cache/hf/), for the native engine and transformers,
    with SmolLM2's tokenizer files added if the folder predates build_hf_moe writing them."""
    bench_moe()
    hf = CACHE / "hf"
    if not (hf / "tokenizer.json").exists():
        synthetic_moe = _synthetic_moe()
        synthetic_moe.write_hf_tokenizer(hf, synthetic_moe._embedded_gguf())
    return hf


def bench_deep() -> tuple[Path, Path]:
    """A deep, narrow Qwen3-MoE for prompt processing and time to first token (issue #25): 32 layers, 8 experts,
    top-2, hidden 512, expert FFN 1536, 8 heads (4 KV) of 64, f32 (~2.7 GB, nearly all experts), as a Hugging Face
    checkpoint with tokenizer files and as GGUF, built once into benchmarks/.cache/. Returns (hf dir, gguf);
    needs the test extras."""
    hf, out = CACHE / "hf-512x32x8", CACHE / "moe-512x32x8.gguf"
    if not out.exists():
        synthetic_moe = _synthetic_moe()
        CACHE.mkdir(exist_ok=True)
        # the tokenizer files come with build_hf_moe at SmolLM2's vocabulary size, so both engines chat
        synthetic_moe.build_hf_moe(hf, hidden=512, layers=32, experts=8, top_k=2, expert_ff=1536, heads=8,
                                   kv_heads=4, head_dim=64)
        tmp = out.with_name(out.name + ".tmp")  # an interrupted build is rebuilt, never taken for a whole one
        synthetic_moe.hf_to_gguf(hf, tmp)
        tmp.replace(out)
    return hf, out


def bench_moe_q8() -> Path:
    """The benchmark model as a Q8_0 GGUF (matrices Q8_0, norms and routers f32), built once from bench_hf()."""
    out = CACHE / "moe-1024x8x32-q8_0.gguf"
    if not out.exists():
        hf = bench_hf()
        tmp = out.with_name(out.name + ".tmp")
        _synthetic_moe().hf_to_gguf(hf, tmp, quant="q8_0")
        tmp.replace(out)
    return out


def _synthetic_moe():  # tests/synthetic_moe.py, which needs the test extras
    sys.path.insert(0, str(ROOT / "tests"))
    import synthetic_moe

    return synthetic_moe


def write_section(name: str, body: str) -> None:
    mark = f"<!-- {name} -->"
    section = f"{mark}\n{body.strip()}\n{mark}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if mark in text:
        head, _, rest = text.partition(mark)
        text = head + section + rest.partition(mark)[2]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")
