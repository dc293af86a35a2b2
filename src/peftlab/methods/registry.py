"""Methods by name. Adding a method: one file, one line here, one row in the method test table."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from peftlab.methods.adalora import AdaLoraMethod, AdaLoraSpec
from peftlab.methods.base import Method
from peftlab.methods.bitfit import BitFitMethod, BitFitSpec
from peftlab.methods.bottleneck import BottleneckMethod, BottleneckSpec
from peftlab.methods.full import FullMethod, FullSpec
from peftlab.methods.hira import HiraMethod, HiraSpec
from peftlab.methods.lora import LoraMethod, LoraSpec
from peftlab.methods.prefix import PrefixMethod, PrefixSpec
from peftlab.methods.qlora import QLoraMethod, QLoraSpec
from peftlab.methods.sparselora import SparseLoraMethod, SparseLoraSpec

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (LoraMethod, FullMethod, BitFitMethod, HiraMethod, BottleneckMethod, AdaLoraMethod,
                        QLoraMethod, PrefixMethod, SparseLoraMethod)
}
MethodSpec = Annotated[
    Union[LoraSpec, FullSpec, BitFitSpec, HiraSpec, BottleneckSpec, AdaLoraSpec, QLoraSpec,
          PrefixSpec, SparseLoraSpec], Field(discriminator="name")
]

__all__ = ["METHODS", "MethodSpec", "LoraSpec", "make_method"]


def make_method(spec, total_steps: int | None = None) -> Method:
    return METHODS[spec.name](spec, total_steps)
