"""Prefix tuning (Li & Liang, 2021) and prompt tuning (Lester et al., 2021) through PEFT.

Prefix tuning learns `num_virtual_tokens` key/value vectors per layer that every token attends to;
prompt tuning learns that many input embeddings placed before the text. Neither has sites: they use
every layer, so the plan's placement and ranks do not apply (its size parameter is the prefix length,
which the equal-budget helper chooses). They cannot be merged; the run records their inference
overhead against the bare base instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from pydantic import Field
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method, MethodSpecBase
from peftlab.methods.lora import peft_task_type
from peftlab.plans.plan import Plan


class PrefixSpec(MethodSpecBase):
    name: Literal["prefix"] = "prefix"
    variant: Literal["prefix", "prompt"] = "prefix"
    """prefix: keys and values at every layer; prompt: input embeddings before the text."""
    num_virtual_tokens: int = Field(16, ge=1, le=4096)
    projection: bool = False
    """Prefix only: train the prefix through a two-layer MLP (Li & Liang's reparametrisation); more
    parameters while training, the same prefix at inference."""
    projection_hidden: int = Field(512, ge=1)


class PrefixMethod(Method):
    name = "prefix"
    size_parameter = "num_virtual_tokens"
    adds_parameters = True

    def apply(self, model: nn.Module, plan: Plan, head: list[str]) -> nn.Module:
        if peft_task_type(model) != "CAUSAL_LM":
            raise PeftlabError(f"method prefix: for causal language models (instruction tasks); "
                               f"{type(model).__name__} is not one: use lora, bottleneck or bitfit")
        common = {"task_type": "CAUSAL_LM",
                  "num_virtual_tokens": self.spec.num_virtual_tokens}
        if self.spec.variant == "prefix":
            config = PrefixTuningConfig(prefix_projection=self.spec.projection,
                                        encoder_hidden_size=self.spec.projection_hidden, **common)
        else:
            config = PromptTuningConfig(**common)
        return get_peft_model(model, config)

    @contextmanager
    def _without_prompt(self, model: nn.Module) -> Iterator[None]:
        with model.disable_adapter():  # PEFT's forward skips the prompt; peftlab's causal-LM path too
            model.prompt_disabled = True
            try:
                yield
            finally:
                model.prompt_disabled = False

    def bypassed(self, model: nn.Module):
        return self._without_prompt(model)

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

