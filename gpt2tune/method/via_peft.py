"""LoRA, IA3, prompt tuning and prefix tuning through `peft`.

GPT-2 implements its linear layers as `Conv1D` (weight stored in x out), which peft
handles with `fan_in_fan_out=True`. Prompt and prefix tuning are wrapped in
`PromptLearningLM` so they can decode with a KV cache (see there).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gpt2tune.errors import UserError
from gpt2tune.method.registry import Method, register

PROMPT_LEARNING = {"prompt-tuning", "prefix-tuning"}


def _task_type(model) -> str:
    if hasattr(model, "lm_head"):
        return "CAUSAL_LM"
    if hasattr(model, "score"):
        return "SEQ_CLS"
    raise UserError(f"peft methods need a GPT-2 language model or sequence classifier, not {type(model).__name__}")


# method name -> (cfg, task type) -> its peft config
_CONFIGS = {
    "lora": lambda cfg, task: _peft().LoraConfig(
        task_type=task, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), fan_in_fan_out=True, bias="none"),
    "ia3": lambda cfg, task: _peft().IA3Config(
        task_type=task, target_modules=list(cfg.target_modules), feedforward_modules=list(cfg.feedforward_modules),
        fan_in_fan_out=True),
    "prompt-tuning": lambda cfg, task: _peft().PromptTuningConfig(
        task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=_peft().PromptTuningInit.SAMPLE_VOCAB),
    "prefix-tuning": lambda cfg, task: _peft().PrefixTuningConfig(
        task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.projection,
        encoder_hidden_size=cfg.projection_size),
}


def _peft():
    import peft  # imported when a peft method is used

    return peft


def peft_config(cfg, model):
    if cfg.name not in _CONFIGS:
        raise UserError(f"method {cfg.name!r} is not a peft method")
    return _CONFIGS[cfg.name](cfg, _task_type(model))


def apply_peft(model, cfg, tokenizer=None, seed: int = 0):
    """Wrap `model` in a peft model for `cfg`; only the method's own parameters train."""
    import peft

    from gpt2tune.model.quiet import quiet_transformers

    if cfg.name in PROMPT_LEARNING:
        n_pos = model.config.n_positions
        if cfg.num_virtual_tokens >= n_pos:
            raise UserError(f"method {cfg.name}: {cfg.num_virtual_tokens} virtual tokens do not fit in the "
                            f"model's context of {n_pos}")
    pcfg = peft_config(cfg, model)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(model, pcfg)
        except ValueError as err:
            raise UserError(f"method {cfg.name}: {str(err).splitlines()[0]}") from None
    if cfg.name == "prompt-tuning" and cfg.init_text:
        _init_prompt_from_text(wrapped, cfg.init_text, tokenizer)
    return PromptLearningLM(wrapped) if cfg.name in PROMPT_LEARNING else wrapped


def _init_prompt_from_text(wrapped, text: str, tokenizer) -> None:
    """Start the soft prompt from the embeddings of `text`'s tokens, repeated to fill it (as peft's TEXT init)."""
    if tokenizer is None:
        raise UserError("method prompt-tuning: init_text needs the run's tokenizer")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"method prompt-tuning: init_text {text!r} has no tokens")
    weight = wrapped.prompt_encoder["default"].embedding.weight
    n = weight.size(0)
    ids = (ids * math.ceil(n / len(ids)))[:n]
    emb = wrapped.get_base_model().get_input_embeddings().weight
    with torch.no_grad():
        weight.copy_(emb[torch.tensor(ids, device=emb.device)].to(weight.dtype))


class PromptLearningLM(nn.Module):
    """A peft prompt- or prefix-tuning model that also decodes with a KV cache.

    peft's forward prepends the virtual tokens (or installs the prefix as the cache) on
    *every* call, which is right for training and scoring but wrong for incremental
    decoding. Here the first call (no cache yet) goes through peft, and later calls
    continue the returned cache - which already holds the virtual tokens - with the
    plain base model. `config.n_positions` is the context left for real tokens.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.num_virtual_tokens = peft_model.peft_config["default"].num_virtual_tokens
        base_cfg = peft_model.get_base_model().config
        self.config = copy.deepcopy(base_cfg)
        self.config.n_positions = base_cfg.n_positions - self.num_virtual_tokens

    @property
    def generation_config(self):
        return self.peft_model.get_base_model().generation_config

    def get_input_embeddings(self):
        return self.peft_model.get_base_model().get_input_embeddings()

    def get_output_embeddings(self):
        return self.peft_model.get_base_model().get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, position_ids=None, **kw):
        # peft places real tokens after the virtual ones (positions V, V+1, ...) and takes no position ids
        if past_key_values is None:
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        if attention_mask is not None:  # the caller's mask covers real tokens only
            ones = attention_mask.new_ones(attention_mask.size(0), self.num_virtual_tokens)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if position_ids is not None:  # counted over real tokens by the caller
            position_ids = position_ids + self.num_virtual_tokens
        return self.peft_model.get_base_model()(input_ids=input_ids, attention_mask=attention_mask,
                                                past_key_values=past_key_values, position_ids=position_ids, **kw)


def unwrap(model):
    """The peft model inside a PromptLearningLM (anything else unchanged)."""
    return model.peft_model if isinstance(model, PromptLearningLM) else model


def is_peft(model) -> bool:
    import peft

    return isinstance(unwrap(model), peft.PeftModel)


def plain_base(model):
    """A copy of the frozen base model without the peft layers (the model stays usable)."""
    inner = unwrap(model)
    if inner.peft_config["default"].is_prompt_learning:
        return copy.deepcopy(inner.get_base_model())
    return copy.deepcopy(inner).unload()


def load_peft(base, folder, name: str):
    """Load a saved peft adapter onto `base` for inference."""
    import peft

    from gpt2tune.model.quiet import quiet_transformers

    with quiet_transformers():
        try:
            model = peft.PeftModel.from_pretrained(base, str(folder))
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"could not load the adapter in {folder}: {str(err).splitlines()[0]}") from None
    return PromptLearningLM(model) if name in PROMPT_LEARNING else model


def save_peft(model, cfg, out, base: dict) -> None:
    """The peft adapter into `out`, naming its base so that plain peft users can rebuild it with
    AutoPeftModelForCausalLM.from_pretrained(RUN/adapter)."""
    import os

    from gpt2tune.model.quiet import quiet_transformers

    inner = unwrap(model)
    where = base.get("path") or (os.path.abspath(out / base["folder"]) if base.get("folder") else base["name"])
    inner.peft_config["default"].base_model_name_or_path = where
    with quiet_transformers():
        inner.save_pretrained(str(out))


for _name in _CONFIGS:
    register(Method(_name, apply_peft, format="peft", save=save_peft, plain_base=plain_base, load=load_peft,
                    mergeable=_name in ("lora", "ia3")))  # linear: they fold into the base weights
