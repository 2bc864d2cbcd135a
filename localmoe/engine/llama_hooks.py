"""What llama-cpp-python does not expose, reached through ctypes without patching the installed package.

- Tensor buffer-type overrides (llama.cpp's `-ot`): a NULL-terminated array of {pattern, buffer type} set on the
  model params that `Llama.__init__` gets from `llama_cpp.llama_cpp.llama_model_default_params()`.
- Routing telemetry: a `cb_eval` callback on the context params, observing the `ffn_moe_topk-<layer>` nodes.

Both work by wrapping the default-params function for the duration of one `Llama(...)` call, under a lock, and
restoring it. The arrays and callbacks must outlive the model: the caller keeps the returned objects.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from localmoe.errors import LocalmoeError

TOPK_PREFIX = b"ffn_moe_topk-"
_patch_lock = threading.Lock()


class GGMLTensorHead(ctypes.Structure):
    # The first fields of `struct ggml_tensor` (public in ggml.h): shape and strides in bytes.
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


class TensorBuftOverride(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; };
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# The head of struct llama_model_params as llama.cpp declares it; the override pointer must sit right after the
# devices pointer. A release that moves it would make us write into the wrong field.
EXPECTED_PARAMS_HEAD = [("devices", ctypes.sizeof(ctypes.c_void_p)),
                        ("tensor_buft_overrides", ctypes.sizeof(ctypes.c_void_p)),
                        ("n_gpu_layers", 4)]


def check_params_layout(params_cls: type[ctypes.Structure]) -> None:
    """Fail clearly if llama-cpp-python's llama_model_params is not the layout these hooks were written for."""
    offset = 0
    fields = {name: getattr(params_cls, name, None) for name, _ in EXPECTED_PARAMS_HEAD}
    for name, size in EXPECTED_PARAMS_HEAD:
        f = fields[name]
        if f is None or f.offset != offset or f.size != size:
            found = ", ".join(f"{n}@{getattr(params_cls, n).offset}" for n, *_ in params_cls._fields_[:4])
            raise LocalmoeError(
                f"llama-cpp-python's llama_model_params does not have the layout localmoe expects "
                f"({name} at offset {offset}, {size} bytes; found {found}): tensor overrides are disabled. "
                "Install the llama-cpp-python version pinned in pyproject.toml."
            )
        offset += size


def _libs() -> tuple[Any, Any]:
    from llama_cpp import _ctypes_extensions as ext
    from llama_cpp import _ggml

    base = ext.load_shared_library("ggml-base", _ggml.libggml_base_path)
    reg = _ggml.libggml
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_backend_tensor_get.restype = None
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    reg.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    reg.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    return base, reg


GGML_BACKEND_DEVICE_TYPE_CPU = 0


def buffer_type(name: str) -> int:
    """The ggml buffer type for an override target; only "CPU" for now (GPU placement is the default path)."""
    if name != "CPU":
        raise LocalmoeError(f"unsupported override buffer type {name!r}")
    base, reg = _libs()
    dev = reg.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        raise LocalmoeError("llama.cpp has no CPU device registered; cannot place tensors in RAM")
    return int(base.ggml_backend_dev_buffer_type(dev))


def _installed_layout_error() -> str | None:
    import llama_cpp

    try:
        check_params_layout(llama_cpp.llama_cpp.llama_model_params)
    except LocalmoeError as exc:
        return str(exc)
    return None


# Checked once, when the engine first needs these hooks; plans without overrides still run on a mismatch.
LAYOUT_ERROR = _installed_layout_error()


def build_overrides(pairs: list[tuple[str, str]]) -> ctypes.Array:
    """A NULL-terminated override array; keep it referenced as long as the model lives."""
    import llama_cpp

    if LAYOUT_ERROR:
        raise LocalmoeError(LAYOUT_ERROR)
    limit = llama_cpp.llama_cpp.llama_max_tensor_buft_overrides()
    if len(pairs) >= limit:
        raise LocalmoeError(f"{len(pairs)} tensor overrides; llama.cpp accepts at most {limit - 1}")
    arr = (TensorBuftOverride * (len(pairs) + 1))()
    for i, (pattern, buft) in enumerate(pairs):
        arr[i].pattern = pattern.encode()
        arr[i].buft = buffer_type(buft)
    arr[len(pairs)].pattern = None
    arr[len(pairs)].buft = None
    return arr


class RoutingTap:
    """Collects the experts llama.cpp's router picks: per graph evaluation, per layer, [n_tokens, top_k]."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.steps: list[dict[int, np.ndarray]] = []
        self.enabled = True
        self._base, _ = _libs()
        self.callback = self._make_callback()

    def _make_callback(self) -> Any:
        import llama_cpp

        base = self._base

        def on_eval(tensor: int, ask: bool, _user: int) -> bool:
            name = base.ggml_get_name(tensor) or b""
            if ask:  # only the nodes we want make the scheduler stop and call us back
                return self.enabled and name.startswith(TOPK_PREFIX)
            if not name.startswith(TOPK_PREFIX):
                return True
            layer = int(name[len(TOPK_PREFIX):])
            # The top-k node is a strided view of the argsort over all experts: [k, n_tokens] with a row stride
            # of n_expert ints. Copy the whole span (ggml_nbytes covers it) and pick the first k of each row.
            head = GGMLTensorHead.from_address(tensor)
            k, n_tok, row = head.ne[0], head.ne[1], head.nb[1] // 4
            span = np.empty(base.ggml_nbytes(tensor) // 4, dtype=np.int32)
            base.ggml_backend_tensor_get(tensor, span.ctypes.data, 0, span.nbytes)
            rows = np.lib.stride_tricks.as_strided(span, shape=(n_tok, k), strides=(row * 4, 4)).copy()
            if not self.steps or layer in self.steps[-1]:
                self.steps.append({})  # layer 0 again: the next batch (or token) is being evaluated
            self.steps[-1][layer] = rows
            return True

        return llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(on_eval)

    def take(self, n_layers: int | None = None) -> list[list[list[int]]]:
        """Per evaluated token (in order), per layer, the chosen experts; clears what was collected.

        llama.cpp computes the last layer only for the tokens whose logits are wanted (the last one of a prompt
        batch), so a prompt token can lack that layer: its entry is then an empty list. With `n_layers` (the
        model's blocks), every block has its entry, an empty one for a dense block (DeepSeek-V2's first), so that
        entry i is layer i; without it, the layers that routed, in order."""
        tokens: list[list[list[int]]] = []
        for step in self.steps:
            layers = list(range(n_layers)) if n_layers is not None else sorted(step)
            step = {i: step.get(i, np.empty((0, 0), dtype=np.int32)) for i in layers}
            n = max(step[i].shape[0] for i in layers)
            for t in range(n):
                # a layer with fewer rows kept the batch's last rows
                tokens.append([step[i][t - (n - step[i].shape[0])].tolist() if t >= n - step[i].shape[0] else []
                               for i in layers])
        self.steps = []
        return tokens


@dataclass
class LoadLog:
    """What llama.cpp logged while loading: kept out of the user's terminal, quoted when loading fails."""

    lines: list[tuple[int, str]] = field(default_factory=list)

    def errors(self) -> list[str]:
        """Error lines without llama.cpp's function-name prefixes ("llama_model_load: error loading model: ")."""
        return [re.sub(r"^(\w+: )+(error loading model: )?", "", text.strip())
                for level, text in self.lines if level == GGML_LOG_LEVEL_ERROR and text.strip()]

    def text(self) -> str:
        return "".join(text for _, text in self.lines)


# ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python's _logger comment is out of date)
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5


@contextmanager
def patched_defaults(overrides: ctypes.Array | None = None, cb_eval: Any = None,
                     repack: bool = True) -> Iterator[LoadLog]:
    """For one `Llama(...)` call: make the default-params functions carry our overrides / callback / repacking
    choice (`Plan.repack`), and capture llama.cpp's log (llama-cpp-python prints its errors to stderr even when
    quiet). Restores everything after."""
    import llama_cpp.llama_cpp as lc
    from llama_cpp import _logger

    log = LoadLog()

    @lc.llama_log_callback
    def on_log(level: int, text: bytes, _user: Any) -> None:
        if level == GGML_LOG_LEVEL_CONT and log.lines:
            level = log.lines[-1][0]
        log.lines.append((level, text.decode("utf-8", errors="replace")))

    with _patch_lock:
        orig_model, orig_ctx = lc.llama_model_default_params, lc.llama_context_default_params

        def model_params() -> Any:
            p = orig_model()
            if overrides is not None:
                p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
            if not repack:
                p.use_extra_bufts = False
            return p

        def ctx_params() -> Any:
            p = orig_ctx()
            if cb_eval is not None:
                p.cb_eval = cb_eval
                p.cb_eval_user_data = None
            return p

        lc.llama_model_default_params = model_params
        lc.llama_context_default_params = ctx_params
        lc.llama_log_set(on_log, ctypes.c_void_p(0))
        try:
            yield log
        finally:
            lc.llama_model_default_params, lc.llama_context_default_params = orig_model, orig_ctx
            lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
