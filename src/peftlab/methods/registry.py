"""Methods by name. Adding a method: its spec in `specs.py`, one file for the method, one line here."""

from __future__ import annotations

from peftlab.methods.adalora import AdaLoraMethod
from peftlab.methods.base import Method
from peftlab.methods.bitfit import BitFitMethod
from peftlab.methods.bottleneck import BottleneckMethod
from peftlab.methods.full import FullMethod
from peftlab.methods.hira import HiraMethod
from peftlab.methods.lora import LoraMethod
from peftlab.methods.peft_types import PeftTypeMethod
from peftlab.methods.prefix import PrefixMethod
from peftlab.methods.qlora import QLoraMethod
from peftlab.methods.sparselora.method import SparseLoraMethod
from peftlab.methods.specs import SPECS

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (LoraMethod, FullMethod, BitFitMethod, HiraMethod, BottleneckMethod, AdaLoraMethod,
                        QLoraMethod, PrefixMethod, SparseLoraMethod, PeftTypeMethod)
}


def make_method(spec, total_steps: int | None = None) -> Method:
    return METHODS[spec.name](spec, total_steps)


def dumped_method(method: dict | str) -> Method:
    """The method of a dumped config's `method` field (a name, or a dict with its name)."""
    data = {"name": method} if isinstance(method, str) else method
    return make_method(SPECS[data.get("name", "lora")].model_validate(data))
