"""The frozen-prefix activation cache: compute the layers below the lowest adapter once per example.

When every trainable parameter sits in layer L or above, the embeddings and layers 0..L-1 are frozen:
run deterministically (dropout off there), they map each example to the same hidden states in every
epoch and in every run of a study that shares the model, the data and L. The cache computes those
hidden states once (saved under the peftlab cache, keyed by the lower weights, the tokenized data, L
and the precision), and training then bypasses layers 0..L-1: while a batch runs, each of them is
swapped for a stand-in that returns the batch's cached states. Embeddings, masks, position encodings,
the upper layers and the head run as usual, so every architecture whose layers peftlab can find works
unchanged.

The cache is used only where it cannot change what is learned: when no dropout runs below layer L.
With dropout there, the uncached run trains with it and a cached one would not, so a placement study
would confound placement with regularization; the cache is then off, with a note saying why
(`model.dropout: 0` for every configuration makes it usable). Losses equal the uncached run's up to
float rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file
from torch import nn

from peftlab.files import save_tensors_atomic, tensor_bytes
from peftlab.methods.base import Method
from peftlab.models.load import attention_kernel, cache_dir, unwrap
from peftlab.models.sites import layer_blocks
from peftlab.tasks.prepare import collate
from peftlab.train.speed.base import RunSetting, SpeedFeature

VERSION = 1


def memory_limit() -> int:
    """The largest cache peftlab holds in memory: a quarter of this machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class _Stop(Exception):
    """Raised at layer L while building the cache: nothing above it needs to run."""


class _Bypass(nn.Module):
    """Stands in for a frozen lower layer: returns the cached states entering layer L."""

    def __init__(self, layer: nn.Module, cache: PrefixCache) -> None:
        super().__init__()
        for name, value in vars(layer).items():  # attributes the model's loop reads (attention_type, ...)
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.source = [cache]  # a list: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.source[0]
        return (cache.current,) if cache.tuple_output else cache.current


def lowest_trainable_layer(model: nn.Module) -> int:
    """L: the lowest layer block with a trainable parameter; 0 when there is none to skip (the
    adapters start at layer 0, prefix/prompt tuning (trained outside the layers), an architecture whose layers
    peftlab cannot find)."""
    found = layer_blocks(model)
    if found is None:
        return 0
    trainable = [any(p.requires_grad for p in layer.parameters()) for layer in found[0]]
    return trainable.index(True) if any(trainable) else 0


@dataclass
class CacheInfo:
    layer: int
    examples: int
    tokens: int
    bytes: int
    loaded: bool  # found on disk (built by an earlier run)
    build_seconds: float
    file: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrefixCache:
    def __init__(self, layers: nn.ModuleList, layer: int, hidden: torch.Tensor, offsets: torch.Tensor,
                 tuple_output: bool, info: CacheInfo) -> None:
        self.layers, self.layer = layers, layer
        self.hidden, self.offsets = hidden, offsets.tolist()
        self.tuple_output = tuple_output
        self.info = info
        self.current: torch.Tensor | None = None
        self.bypasses = [_Bypass(layers[i], self) for i in range(layer)]

    def states(self, index: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
        """The cached states of a batch's examples, padded with zeros to `length` positions."""
        out = self.hidden.new_zeros(len(index), length, self.hidden.shape[-1])
        for row, i in enumerate(index.tolist()):
            start, stop = self.offsets[i], self.offsets[i + 1]
            out[row, : stop - start] = self.hidden[start:stop]
        return out.to(device, non_blocking=True)

    @contextmanager
    def feeding(self, index: torch.Tensor, length: int, device: torch.device) -> Iterator[None]:
        """Within the block, the model's layers 0..L-1 return this batch's cached states."""
        self.current = self.states(index, length, device)
        originals = [self.layers[i] for i in range(self.layer)]
        for i, bypass in enumerate(self.bypasses):
            self.layers[i] = bypass
        try:
            yield
        finally:
            for i, original in enumerate(originals):
                self.layers[i] = original
            self.current = None


class PrefixCacheFeature(SpeedFeature):
    name = "prefix_cache"

    def __init__(self) -> None:
        self.cache: PrefixCache | None = None

    def install(self, model: nn.Module, method: Method, run: RunSetting) -> dict[str, Any] | None:
        if run.batching == "packed" and lowest_trainable_layer(model):
            return {"used": False, "note": "off: packed rows hold several examples, the cache one example per row"}
        if run.sharded and lowest_trainable_layer(model):
            return {"used": False, "note": "off: the layers are sharded over the processes, which would all have to build it"}
        self.cache, note = build_prefix_cache(model, run.train, run.data_key, run.pad_id, run.batch_size, run.device,
                                              run.autocast, run.precision)
        if self.cache is not None:
            return {"used": True, **self.cache.info.to_dict()}
        return {"used": False, "note": note} if note else None

    def batch(self, index: torch.Tensor, length: int, device: torch.device):
        return self.cache.feeding(index, length, device)


def _digest(model: nn.Module, layers: nn.ModuleList, layer: int) -> str:
    """Fingerprint of everything that shapes the states entering `layer`: the backbone's frozen weights
    outside layers >= L (embeddings, layers below L) and how 4-bit layers are quantized."""
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix, base)
    upper = {id(t) for block in layers[layer:] for t in [*block.parameters(), *block.buffers()]}
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        if id(tensor) in upper or tensor.requires_grad:
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
        quant = getattr(tensor, "quant_type", None)
        if quant is not None:
            digest.update(f"{quant}:{tensor.blocksize}:{tensor.compress_statistics}".encode())
    for name, module in backbone.named_modules():
        if hasattr(module, "compute_dtype"):
            digest.update(f"{name}:{module.compute_dtype}".encode())
    return digest.hexdigest()


def build_prefix_cache(model: nn.Module, examples: list[dict[str, Any]], data_key: str, pad_id: int,
                       batch_size: int, device: torch.device, autocast,
                       precision: str) -> tuple[PrefixCache | None, str | None]:
    """The cache for `examples` (the training split), loaded from disk or computed now, or None with
    the reason it is not used. The reason is None too when no layer can be skipped anyway: the adapters
    start at layer 0, or something trainable (an embedding, a prompt) runs before the lowest adapted layer."""
    layer = lowest_trainable_layer(model)
    if not layer:
        return None, None
    if "token_type_ids" in examples[0]:
        return None, "off: sentence pairs carry segment ids, which the cached layers' inputs do not hold"
    layers, _ = layer_blocks(model)
    start = time.perf_counter()
    probe = _probe(model, layers, layer, examples[0], pad_id, device)
    if probe.early:
        return None, None
    if probe.dropout:
        names = ", ".join(probe.dropout[:3]) + (", ..." if len(probe.dropout) > 3 else "")
        return None, (f"off: dropout runs below layer {layer} ({names}), so caching those layers would train "
                      "without it; model.dropout: 0 (for every configuration compared) makes the cache exact")
    size = sum(len(e["input_ids"]) for e in examples) * model.config.hidden_size * 4
    if size > memory_limit():
        return None, (f"off: it would hold {size / 2**30:.1f} GiB, more than a quarter of this machine's memory")
    key = hashlib.sha256(json.dumps({
        "weights": _digest(model, layers, layer), "data": data_key, "layer": layer, "device": device.type,
        "precision": precision, "attention": attention_kernel(model), "version": VERSION,
    }, sort_keys=True).encode()).hexdigest()[:24]
    file = cache_dir() / "prefix" / f"{key}.safetensors"
    loaded = file.is_file()
    if loaded:
        tensors = load_file(file)
        hidden, offsets = tensors["hidden"], tensors["offsets"]
    else:
        hidden, offsets = _compute(model, layers[layer], examples, pad_id, batch_size, device, autocast)
        save_tensors_atomic(file, {"hidden": hidden.contiguous(), "offsets": offsets})
    info = CacheInfo(layer, len(examples), int(offsets[-1]), hidden.numel() * hidden.element_size(), loaded,
                     time.perf_counter() - start, str(file))
    return PrefixCache(layers, layer, hidden, offsets, probe.tuple_output, info), None


def _backbone_call(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    base = unwrap(model)
    getattr(base, base.base_model_prefix)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@dataclass
class _Probe:
    tuple_output: bool  # the layers return (hidden, ...) rather than the hidden states alone
    early: list[str]  # modules with trainable parameters that ran below layer L
    dropout: list[str]  # dropouts with p > 0 that ran below layer L


def _active_dropout(module: nn.Module) -> bool:
    """Dropout as a module (BERT, GPT-2, DistilBERT) or as an attention module's probability (LLaMA, Gemma)."""
    if isinstance(module, nn.Dropout):
        return module.p > 0
    rate = getattr(module, "attention_dropout", 0.0)
    return isinstance(rate, float) and rate > 0


def _probe(model: nn.Module, layers: nn.ModuleList, layer: int, example: dict, pad_id: int, device) -> _Probe:
    """One example through the layers below L: what their output looks like, and which modules with
    trainable parameters and which dropouts ran on the way."""
    returned: list[bool] = []
    early: list[str] = []
    dropout: list[str] = []

    def stop(*_):
        raise _Stop

    handles = [layers[layer - 1].register_forward_hook(lambda _m, _a, out: returned.append(isinstance(out, tuple))),
               layers[layer].register_forward_pre_hook(stop)]
    upper = {id(m) for block in layers[layer:] for m in block.modules()}
    for name, module in model.named_modules():
        if id(module) in upper:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: early.append(name)))
        if _active_dropout(module):  # named as in the base model, without PEFT's wrapper prefix
            short = name.removeprefix("base_model.model.")
            handles.append(module.register_forward_pre_hook(lambda *_, name=short: dropout.append(name)))
    try:
        with torch.no_grad(), _same_random_state(device):  # the probe's dropout draws must not shift training's
            _backbone_call(model, {k: v.to(device) for k, v in collate([example], pad_id).items()})
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return _Probe(returned[0], early, list(dict.fromkeys(dropout)))


def _same_random_state(device: torch.device):
    """Random number generators restored on exit (the CPU's, and the GPU's when the model runs there)."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


@torch.no_grad()
def _compute(model: nn.Module, layer_l: nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
             device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen prefix (eval mode) over every example, longest first to batch similar lengths."""
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    lengths = [len(e["input_ids"]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    rows: list[torch.Tensor | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    handle = layer_l.register_forward_pre_hook(hook, with_kwargs=True)
    columns = (TextColumn("prefix cache"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True) as progress:
            bar = progress.add_task("cache", total=len(examples))
            for begin in range(0, len(order), batch_size):
                chunk = order[begin : begin + batch_size]
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_id).items()}
                try:
                    with autocast():
                        _backbone_call(model, batch)
                except _Stop:
                    pass
                states = captured.pop().cpu()
                for row, i in enumerate(chunk):
                    rows[i] = states[row, : lengths[i]].clone()
                progress.update(bar, advance=len(chunk))
    finally:
        handle.remove()
        model.train(was_training)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    return torch.cat(rows), offsets
