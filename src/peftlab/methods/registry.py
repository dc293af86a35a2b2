"""Methods by name. Adding a method: its spec in `specs.py`, one file for the method, one line here."""

from __future__ import annotations

from peftlab.methods.adalora import AdaLoraMethod
from peftlab.methods.base import Method
from peftlab.methods.bitfit import BitFitMethod
from peftlab.methods.bottleneck import BottleneckMethod
from peftlab.methods.full import FullMethod
from peftlab.methods.hira import HiraMethod
from peftlab.methods.lora import LoraMethod
from peftlab.methods.prefix import PrefixMethod
from peftlab.methods.qlora import QLoraMethod
from peftlab.methods.sparselora import SparseLoraMethod

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (LoraMethod, FullMethod, BitFitMethod, HiraMethod, BottleneckMethod, AdaLoraMethod,
                        QLoraMethod, PrefixMethod, SparseLoraMethod)
}


def make_method(spec, total_steps: int | None = None) -> Method:
    return METHODS[spec.name](spec, total_steps)
