"""Method: decide which parameters learn (`apply_method`) and how the result is saved."""

from __future__ import annotations

from gpt2tune.errors import UserError


def apply_method(model, cfg):
    """Prepare `model` for fine-tuning with the method described by `cfg` (a method config)."""
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.name == "partial":
        from gpt2tune.method.partial import apply_partial

        return apply_partial(model, cfg)
    raise UserError(f"unknown method {cfg.name!r}")


def save_trained(model, tokenizer, run_dir, cfg) -> str:
    """Save what the method trained in the run folder; return the sub-folder name."""
    from gpt2tune.model.quiet import quiet_transformers

    out = run_dir / "model"
    with quiet_transformers():
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return "model"
