"""The GGUF header reader against gguf's own reader (the reference parser), on files with vocabulary-sized string
arrays: long arrays are skipped in memory chunks, so strings that straddle a chunk or are longer than one must
land the reader where gguf's does, and a file cut anywhere inside them must be a clean format error."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from synthetic_moe import gguf_reader

from localmoe.placement import gguf_file
from localmoe.placement.gguf_file import GGUFFormatError, SkippedArray, read_header


def _write(path: Path, tokens: list[str]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_string("after.the.tokens", "still here")
    w.add_uint32("after.a.number", 7)
    w.add_tensor("weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    # 150k short strings (a Qwen-sized vocabulary, several chunks) with two longer than a chunk among them
    tokens = [f"t{i}" * (1 + i % 7) for i in range(150_000)]
    tokens[70_000] = "x" * (3 * gguf_file._CHUNK + 5)
    tokens[70_001] = "y" * (gguf_file._CHUNK - 3)
    return _write(tmp_path / "vocab.gguf", tokens)


def test_a_vocabulary_sized_header_reads_as_gguf_reads_it(vocab_file: Path):
    ours = read_header(vocab_file)
    ref = gguf_reader(vocab_file)
    assert ours.metadata["tokenizer.ggml.tokens"] == SkippedArray(gguf.GGUFValueType.STRING, 150_000)
    assert ours.metadata["after.the.tokens"] == "still here" and ours.metadata["after.a.number"] == 7
    assert ours.data_offset == ref.data_offset
    (tensor,) = ref.tensors
    assert [(t.name, t.offset, t.n_bytes) for t in ours.tensors] == [("weight", int(tensor.data_offset), 256)]


def test_a_header_cut_inside_the_strings_is_a_format_error(vocab_file: Path, tmp_path: Path):
    data = vocab_file.read_bytes()
    end = read_header(vocab_file).data_offset
    cut_file = tmp_path / "cut.gguf"
    # inside the string array: across chunk boundaries, inside the 3 MiB string, among the short strings after it;
    # and, for the rest of the reader, inside the first key and in the tensor infos after the strings
    for cut in (gguf_file._CHUNK + 3, 2 * gguf_file._CHUNK, end // 2, end - 300_000, 40, end - 100):
        cut_file.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="unexpected end of file"):
            read_header(cut_file)


def test_a_header_is_parsed_once_per_process_until_the_file_changes(tmp_path: Path):
    path = _write(tmp_path / "m.gguf", ["a", "b"])
    first = read_header(path)
    assert read_header(path) is first
    path.unlink()
    _write(path, ["a", "b", "c"])  # another file under the same name (and, here, another size)
    again = read_header(path)
    assert again is not first and again.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
