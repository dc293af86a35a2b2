"""4-bit base weights (QLoRA): every linear layer of the backbone becomes a bitsandbytes `Linear4bit`
(NF4 or FP4, optional double quantization of the block scales), on CPU or CUDA.

The model is quantized after it is loaded, so every way of loading a model (presets, the GGUF-converted
Gemma, tiny models built from config, local dirs, hub ids) gets the same treatment. GPT-2's `Conv1D`
stores its weight transposed; it is quantized as the equivalent `Linear` and remembered, so that a
16-bit copy can be rebuilt with the original layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bnb_module():
    import bitsandbytes

    return bitsandbytes


@dataclass
class Quantized:
    """What `quantize_4bit` converted: module paths, and those that were GPT-2 Conv1D layers."""

    paths: list[str] = field(default_factory=list)
    transposed: set[str] = field(default_factory=set)


def is_4bit(param: torch.Tensor) -> bool:
    return getattr(param, "bnb_quantized", False) and getattr(param, "quant_state", None) is not None


def logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a packed 4-bit tensor stores two per byte."""
    return param.quant_state.shape.numel() if is_4bit(param) else param.numel()


def quantize_4bit(
    model: nn.Module,
    skip: list[str],
    compute_dtype: torch.dtype | None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    device: str | torch.device = "cpu",
) -> Quantized:
    """Replace every nn.Linear / Conv1D except those under `skip` (module names such as the task head
    or the output embeddings) by a 4-bit layer quantized on `device`. In place."""
    bnb = bnb_module()
    done = Quantized()
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, bnb.nn.Linear4bit)
        and not any(name == s or name.startswith(s + ".") for s in skip)
    ]
    for name, module in targets:
        weight = module.weight.data
        if isinstance(module, Conv1D):  # (in, out) -> (out, in)
            weight = weight.t()
            done.transposed.add(name)
        out_features, in_features = weight.shape
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type=quant_type, module=layer)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        # bitsandbytes repacks a CPU layer's weight for inference on its first no-gradient pass in eval mode,
        # and the repacked layout's kernel has no backward: training after an evaluation would then get wrong
        # gradients ("gemv_4bit: an autograd kernel was not registered"). The layout stays trainable.
        layer.support_avx512bf16_for_cpu = False
        layer.to(device)  # quantization happens here
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        done.paths.append(name)
    model.is_loaded_in_4bit = True  # PEFT wraps Linear4bit layers with its 4-bit LoRA layer
    return done


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a 4-bit layer computes with, in fp32."""
    bnb = bnb_module()
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes repacks CPU weights for inference
        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        layer.weight.data, layer.weight.quant_state = data, state
        layer.quant_state = state
    return bnb.functional.dequantize_4bit(data, state).float()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's frozen weights, split into 4-bit layers (packed weights plus their
    quantization statistics) and everything else (embeddings, norms, biases, unquantized layers)."""
    out = {"quantized": 0, "other": 0, "quantized_params": 0}
    seen: set[int] = set()  # tied weights and shared quantization tables count once
    for param in model.parameters():
        if id(param) in seen or param.requires_grad:
            continue
        seen.add(id(param))
        if is_4bit(param):
            out["quantized"] += param.numel() * param.element_size() + _state_bytes(param.quant_state, seen)
            out["quantized_params"] += logical_numel(param)
        else:
            out["other"] += param.numel() * param.element_size()
    out["other"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return out


def _state_bytes(state, seen: set[int]) -> int:
    total = 0
    for value in (state.absmax, state.code, getattr(state, "offset", None)):
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    if state.nested and state.state2 is not None:
        total += _state_bytes(state.state2, seen)
    return total
