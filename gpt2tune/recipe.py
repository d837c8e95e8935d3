"""Typed recipes: one YAML file describes a whole run.

`load_recipe(path, overrides)` reads YAML, applies `--set a.b=value` overrides and
validates everything; errors name the field and list the valid ones.
"""

from __future__ import annotations

import copy
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpt2tune.errors import UserError
from gpt2tune.method.config import FullMethod, MethodConfig
from gpt2tune.train.loggers import LOGGERS

VERSE_FORMS = ["wuyan-jueju", "qiyan-jueju", "wuyan-lvshi", "qiyan-lvshi"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    name: Optional[str] = Field(None, description="hub id, local HF folder or HF cache snapshot folder")
    init: Literal["pretrained", "scratch"] = "pretrained"
    size: Literal["nano", "micro", "mini", "small", "medium", "large", "xl"] = "mini"
    tokenizer: Optional[str] = Field(None, description="None: the model's own; 'from-data'; or a folder")
    vocab_size: int = Field(8000, gt=0, description="target size of a byte-level BPE built from data")
    n_positions: Optional[int] = Field(None, gt=0, description="context length of a scratch model")
    revision: Optional[str] = None
    dropout: Optional[float] = Field(None, ge=0, lt=1)


class PoetrySection(_Section):
    include_title: bool = False
    form: Optional[Literal["wuyan-jueju", "qiyan-jueju", "wuyan-lvshi", "qiyan-lvshi"]] = None
    simplified: bool = False


class DataSection(_Section):
    source: str = Field(..., description="KIND:PATH, e.g. text:file.txt, jsonl:f.jsonl, chinese-poetry:DIR, builtin:tang-lvshi")
    validation: Optional[str] = Field(None, description="a separate validation source (else a split)")
    field: str = Field("text", description="jsonl field / csv column holding the text")
    columns: Optional[list[str]] = Field(None, description="column names for csv/tsv files without a header")
    header: Optional[bool] = Field(None, description="csv/tsv has a header row (default: yes unless columns is set)")
    text_mode: Literal["auto", "lines", "documents"] = "auto"
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(128, gt=1, description="tokens per training sample, special tokens included")
    long_samples: Literal["truncate", "split"] = "truncate"
    batching: Literal["group", "pad", "pack"] = "group"
    normalize: Literal["none", "nfc", "nfkc"] = "nfc"
    whitespace: bool = True
    min_chars: int = Field(1, ge=0)
    max_chars: Optional[int] = Field(None, gt=0)
    dedupe: bool = False
    limit: Optional[int] = Field(None, gt=0, description="use at most this many samples (after cleaning)")
    seed: int = 1234
    poetry: PoetrySection = PoetrySection()
    cache: bool = Field(True, description="causal-lm text sources: tokenize once into a memory-mapped cache, "
                                          "reused while the data and settings are unchanged")
    cache_dir: Optional[str] = Field(None, description="where the corpus cache lives (default $GPT2TUNE_CACHE_DIR, "
                                                       "else ~/.cache/gpt2tune/data)")
    num_proc: Optional[int] = Field(None, ge=1, description="processes that tokenize a cached corpus (default: every core)")
    streaming: bool = Field(False, description="causal-lm: read the source as a stream (hf:, jsonl: and text: sources, "
                                              "through datasets' streaming mode) for a corpus that does not fit on disk: "
                                              "nothing cached or held whole; documents cleaned, tokenized and packed into "
                                              "rows of max_length tokens as they arrive, shuffled in windows of "
                                              "shuffle_buffer rows; needs train.max_steps; --resume goes on at the saved "
                                              "position")
    shuffle_buffer: int = Field(10000, ge=1, description="data.streaming: packed rows shuffled together (a window is "
                                                         "filled, shuffled and trained on, then the next; memory: rows "
                                                         "x max_length x 4 bytes)")
    val_documents: int = Field(1000, ge=0, description="data.streaming: validation documents, the first N of "
                                                       "data.validation, else the first N of the stream (held out: "
                                                       "never trained on); 0: no validation")


class EarlyStoppingSection(_Section):
    metric: str = Field("loss", description="a validation metric as named in metrics.jsonl: loss, perplexity, accuracy, "
                                            "macro_f1 (classification)")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for loss/perplexity, max for "
                                                                    "accuracy/macro_f1")
    patience: int = Field(3, ge=1, description="evaluations (train.eval_every) without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")


class TrainSection(_Section):
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "adamw_bf16", "adamw_8bit"] = Field(
        "adamw", description="AdamW's two moments per trained parameter: adamw keeps them in fp32 (8 bytes per "
                             "parameter, twice the fp32 weights); adamw_bf16 in bf16 with stochastic rounding (4 bytes: "
                             "half); adamw_8bit in 8-bit blocks of 256 with a scale each, as bitsandbytes' AdamW8bit "
                             "(~2 bytes: a quarter). Weights and the update's arithmetic stay fp32; tensors under 4096 "
                             "elements keep fp32 moments. Trade-off: a slightly noisier update (training loss within "
                             "0.1% / 3% of adamw's in the tests) and a slower optimizer step than fused AdamW (~1 s / "
                             "~2.5 s per step of GPT-2 124M on a CPU); worth it when the optimizer state is a large "
                             "share of memory (full fine-tuning), hardly with LoRA. Not with distributed: fsdp")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; overrides epochs")
    max_minutes: Optional[float] = Field(None, gt=0, description="time budget for the training steps: after the first "
                                         "steps the run measures its speed and, if the planned steps do not fit, plans "
                                         "fewer, with the learning-rate schedule stretched to end on the last of them")
    seed: int = 42
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at start and end)")
    eval_batches: Optional[int] = Field(None, gt=0, description="cap validation batches per evaluation")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: never)")
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping: Optional[EarlyStoppingSection] = Field(
        None, description="stop when the validation metric has not improved for `patience` evaluations")
    keep_best: bool = Field(False, description="RUN/model is the model of the best evaluation (the early_stopping "
                                               "metric, else validation loss), RUN/last the last one; eval.json says which")
    log_every: int = Field(10, ge=1)
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss stops the run, or skips that update")
    num_threads: Optional[int] = Field(None, gt=0)
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes (torchrun): ddp replicates the model on every rank; fsdp shards "
                           "weights, gradients and optimizer state over the ranks (FSDP2) for models that do not fit "
                           "one device (full or partial fine-tuning; the Hugging Face forward)")
    gradient_checkpointing: bool = Field(False, description="keep only each block's input and recompute the rest in "
                                                            "backward: much less activation memory for ~30% more compute")
    check_memory: bool = Field(True, description="estimate peak training memory before the first step and stop with "
                                                 "advice when the device has less free")
    fast: bool = Field(False, description="GPT-2 fast path: lean forward (fused qkv, SDPA, chunked loss) and fused AdamW; "
                                          "same loss as the HF forward (1e-4 fp32), see BENCHMARKS.md")
    report_to: list[Literal[tuple(LOGGERS)]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="experiment trackers that receive the rows of metrics.jsonl, the resolved "
                                          "recipe and the plots (each an optional extra: pip install 'gpt2tune[NAME]')")

    @field_validator("lr")
    @classmethod
    def _lr_finite(cls, v: float) -> float:
        if v != v or v == float("inf"):
            raise ValueError("must be a finite positive number")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v):
        if isinstance(v, str):  # --set train.report_to=tensorboard,mlflow
            v = [s.strip() for s in v.split(",") if s.strip()]
        return list(dict.fromkeys(v)) if isinstance(v, list) else v


class SampleSection(_Section):
    """Samples generated at the end of training and stored in samples.json."""

    prompts: list[str] = []
    max_new_tokens: int = Field(64, gt=0)
    top_k: int = 40
    temperature: float = Field(1.0, gt=0)
    weights: Literal["model", "bf16", "int8"] = Field(
        "model", description="decoding weights of the samples (generate --weights): model (exact), bf16 or int8")


class OutputSection(_Section):
    dir: str = "runs/run"


class CompareSection(_Section):
    """`gpt2tune compare`: which methods (and their settings), per-method learning rates, and
    the reference text whose perplexity before/after fine-tuning measures forgetting."""

    methods: list[typing.Annotated[MethodConfig, Field(discriminator="name")]] = Field(
        default_factory=list, description="methods to compare, with their settings (a method named by --methods "
                                          "but not listed here uses its defaults)")
    lr: dict[str, typing.Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="learning rate per method name, e.g. {full: 1e-4, lora: 2e-3} (others: train.lr)")
    reference: Optional[str] = Field(None, description="forgetting: a data source (KIND:PATH) scored before and after")
    reference_limit: int = Field(200, gt=0, description="score at most this many reference samples")


class ChatSection(_Section):
    """task: chat. Conversations under `field`, rendered by a chat template (gpt2tune/chat/template.py)."""

    template: Literal["plain", "special"] = Field("plain", description="plain: 'User: ...' / 'Assistant: ...' lines with the tokenizer's end marker; special: adds <|system|> <|user|> <|assistant|> <|end|> tokens")
    field: str = Field("messages", description="jsonl field holding the list of {role, content} messages")


class CompletionSection(_Section):
    """task: completion. The last {placeholder} is the completion (trained), the rest the prompt."""

    template: str = Field("{prompt}{completion}", description="e.g. \"{document}\\nTL;DR: {title}\"; placeholders name fields/columns")


class ClassificationSection(_Section):
    """task: classification. Where the label is, how the classes are balanced and split, and an optional
    language-model pretraining on the training texts before the class head learns."""

    label_field: str = Field("label", description="jsonl field / csv column holding the label")
    balance: Literal["none", "undersample"] = Field("none", description="undersample every class to the rarest (seeded by data.seed)")
    split: Optional[list[float]] = Field(None, description="train/validation/test fractions, stratified by label (default [0.7, 0.1, 0.2])")
    test: Optional[str] = Field(None, description="a separate test source (else a split)")
    pretrain_steps: int = Field(0, ge=0, description="language-model steps on the training texts before fine-tuning")
    pretrain_lr: Optional[float] = Field(None, gt=0, description="learning rate of the pretraining steps (default: train.lr)")


class PreferenceSection(_Section):
    """task: preference. Pairs {prompt, chosen, rejected} (text or chat messages); see gpt2tune/train/preference.py."""

    loss: Literal["dpo", "orpo"] = Field("dpo", description="dpo: needs a reference (the model before training); "
                                         "orpo: none (odds-ratio term plus NLL of the chosen response)")
    beta: float = Field(0.1, gt=0, description="DPO's beta (strength of the reference KL); ORPO's lambda (weight of "
                                               "the odds-ratio term)")
    reference: Literal["auto", "precompute", "adapter"] = Field(
        "auto", description="DPO's reference log-probs: adapter (the base with the adapter disabled: peft methods and "
                            "adapters), precompute (one pass over the data before training: full/partial); auto picks")
    orpo_nll: Literal["response", "sequence"] = Field(
        "response", description="ORPO's NLL term on the chosen response only, or on the whole chosen sequence "
                                "(prompt included, as TRL's ORPOTrainer)")
    rpo_alpha: float = Field(0.0, ge=0, description="DPO: add rpo_alpha x the NLL of the chosen responses (RPO, "
                                                   "TRL's rpo_alpha); 0: plain DPO")
    disable_dropout: bool = Field(True, description="train without dropout (as TRL): the policy's log-probs are "
                                                    "then comparable with the reference's")


# every task: the recipe's `task` value -> the module of gpt2tune.tasks that runs it; a task's own
# settings are the recipe section of the same name (chat, completion, classification, preference)
TASKS = {"causal-lm": "causal_lm", "classification": "classification", "chat": "chat", "completion": "completion",
         "preference": "preference"}
# fields that moved to their task's section: recipes written before still load (with a note)
MOVED = {"data.label_field": "classification.label_field", "data.balance": "classification.balance",
         "data.split": "classification.split", "data.test": "classification.test",
         "train.pretrain_steps": "classification.pretrain_steps", "train.pretrain_lr": "classification.pretrain_lr"}
_NOTED: set = set()


def _moved(old: str) -> str:
    """The new place of a moved field (a note on stderr, once per process)."""
    if old not in _NOTED:
        _NOTED.add(old)
        print(f"note: recipe field {old} is now {MOVED[old]} (read from the old place; move it there)", file=sys.stderr)
    return MOVED[old]


def migrate(raw: dict) -> dict:
    """A recipe mapping with the fields of `MOVED` at their new places (a copy when any moved)."""
    def present(dotted: str) -> bool:
        sec, key = dotted.split(".")
        return isinstance(raw.get(sec), dict) and key in raw[sec]

    found = [old for old in MOVED if present(old)]
    if not found:
        return raw
    raw = copy.deepcopy(raw)
    for old in found:
        sec, key = old.split(".")
        value = raw[sec].pop(key)
        new_sec, new_key = _moved(old).split(".")
        target = raw.setdefault(new_sec, {})
        if not isinstance(target, dict):
            break  # the section's own error is reported by validation
        if new_key in target and target[new_key] != value:
            raise ValueError(f"{old} and {MOVED[old]} are both set, to different values; keep {MOVED[old]}")
        target[new_key] = value
    return raw


class Recipe(_Section):
    task: Literal[tuple(TASKS)] = "causal-lm"  # type: ignore[valid-type]
    model: ModelSection = ModelSection()
    data: DataSection
    method: MethodConfig = Field(default_factory=FullMethod, discriminator="name")
    train: TrainSection = TrainSection()
    sample: SampleSection = SampleSection()
    output: OutputSection = OutputSection()
    chat: ChatSection = ChatSection()
    completion: CompletionSection = CompletionSection()
    classification: ClassificationSection = ClassificationSection()
    preference: PreferenceSection = PreferenceSection()
    compare: CompareSection = CompareSection()

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, raw):
        return migrate(raw) if isinstance(raw, dict) else raw


# ---------------------------------------------------------------------------


def _members(ann) -> list[type[BaseModel]]:
    """The BaseModel classes a field annotation allows (one, or a union's members)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag_of(cls: type[BaseModel]) -> Optional[str]:
    f = cls.model_fields.get("name")
    return f.default if f is not None and isinstance(f.default, str) else None


def _pick(members: list[type[BaseModel]], tag) -> Optional[type[BaseModel]]:
    if len(members) == 1:
        return members[0]
    for m in members:
        if _tag_of(m) == tag:
            return m
    return members[0] if members else None


def _fields_of(model_cls: type[BaseModel], path: tuple) -> list[str]:
    cls = model_cls
    path = list(path)
    while path:
        key = path.pop(0)
        f = cls.model_fields.get(key) if isinstance(key, str) else None
        if f is None:
            break
        members = _members(f.annotation)
        if not members:
            break
        tag = path.pop(0) if len(members) > 1 and path else None
        cls = _pick(members, tag)
    return list(cls.model_fields)


def format_validation_error(err: ValidationError, root: type[BaseModel] = Recipe) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "recipe"
        if e["type"] == "extra_forbidden":
            valid = _fields_of(root, loc[:-1])
            section = ".".join(str(p) for p in loc[:-1]) or "the recipe"
            lines.append(f"unknown field '{where}'; valid fields of {section}: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"missing required field '{where}'")
        else:
            lines.append(f"field '{where}': {e['msg']} (got {e.get('input')!r})")
    return "invalid recipe: " + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set: bad field name {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str], root: type[BaseModel] = Recipe) -> dict:
    data = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        if root is Recipe and ".".join(path[:2]) in MOVED and len(path) == 2:
            path = _moved(".".join(path)).split(".")
        cls: Optional[type[BaseModel]] = root
        node = data
        for i, key in enumerate(path):
            if cls is None or key not in cls.model_fields:
                where = ".".join(path[:i]) or "the recipe"
                valid = list(cls.model_fields) if cls is not None else []
                raise UserError(
                    f"--set {'.'.join(path)}: no field '{key}' in {where}"
                    + (f"; valid fields: {', '.join(valid)}" if valid else "")
                )
            ann = cls.model_fields[key].annotation
            if i == len(path) - 1:
                node[key] = value
            else:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
                members = _members(ann)
                cls = _pick(members, node.get("name", _tag_of(members[0]) if members else None)) if members else None
    return data


def recipe_from_dict(raw: dict, overrides: list[str] = ()) -> Recipe:
    if not isinstance(raw, dict):
        raise UserError("invalid recipe: the top level must be a mapping of sections (task, model, data, ...)")
    data = apply_overrides(raw, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


def load_raw(path: str | Path) -> dict:
    """A recipe file's YAML as a mapping, before overrides and validation."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"recipe {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError("invalid recipe: the top level must be a mapping of sections (task, model, data, ...)")
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    return recipe_from_dict(load_raw(path), overrides)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    data = recipe.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
