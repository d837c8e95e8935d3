"""GPT-2 with a classification head pooled on the last real (non-pad) token.

`GPT2Classifier` is `transformers.GPT2ForSequenceClassification` with the same weights
(`transformer.*`, `score.weight`) and config (`num_labels`, `id2label`, `label2id`,
`pad_token_id`), so a saved run loads with `AutoModelForSequenceClassification`. Two
differences, both about padding:

- It pools on the last position whose attention mask is 1 (`last_token_index`), with left
  or right padding, even when the pad id is also a real token (GPT-2 BPE pads with
  `<|endoftext|>`) and when a method prepends virtual tokens as `inputs_embeds`.
  `transformers` instead pools on the rightmost token whose *id* differs from
  `config.pad_token_id` (and on position -1 for `inputs_embeds`). The two agree because
  sequences are encoded the tokenizer's own way (`gpt2tune.classify.predict.encode`): GPT-2 BPE
  adds no marker, so the last real token is the text's last token, never the pad id;
  BERT-style vocabularies end with `[SEP]` and pad with `[PAD]`.
- Position ids count real tokens only (cumulative sum of the mask), so a left-padded
  sequence gets the same logits as the unpadded one. With right padding (what gpt2tune
  uses) the positions of real tokens equal `transformers`' default 0, 1, 2, ...
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GPT2ForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from gpt2tune.model.quiet import quiet_transformers

HF_ARCHITECTURE = "GPT2ForSequenceClassification"


def last_token_index(attention_mask: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
    """Index of the last position with mask 1 in each row (left or right padding).

    `length` is the number of hidden states when it may differ from the mask: longer
    (virtual tokens prepended without extending the mask: the index shifts right) or
    shorter (prefix tuning: the mask also covers the prefix held in the cache, on the left).
    """
    mask = attention_mask.to(torch.long)
    if length is not None and mask.size(-1) > length:
        mask = mask[:, -length:]
    width = mask.size(-1)
    pos = torch.arange(width, device=mask.device, dtype=torch.long)
    idx = (pos * mask).argmax(-1)
    if length is not None and length > width:
        idx = idx + (length - width)
    return idx


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)


class GPT2Classifier(GPT2ForSequenceClassification):
    """GPT2ForSequenceClassification that pools by attention mask (see the module doc)."""

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones((batch, length), dtype=torch.long, device=ref.device)
        if position_ids is None and attention_mask.size(-1) == length:
            position_ids = positions_from_mask(attention_mask)
        kwargs.pop("return_dict", None)
        out = self.transformer(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                               token_type_ids=token_type_ids, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=False if use_cache is None else use_cache,
                               **kwargs)
        hidden = out.last_hidden_state
        logits = self.score(hidden)  # every position, then pick, exactly as transformers does
        idx = last_token_index(attention_mask, hidden.size(1))
        pooled = logits[torch.arange(batch, device=logits.device), idx.to(logits.device)]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(pooled.float(), labels.to(pooled.device))
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                hidden_states=out.hidden_states, attentions=out.attentions)


def classifier_config(lm_config, id2label: dict[int, str], pad_id: int):
    cfg = copy.deepcopy(lm_config)
    cfg.num_labels = len(id2label)
    cfg.id2label = {int(i): str(n) for i, n in id2label.items()}
    cfg.label2id = {str(n): int(i) for i, n in id2label.items()}
    cfg.pad_token_id = pad_id
    cfg.problem_type = "single_label_classification"
    cfg.architectures = [HF_ARCHITECTURE]
    return cfg


def classifier_from_lm(lm, id2label: dict[int, str], pad_id: int, seed: int = 0) -> GPT2Classifier:
    """A classifier with the language model's transformer and a fresh head (seeded)."""
    cfg = classifier_config(lm.config, id2label, pad_id)
    attn = getattr(lm.config, "_attn_implementation", None) or "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with quiet_transformers():
            model = GPT2Classifier._from_config(cfg, attn_implementation=attn)
    missing = model.transformer.load_state_dict(lm.transformer.state_dict(), strict=True)
    del missing
    return model
