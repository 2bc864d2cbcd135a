"""A fast GGUF header reader: metadata and tensor infos, without decoding the tokenizer's 100k strings.

`gguf.GGUFReader` builds Python objects for every element of every array (3 s for SmolLM2's vocabulary), which
every `ask` and UI start would pay. Here large arrays are skipped (their length is kept) and scalars, strings and
short arrays are decoded; tensor data is left on disk for the caller to memory-map.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
SMALL_ARRAY = 64  # arrays up to this length are decoded (per-layer head counts and the like)

# GGUF value types → struct formats (little-endian); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


# llama.cpp's gguf-split names (llama_split_path): llama.cpp finds shards 2..N beside shard 1 by these names
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def split_name(name: str) -> tuple[str, int, int] | None:
    """`Model-Q4_K_M-00002-of-00003.gguf` → ("Model-Q4_K_M", 2, 3); None for a file not named as a shard."""
    m = SPLIT_NAME.match(name)
    if not m or not 1 <= int(m["no"]) <= int(m["count"]) or int(m["count"]) < 2:
        return None
    return m["prefix"], int(m["no"]), int(m["count"])


def shard_names(name: str) -> list[str]:
    """Every shard's name (directory kept) for the name of any one shard."""
    head, _, base = name.rpartition("/")
    s = split_name(base)
    assert s is not None
    prefix, _, count = s
    return [(head + "/" if head else "") + f"{prefix}-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    type: int  # ggml type id
    offset: int  # absolute file offset of the data
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type).name
        except ValueError:
            return f"type{self.type}"


@dataclass
class SkippedArray:
    """A long array left undecoded: its element type and length are known."""

    type: int
    length: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int


_CHUNK = 1 << 20
_U64 = struct.Struct("<Q")


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.size = os.fstat(f.fileno()).st_size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFFormatError("unexpected end of file in the header")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise GGUFFormatError(f"implausible string length {n}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.unpack("I"), self.unpack("Q")
            if n > 1 << 32:
                raise GGUFFormatError(f"implausible array length {n}")
            if n <= SMALL_ARRAY:
                return [self.value(etype) for _ in range(n)]
            self.skip(etype, n)
            return SkippedArray(etype, n)
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")

    def skip(self, etype: int, n: int) -> None:
        if etype in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[etype]) * n, 1)
        elif etype == STRING:
            self._skip_strings(n)
        elif etype == ARRAY:
            for _ in range(n):
                self.value(ARRAY)
        else:
            raise GGUFFormatError(f"unknown GGUF value type {etype}")

    def _skip_strings(self, n: int) -> None:
        # A vocabulary is 50-150k strings: walking them in memory chunks, not a read and a seek each, is what keeps
        # reading a header (done several times before every first answer) at milliseconds rather than a quarter second.
        buf, pos = b"", 0
        for _ in range(n):
            if pos + 8 > len(buf):
                if pos > len(buf):
                    self.f.seek(pos - len(buf), 1)
                    buf, pos = b"", 0
                buf, pos = buf[pos:] + self.f.read(_CHUNK), 0
                if len(buf) < 8:
                    raise GGUFFormatError("unexpected end of file in the header")
            (length,) = _U64.unpack_from(buf, pos)
            if length > 1 << 30:
                raise GGUFFormatError(f"implausible string length {length}")
            pos += 8 + length
        self.f.seek(pos - len(buf), 1)  # back to the end of the last string (forward, when it ended past the chunk)
        if self.f.tell() > self.size:
            raise GGUFFormatError("unexpected end of file in the header")


_HEADERS: dict[tuple[Any, ...], GGUFHeader] = {}
_HEADERS_LOCK = threading.Lock()  # the server reads headers from several threads


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's header; raises GGUFFormatError on anything malformed. A file unchanged since the last
    read in this process (same device, inode, size, mtime and ctime of the file opened) is not parsed again:
    placement, the plan and the engine each ask before the first answer. The result is shared: treat it as
    read-only."""
    with open(path, "rb", buffering=1 << 20) as f:
        st = os.fstat(f.fileno())
        key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _HEADERS_LOCK:
            header = _HEADERS.get(key)
        if header is None:
            header = _read_header(f)
            with _HEADERS_LOCK:
                if len(_HEADERS) >= 32:
                    _HEADERS.clear()
                _HEADERS[key] = header
    return header


def _read_header(f: BinaryIO) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    r = _Reader(f)
    if r.read(4) != MAGIC:
        raise GGUFFormatError("not a GGUF file")
    version = r.unpack("I")
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise GGUFFormatError("implausible tensor or key count")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.unpack("I"))
    raw = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > 8:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(r.unpack("Q") for _ in range(n_dims))
        raw.append((name, shape, r.unpack("I"), r.unpack("Q")))
    alignment = int(meta.get("general.alignment", 32) or 32)
    pos = f.tell()
    data_offset = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ttype, offset in raw:
        n = 1
        for d in shape:
            n *= d
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name} has unknown ggml type {ttype}") from None
        tensors.append(TensorInfo(name, shape, ttype, data_offset + offset, n, n // block * size))
    return GGUFHeader(version, meta, tensors, data_offset)


# --- A GGUF MoE as the native engine sees it ------------------------------------------------------------------
#
# The native engine and its planner speak Hugging Face names and shapes (config.json fields, `model.layers.N...`
# tensors); a GGUF MoE is translated here, once, from its header alone. llama.cpp stores each layer's experts as one
# tensor (`blk.N.ffn_gate_exps`, ggml shape [dim, ff, experts]) in which each expert's rows are one contiguous run, so
# an expert is a byte range of the file: the view lists it as three per-expert tensors at those offsets.

# GGUF architecture -> (transformers model_type, MoE block's hub name, one expert's (gate, up, down) hub names).
# Mixtral runs in llama.cpp as `llama` with expert tensors.
NATIVE_GGUF_ARCHS: dict[str, tuple[str, str, tuple[str, str, str]]] = {
    "qwen3moe": ("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2moe": ("qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("olmoe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "llama": ("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
}

# per-layer GGUF tensor -> hub name under model.layers.N. (the MoE block's names are filled in per architecture)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "{moe}.gate.weight",
    "ffn_gate_shexp.weight": "{moe}.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "{moe}.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "{moe}.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "{moe}.shared_expert_gate.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def checkpoint_view(header: GGUFHeader, file: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """A GGUF MoE's metadata as an HF-style config dict, and its tensors under hub names and shapes (row-major,
    outermost first) as `localmoe.placement.safetensors.TensorInfo`s whose dtype is the ggml type's name and whose
    nbytes are the packed bytes; experts are per-expert entries at their byte ranges inside the `*_exps` tensors.
    `file` is the GGUF's name, recorded in each entry. Raises LocalmoeError for what the native engine does not run."""
    from localmoe.errors import LocalmoeError
    from localmoe.placement.safetensors import TensorInfo as HubTensor

    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in NATIVE_GGUF_ARCHS or not meta.get(f"{arch}.expert_count"):
        what = f"a {arch} model without experts" if arch in NATIVE_GGUF_ARCHS else f"architecture {arch!r}"
        raise LocalmoeError(f"the native engine does not run {what} (it runs GGUF MoE models of "
                            f"{', '.join(sorted(NATIVE_GGUF_ARCHS))}); use the llama.cpp backend")
    model_type, moe, (gate, up, down) = NATIVE_GGUF_ARCHS[arch]

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    by_name = {t.name: t for t in header.tensors}
    tensors: dict[str, Any] = {}

    def hub(t: TensorInfo, name: str, shape: tuple[int, ...] | None = None) -> None:
        tensors[name] = HubTensor(file, t.type_name, shape or tuple(reversed(t.shape)), t.offset, t.n_bytes)

    n_layers = int(key("block_count", 0))
    for name, t in by_name.items():
        if name in _GLOBAL_NAMES:
            hub(t, _GLOBAL_NAMES[name])
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            continue  # rope tables and the like: the engine computes its own
        layer, rest = int(parts[1]), parts[2]
        if rest in _LAYER_NAMES:
            # the shared expert's gate is the hub's Linear(hidden, 1), [1, hidden]; a GGUF holds it as the vector
            # llama.cpp's loader asks for ([hidden]: converters squeezed it) or as ggml [hidden, 1]
            shape = (1, t.n_elements) if rest == "ffn_gate_inp_shexp.weight" else None
            hub(t, f"model.layers.{layer}." + _LAYER_NAMES[rest].format(moe=moe), shape)
        elif rest in _EXPERT_TENSORS:
            proj = (gate, up, down)[_EXPERT_TENSORS.index(rest)]
            if len(t.shape) != 3 or t.n_bytes % t.shape[2]:
                raise LocalmoeError(f"expert tensor {name} has shape {list(t.shape)}: expected [in, out, experts]")
            per = t.n_bytes // t.shape[2]
            for e in range(t.shape[2]):
                tensors[f"model.layers.{layer}.{moe}.experts.{e}.{proj}.weight"] = HubTensor(
                    file, t.type_name, (t.shape[1], t.shape[0]), t.offset + e * per, per)
    if n_layers and not any(f"blk.{i}.ffn_gate_exps.weight" in by_name for i in range(n_layers)):
        raise LocalmoeError(f"{file or 'the file'} keeps its experts as separate per-expert tensors (an old GGUF "
                            "layout) or has none; the native engine reads merged ffn_*_exps tensors")

    n_heads = first_int(key("attention.head_count", 0))
    dim = int(key("embedding_length", 0))
    embd = by_name.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = embd.shape[1] if embd is not None and len(embd.shape) == 2 else getattr(tokens, "length", 0)
    expert_ff = int(key("expert_feed_forward_length", 0) or key("feed_forward_length", 0))
    config: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": first_int(key("attention.head_count_kv", n_heads)) or n_heads,
        "head_dim": int(key("attention.key_length", 0)) or (dim // n_heads if n_heads else 0),
        "num_experts": int(key("expert_count", 0)),
        "num_experts_per_tok": int(key("expert_used_count", 0)),
        "moe_intermediate_size": expert_ff,
        "intermediate_size": expert_ff,
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(key("context_length", 4096) or 4096),
        "tie_word_embeddings": "output.weight" not in by_name,
        # llama.cpp's qwen3moe always rescales the kept experts' weights; qwen2moe and olmoe do not unless told
        "norm_topk_prob": bool(key("expert_weights_norm", arch == "qwen3moe")),
    }
    if model_type == "qwen2_moe":
        config["shared_expert_intermediate_size"] = int(key("expert_shared_feed_forward_length", 0))
        config["qkv_bias"] = "blk.0.attn_q.bias" in by_name
    if model_type == "olmoe" and key("attention.clamp_kqv"):
        config["clip_qkv"] = float(key("attention.clamp_kqv"))
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"type": scaling}  # refused by the engine with its own message
    if model_type == "qwen3_moe" and key("leading_dense_block_count"):
        config["mlp_only_layers"] = list(range(int(key("leading_dense_block_count"))))
    return config, tensors


def first_int(v: Any) -> int:
    """A count that some architectures store per layer (head_count_kv): the first layer's."""
    if isinstance(v, list):
        return int(v[0]) if v else 0
    return int(v or 0)
