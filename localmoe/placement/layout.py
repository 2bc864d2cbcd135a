"""What a model file holds, read from its metadata without loading weights.

The planner, the engines and `localmoe models` all ask this module; nobody else parses GGUF headers.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from localmoe.errors import LocalmoeError
from localmoe.placement.gguf_file import first_int

GGUF_MAGIC = b"GGUF"
# llama.cpp's names for routed-expert tensors; `_shexp` (shared experts) is dense and excluded on purpose.
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_(ch|)exps\.")
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
KV_BYTES_PER_VALUE = 2  # llama.cpp's default f16 KV cache


@dataclass
class ModelLayout:
    path: str
    format: str
    architecture: str
    name: str | None
    n_layers: int
    context_length: int
    embedding_length: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    quantization: str
    has_chat_template: bool
    file_bytes: int
    n_params: int
    expert_bytes_per_layer: list[int]
    dense_bytes_per_layer: list[int]
    other_bytes: int
    output_bytes: int = 0  # output head and final norm: part of other_bytes, placed with the last layer
    vocab_size: int = 0
    chat_template: str | None = field(default=None, repr=False)
    # the model's recommended sampling (GGUF `general.sampling.*`), in GenerationConfig's names
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_bytes(self) -> int:
        return sum(self.expert_bytes_per_layer)

    @property
    def dense_bytes(self) -> int:
        """Everything that is not a routed expert: attention, norms, routers, shared experts, embeddings."""
        return sum(self.dense_bytes_per_layer) + self.other_bytes

    @property
    def bytes_per_expert(self) -> int:
        return self.expert_bytes // (self.n_layers * self.n_experts) if self.is_moe and self.n_layers else 0

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * KV_BYTES_PER_VALUE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chat_template")
        d.update(
            is_moe=self.is_moe,
            expert_bytes=self.expert_bytes,
            dense_bytes=self.dense_bytes,
            bytes_per_expert=self.bytes_per_expert,
            kv_bytes_per_token=self.kv_bytes_per_token,
        )
        return d


# GGUF's recommended-sampling keys (llama.cpp writes them from a model's generation_config) → GenerationConfig fields
SAMPLING_KEYS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "penalty_repeat": "repeat_penalty"}


def read_layout(path: str | Path) -> ModelLayout:
    """Read a model's layout; raises LocalmoeError with a one-line reason for anything unreadable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LocalmoeError(f"model file not found: {p}")
    if p.is_dir():
        raise LocalmoeError(f"{p} is a directory; expected a .gguf file")
    st = p.stat()
    return _read_gguf_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)



def read_model_layout(path: str | Path) -> ModelLayout:
    """read_layout for a whole model: a split GGUF (named by its first shard) has the first shard's metadata,
    every shard's tensors and the shards' sizes summed (what is loaded and what the disk holds). The shards must lie
    beside the first, under llama.cpp's names; a missing or foreign one is a LocalmoeError."""
    first = Path(path).expanduser()
    from dataclasses import replace

    from localmoe.placement.gguf_file import GGUFFormatError, read_header, shard_names, split_name

    lay = read_layout(first)
    s = split_name(first.name)
    try:
        count = int(read_header(first).metadata.get("split.count") or 1)
    except (GGUFFormatError, OSError) as exc:
        raise LocalmoeError(f"{first.name} is a truncated or corrupt GGUF file ({exc})") from None
    if s is None or count == 1:
        return lay
    if s[1] != 1 or s[2] != count:
        raise LocalmoeError(f"{first.name}: its header says shard 1 of {count}; the name says {s[1]} of {s[2]}")
    expert, dense = list(lay.expert_bytes_per_layer), list(lay.dense_bytes_per_layer)
    other, output, params, vocab, total = lay.other_bytes, lay.output_bytes, lay.n_params, lay.vocab_size, 0
    for name in shard_names(first.name):
        p = first.parent / name
        if not p.is_file():
            raise LocalmoeError(f"{first.name} is shard 1 of a {count}-file split GGUF and {name} is missing from "
                                f"{first.parent}")
        total += p.stat().st_size
        if p.name == first.name:
            continue
        try:
            header = read_header(p)
        except (GGUFFormatError, OSError) as exc:
            raise LocalmoeError(f"{name} is a truncated or corrupt GGUF shard ({exc})") from None
        for ti in header.tensors:
            params += ti.n_elements
            m = BLOCK_TENSOR.match(ti.name)
            if not m:
                other += ti.n_bytes
                output += ti.n_bytes if ti.name.startswith("output") else 0
                vocab = int(ti.shape[-1]) if ti.name == "token_embd.weight" else vocab
            elif int(m.group(1)) >= lay.n_layers:
                raise LocalmoeError(f"{name}: tensor {ti.name} names a layer the model does not have")
            elif EXPERT_TENSOR.match(ti.name):
                expert[int(m.group(1))] += ti.n_bytes
            else:
                dense[int(m.group(1))] += ti.n_bytes
    return replace(lay, file_bytes=total, n_params=params, expert_bytes_per_layer=expert, dense_bytes_per_layer=dense,
                   other_bytes=other, output_bytes=output, vocab_size=vocab)


@lru_cache(maxsize=16)
def _read_gguf_cached(path: str, size: int, mtime_ns: int) -> ModelLayout:
    # Keyed on size and mtime so a file replaced on disk is read again.
    return _read_gguf(Path(path), size)


def _read_gguf(p: Path, size: int) -> ModelLayout:
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise LocalmoeError(f"cannot read model file {p}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise LocalmoeError(f"{p.name} is not a GGUF model file (it does not start with the GGUF signature)")

    from localmoe.placement.gguf_file import GGUFFormatError, read_header

    try:
        header = read_header(p)
    except (GGUFFormatError, OSError, UnicodeDecodeError) as exc:
        raise LocalmoeError(f"{p.name} is a truncated or corrupt GGUF file ({exc})") from None

    end = max((t.offset + t.n_bytes for t in header.tensors), default=header.data_offset)
    if end > size:
        raise LocalmoeError(
            f"{p.name} is truncated: its tensors need {end:,} bytes but the file has {size:,} "
            "(an interrupted download? fetch it again)"
        )

    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise LocalmoeError(f"{p.name} has no general.architecture in its metadata; not a model file")

    def arch_key(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_layers = int(arch_key("block_count", 0))
    n_embd = int(arch_key("embedding_length", 0))
    n_heads = first_int(arch_key("attention.head_count", 0))
    n_kv = first_int(arch_key("attention.head_count_kv", n_heads)) or n_heads
    head_dim = int(arch_key("attention.key_length", 0)) or (n_embd // n_heads if n_heads else 0)
    n_experts = int(arch_key("expert_count", 0))
    n_used = int(arch_key("expert_used_count", 0))

    expert_bytes = [0] * n_layers
    dense_bytes = [0] * n_layers
    other = output = vocab = 0
    params = 0
    by_type: Counter[str] = Counter()
    for t in header.tensors:
        nbytes = t.n_bytes
        params += t.n_elements
        by_type[t.type_name] += nbytes
        m = BLOCK_TENSOR.match(t.name)
        if not m:
            other += nbytes
            if t.name.startswith("output"):
                output += nbytes
            if t.name == "token_embd.weight":
                vocab = int(t.shape[-1])
            continue
        layer = int(m.group(1))
        if layer >= n_layers:
            raise LocalmoeError(
                f"{p.name}: tensor {t.name} names layer {layer} but the metadata says {n_layers} layers"
            )
        if EXPERT_TENSOR.match(t.name):
            # ggml stores shapes innermost-first: the expert axis is the last one.
            if n_experts and int(t.shape[-1]) != n_experts:
                raise LocalmoeError(
                    f"{p.name}: tensor {t.name} holds {int(t.shape[-1])} experts but the metadata says "
                    f"{n_experts}; the file is inconsistent"
                )
            expert_bytes[layer] += nbytes
        else:
            dense_bytes[layer] += nbytes
    if n_experts == 0 and any(expert_bytes):
        raise LocalmoeError(f"{p.name} has expert tensors but no {arch}.expert_count in its metadata")

    template = meta.get("tokenizer.chat_template")
    sampling = {name: meta[f"general.sampling.{key}"] for key, name in SAMPLING_KEYS.items()
                if isinstance(meta.get(f"general.sampling.{key}"), (int, float))}
    return ModelLayout(
        path=str(p),
        format="gguf",
        architecture=arch,
        name=meta.get("general.name"),
        n_layers=n_layers,
        context_length=int(arch_key("context_length", 0)),
        embedding_length=n_embd,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        n_experts=n_experts,
        n_experts_used=n_used,
        quantization=_quantization(meta.get("general.file_type"), by_type),
        has_chat_template=isinstance(template, str) and bool(template.strip()),
        file_bytes=size,
        n_params=params,
        expert_bytes_per_layer=expert_bytes,
        dense_bytes_per_layer=dense_bytes,
        other_bytes=other,
        output_bytes=output,
        vocab_size=vocab,
        chat_template=template if isinstance(template, str) else None,
        sampling=sampling,
    )



def _quantization(file_type: Any, by_type: Counter[str]) -> str:
    if file_type is not None:
        try:
            from gguf import LlamaFileType

            name = LlamaFileType(int(file_type)).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, ImportError):
            pass
    return by_type.most_common(1)[0][0] if by_type else "unknown"
