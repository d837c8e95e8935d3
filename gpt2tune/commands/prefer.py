"""`gpt2tune prefer RUN --form F [-n N] [--rounds K] --output DIR`: self-preference rounds for poems."""

from __future__ import annotations

import argparse
import sys
import textwrap

NAME = "prefer"


def add_parser(sub):
    p = sub.add_parser(
        "prefer", help="teach a poem model the verse rules: sample, score, pair, preference-tune (repeatable)",
        description=textwrap.fill(
            "Each round samples -n poems per prompt from the model without the verse constraint and -n with it "
            "(--form F --rhyme --tones standard), scores them with the poem metrics (classical prosody: form, "
            "平水韻 rhyme, tone pattern, repeated characters), pairs the best with the worst, adds rhyme-contrast "
            "pairs (a rhyming poem against itself with one rhyme broken), trains a DPO (or ORPO) round on the "
            "pairs and measures the new model's unconstrained samples. The next round starts from the model the "
            "last one wrote. Writes DIR/round-K/{pairs.jsonl,run/} and DIR/prefer.{json,md,png}.", 100),
        epilog="Example:\n  gpt2tune prefer ../shared/models/gpt2-tang-mini --form qiyan-jueju "
               "--output runs/prefer-jueju\n  then: gpt2tune eval-poems runs/prefer-jueju/round-3/run --form qiyan-jueju",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_MODEL", help="a run folder (its model) or a model folder (full weights)")
    p.add_argument("--form", required=True, choices=["wuyan-jueju", "qiyan-jueju", "wuyan-lvshi", "qiyan-lvshi"])
    p.add_argument("-n", "--num-candidates", type=int, default=256,
                   help="poems sampled per prompt and round, of each kind (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="preference rounds (default 3)")
    p.add_argument("--prompt", action="append", default=[], dest="prompts", metavar="TEXT",
                   help="start of the poems (repeatable; default: none, the model starts each poem)")
    p.add_argument("--candidates", choices=["mixed", "sampled"], default="mixed",
                   help="mixed: unconstrained and constrained samples (default); sampled: unconstrained only")
    p.add_argument("--contrast", type=int, default=1, metavar="K",
                   help="rhyme-contrast pairs per rhyming candidate: the poem against itself with one rhyme broken "
                        "(default 1; 0: none)")
    p.add_argument("--margin", type=float, default=1.0, help="least score difference of a scored pair (default 1)")
    p.add_argument("--loss", choices=["dpo", "orpo"], default="dpo", help="preference loss (default dpo)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta / ORPO's lambda (default 0.1)")
    p.add_argument("--rpo-alpha", type=float, default=0.0, metavar="A",
                   help="DPO plus A x the NLL of the chosen poems (RPO; default 0: plain DPO)")
    p.add_argument("--lr", type=float, default=3e-5, help="learning rate of each round (default 3e-5)")
    p.add_argument("--epochs", type=int, default=3, help="epochs over each round's pairs (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--method", default="full", help="fine-tuning method of each round (default full)")
    p.add_argument("--eval-samples", type=int, default=50, help="unconstrained samples measured per round (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(a) -> int:
    from gpt2tune.tasks.prefer import PreferConfig, prefer

    cfg = PreferConfig(model=a.model, form=a.form, output=a.output, n=a.num_candidates, rounds=a.rounds,
                       prompts=tuple(a.prompts) or ("",), candidates=a.candidates, contrast=a.contrast,
                       margin=a.margin, loss=a.loss, beta=a.beta, rpo_alpha=a.rpo_alpha, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size,
                       method=a.method, eval_samples=a.eval_samples, seed=a.seed, overwrite=a.overwrite)
    res = prefer(cfg, progress=not a.no_progress, log=lambda m: print(m, file=sys.stderr))
    from gpt2tune.tasks.prefer import table

    print(table(res))
    print(f"wrote {a.output}/prefer.json, prefer.md, prefer.png", file=sys.stderr)
    return 0
