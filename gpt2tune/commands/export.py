"""`gpt2tune export RUN --output DIR [--merge] [--push-to-hub REPO_ID]`."""

from __future__ import annotations

import sys

NAME = "export"


def add_parser(sub):
    p = sub.add_parser("export", help="write a run as a standalone Hugging Face model folder",
                       description="Export RUN (a run folder) to DIR: model or base + adapter, tokenizer, "
                                   "generation config and a model card. With --merge, LoRA and IA3 adapters are "
                                   "merged into the base weights (a plain transformers model).",
                       epilog="Example: gpt2tune export runs/lora --output exports/lora --merge")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--merge", action="store_true", help="merge a LoRA/IA3 adapter into the base weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="then upload DIR to this hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")


def run(a) -> int:
    from gpt2tune.export import export_run

    res = export_run(a.run, a.output, merge=a.merge, overwrite=a.overwrite)
    print(f"exported {a.run} ({res['method']}, {res['layout']}) to {res['folder']}", file=sys.stderr)
    if a.push_to_hub:
        from gpt2tune.export.hub import push_folder

        url = push_folder(res["folder"], a.push_to_hub, private=a.private)
        print(f"uploaded to {url}", file=sys.stderr)
    print(res["folder"])
    return 0
