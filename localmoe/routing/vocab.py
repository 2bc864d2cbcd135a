"""What the learned router needs from the small GGUF model, without llama.cpp or the gguf package on the way to a
decision: the token-embedding matrix's place in the file, and a byte-level BPE tokenizer that splits text exactly
as llama.cpp does for the vocabularies it covers.

Loading llama.cpp's vocabulary (and importing llama_cpp and gguf) cost a fresh process ~150 ms before its first
decision. The tables are read from the GGUF file once and cached in `<data dir>/cache/`, keyed by the file's path,
size, modification time and a hash of its first bytes; a process then loads them in a few milliseconds.

The tokenizer covers the `gpt2` model with the `smollm` pre-tokenizer (SmolLM2, the embedded small model) and
characters whose Unicode class is the same in llama.cpp's tables and Python's (`FAST_CHARS`); any other vocabulary
or text is tokenised by llama.cpp itself (`TokenEmbedder` falls back), so scores never depend on which path ran.
"""

from __future__ import annotations

import bisect
import hashlib
import marshal
import os
import struct
import unicodedata
from pathlib import Path
from typing import Any, BinaryIO

CACHE_VERSION = 2  # 2: sorted tables carry their key offsets
HEAD_BYTES = 1 << 16  # hashed into the cache key: a file rewritten in place within one mtime tick still differs
FAST_PRE = ("smollm",)  # llama.cpp pre-tokenizers this module reproduces
USER_DEFINED = 4  # llama.cpp parses user-defined tokens out of plain text: such vocabularies take llama.cpp's path

# llama.cpp's whitespace set (unicode-data.cpp), which differs from str.isspace (\x1c-\x1f are not whitespace).
_WHITESPACE = frozenset([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                         0x2029, 0x202F, 0x205F, 0x3000])
# Latin scripts, Latin-1 symbols and common typography: assigned long ago, so Python's Unicode database and
# llama.cpp's agree on their classes (checked against llama.cpp by tests/test_router_vocab.py).
_EXTRA = "–—‘’‚“”„†‡•…‰′″‹›€™←→≈≠≤≥−"


def fast_char(cp: int) -> bool:
    return cp < 0x250 or chr(cp) in _EXTRA


def _byte_chars() -> list[str]:
    """GPT-2's reversible byte → printable character map."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()
LETTER, NUMBER, SPACE, OTHER = 1, 2, 4, 8


def _flags(ch: str) -> int:
    if ord(ch) in _WHITESPACE:
        return SPACE
    cat = unicodedata.category(ch)
    return LETTER if cat[0] == "L" else NUMBER if cat[0] == "N" else OTHER


def pre_split(text: str) -> list[str]:
    """llama.cpp's `smollm` pre-tokenizer: every \\p{N} alone, then GPT-2's pattern
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+ inside each piece (llama.cpp's
    own hand-written matcher, which this follows step by step)."""
    flags = [_flags(ch) for ch in text]
    pieces, start = [], 0
    for i, f in enumerate(flags):
        if f == NUMBER:
            if start < i:
                pieces.append((start, i))
            pieces.append((i, i + 1))
            start = i + 1
    if start < len(text):
        pieces.append((start, len(text)))
    words = []
    for lo, hi in pieces:
        def flag(p: int, lo: int = lo, hi: int = hi) -> int:
            return flags[p] if lo <= p < hi else 0

        pos = lo
        while pos < hi:
            cpt = text[pos]
            end = None
            if cpt == "'" and pos + 1 < hi:
                nxt = text[pos + 1]
                if nxt in "stmd":
                    end = pos + 2
                elif pos + 2 < hi and nxt + text[pos + 2] in ("re", "ve", "ll"):
                    end = pos + 3
            if end is None:
                f2 = flag(pos + 1) if cpt == " " else flag(pos)
                if f2 in (LETTER, NUMBER, OTHER):
                    p = pos + (cpt == " ")
                    while flag(p) == f2:
                        p += 1
                    end = p
                else:
                    n = 0
                    while flag(pos + n) == SPACE:
                        n += 1
                    if n > 1 and pos + n < hi:
                        end = pos + n - 1
                    elif n > 0:
                        end = pos + n
                    else:
                        end = pos + 1
            words.append(text[pos:end])
            pos = end
    return words


class _SortedTable:
    """A string → int table as one sorted, newline-joined text, an int32 array of values and one of where each key
    starts: loading it makes no Python object per key (splitting 100k keys into a list took ~14 ms of a process's
    first decision); a lookup bisects over the offsets, slicing only the keys it compares."""

    def __init__(self, blob: str, values: bytes, starts: bytes) -> None:
        import array

        self.blob = blob
        self.values = array.array("i")
        self.values.frombytes(values)
        self.starts = array.array("i")
        self.starts.frombytes(starts)  # one more than there are keys: the last is len(blob) + 1
        self._n = len(self.values)

    def _key(self, i: int) -> str:
        return self.blob[self.starts[i]:self.starts[i + 1] - 1]

    def get(self, key: str) -> int | None:
        i = bisect.bisect_left(range(self._n), key, key=self._key)
        return self.values[i] if i < self._n and self._key(i) == key else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __getitem__(self, key: str) -> int:
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return v


def pack(strings: list[str]) -> tuple[str, bytes, bytes]:
    """`strings` (index = value) as a sorted table's text, values and key offsets."""
    import array
    import itertools

    order = sorted(range(len(strings)), key=strings.__getitem__)
    starts = itertools.accumulate((len(strings[i]) + 1 for i in order), initial=0)
    return "\n".join(strings[i] for i in order), array.array("i", order).tobytes(), array.array("i", starts).tobytes()


class BPE:
    """Byte-level BPE with llama.cpp's merge order: the lowest-ranked adjacent pair first, the leftmost on ties."""

    def __init__(self, tokens: tuple[str, bytes], merges: tuple[str, bytes]) -> None:
        self.ids = _SortedTable(*tokens)
        self.ranks = _SortedTable(*merges)
        self._memo: dict[str, list[int]] = {}

    def word(self, word: str) -> list[int]:
        hit = self._memo.get(word)
        if hit is not None:
            return hit
        syms = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
        ranks = self.ranks
        while len(syms) > 1:
            best, at = None, -1
            for i in range(len(syms) - 1):
                r = ranks.get(f"{syms[i]} {syms[i + 1]}")
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        out: list[int] = []
        for s in syms:
            if s in self.ids:
                out.append(self.ids[s])
            else:  # as llama.cpp: a symbol outside the vocabulary is spelled byte by byte
                out.extend(self.ids[c] for c in s if c in self.ids)
        self._memo[word] = out
        return out

    def tokenize(self, text: str) -> list[int] | None:
        """The token ids llama.cpp gives `text` (no BOS, special tokens not parsed), or None for text with a
        character outside `FAST_CHARS`."""
        if not all(fast_char(ord(ch)) for ch in text):
            return None
        return [t for w in pre_split(text) for t in self.word(w)]


# -- the tables, read from the GGUF file once --------------------------------------------------------------------
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_tables(path: Path) -> dict[str, Any]:
    """The tokenizer's metadata and arrays from the GGUF header (the tensor infos come from read_header)."""
    wanted = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
              "tokenizer.ggml.token_type"}
    out: dict[str, Any] = {}
    with open(path, "rb", buffering=1 << 20) as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        _version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        for _ in range(n_kv):
            key = _string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            value = _value(f, vtype, keep=key in wanted)
            if key in wanted:
                out[key] = value
    return out


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = "<" + _SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == 8:
        return _string(f)
    if vtype == 9:
        etype, n = struct.unpack("<IQ", f.read(12))
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            raw = f.read(size * n)
            return list(struct.unpack(f"<{n}{_SCALARS[etype]}", raw)) if keep else None
        items = [_value(f, etype, keep) for _ in range(n)]
        return items if keep else None
    raise ValueError(f"unknown GGUF value type {vtype}")


def _key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(HEAD_BYTES))
    return h.hexdigest()[:24]


def build(path: Path) -> dict[str, Any]:
    """Everything the embedder needs, read from the GGUF file (slow: imports gguf, walks the vocabulary)."""
    from localmoe.placement.gguf_file import read_header

    header = read_header(path)
    info = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    tables = _read_tables(path)
    types = tables.get("tokenizer.ggml.token_type") or []
    tokens, merges = tables.get("tokenizer.ggml.tokens") or [], tables.get("tokenizer.ggml.merges") or []
    fast = (tables.get("tokenizer.ggml.model") == "gpt2" and tables.get("tokenizer.ggml.pre") in FAST_PRE
            and USER_DEFINED not in types and bool(merges) and len(set(tokens)) == len(tokens)
            and not any("\n" in t for t in tokens + merges))  # newline-joined tables
    return {
        "version": CACHE_VERSION,
        "embedding": None if info is None or len(info.shape) != 2 else
        {"dim": info.shape[0], "vocab": info.shape[1], "type": info.type, "offset": info.offset,
         "n_bytes": info.n_bytes},
        "fast": fast,
        "tokens": pack(tokens) if fast else None,
        "merges": pack(merges) if fast else None,
    }


def load(path: str | Path, cache_dir: Path | None) -> dict[str, Any]:
    """The tables for the GGUF file at `path`: from the cache when it has them, else built and cached. Without a
    cache directory (or one that cannot be written) they are built each time, which is only slower."""
    path = Path(path)
    if cache_dir is None:
        return build(path)
    file = cache_dir / f"router-vocab-{_key(path)}.marshal"
    try:
        data = marshal.loads(file.read_bytes())
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
            return data
    except (OSError, ValueError, EOFError, TypeError):
        pass
    data = build(path)
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(marshal.dumps(data))
        os.replace(tmp, file)  # whole or not at all, also with two processes writing at once
    except OSError:
        pass
    return data
