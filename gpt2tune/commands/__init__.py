"""One module per CLI command. Each has `add_parser(subparsers)` and `run(args) -> int`.

To add a command, write its module and list it in COMMANDS.
"""

COMMANDS = ["train", "generate", "data", "classify", "export", "compare", "eval-poems", "chat", "serve", "sweep", "lr-find", "prefer"]
