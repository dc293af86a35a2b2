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

import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.base import Method, generated_tokens, load_weights
from peftlab.methods.lora import peft_task_type
from peftlab.models.load import unwrap
from peftlab.plans.plan import Plan


class PrefixMethod(Method):
    name = "prefix"
    size_parameter = "num_virtual_tokens"
    adds_parameters = True
    position_wise = False  # the learned tokens sit in front of every sequence

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

    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's last hidden states at the batch's own positions, with the learned prefix (keys and
        values at every layer) or prompt (embeddings) in front."""
        if getattr(model, "prompt_disabled", False):  # bypassed: the bare base
            return super().hidden_states(model, batch)
        config = model.active_peft_config
        base = unwrap(model)
        backbone = getattr(base, base.base_model_prefix)
        size, n = batch["input_ids"].shape[0], config.num_virtual_tokens
        mask = torch.cat([batch["attention_mask"].new_ones(size, n), batch["attention_mask"]], dim=1)
        if config.peft_type == "PREFIX_TUNING":
            return backbone(input_ids=batch["input_ids"], attention_mask=mask,
                            cache=model.get_prompt(size)).last_hidden_state
        embeds = backbone.get_input_embeddings()(batch["input_ids"])
        prompts = model.get_prompt(size).to(embeds.dtype)
        hidden = backbone(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask).last_hidden_state
        return hidden[:, n:]

    def complete(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config, **extra) -> torch.Tensor:
        """Generation through the base model with the learned positions in front, laid out as in training:
        the prefix as a key/value cache already filled (its positions stand for placeholder input ids that
        are never read), or the prompt as embeddings before the text's. PEFT's own `generate` drops the
        prefix and shifts the prompt's positions with this transformers version, so it is not used."""
        base = unwrap(model)
        if getattr(model, "prompt_disabled", False):
            return generated_tokens(base, input_ids, attention_mask, config, **extra)
        size, n = input_ids.shape[0], model.active_peft_config.num_virtual_tokens
        mask = torch.cat([attention_mask.new_ones(size, n), attention_mask], dim=1)
        if model.active_peft_config.peft_type == "PREFIX_TUNING":
            placeholders = torch.cat([input_ids[:, :1].expand(size, n), input_ids], dim=1)
            output = base.generate(input_ids=placeholders, attention_mask=mask, cache=model.get_prompt(size),
                                   generation_config=config, **extra)
            return output[:, placeholders.shape[1]:]
        embeds = base.get_input_embeddings()(input_ids)
        embeds = torch.cat([model.get_prompt(size).to(embeds.dtype), embeds], dim=1)
        return base.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config, **extra)

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, model: nn.Module, directory: Path) -> nn.Module:
        load_weights(model, directory / "adapter_model.safetensors", peft=True, loaded_elsewhere=("prompt_embeddings",))
        return model

