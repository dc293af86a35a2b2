"""Regional compilation: every layer block runs one compiled graph (`train.compile`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method
from peftlab.models.architectures import FAMILIES
from peftlab.models.sites import layer_blocks
from peftlab.train.speed.base import RunSetting, SpeedFeature


class CompiledLayers(SpeedFeature):
    """The layers share their code, so compiling costs the same for 6 layers as for 60; sequence lengths
    vary, hence dynamic shapes."""

    name = "compile"

    def install(self, model: nn.Module, method: Method, run: RunSetting) -> dict[str, Any]:
        found = layer_blocks(model)
        if found is None:
            families = ", ".join(family.name for family in FAMILIES)
            raise PeftlabError(f"train.compile: peftlab cannot find the layer blocks of {model.config.model_type!r}; "
                               f"use it with a model of the {families} families")
        for layer in found[0]:
            layer.compile(dynamic=True)
        return {"used": True, "layers": len(found[0])}
