"""`gpt2tune chat RUN`: talk to a model trained with task: chat."""

from __future__ import annotations

import json
import sys

from gpt2tune.errors import UserError

NAME = "chat"

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt; empty clears it), " \
       "/history (show the conversation), /exit (or Ctrl-D)"


def add_parser(sub):
    p = sub.add_parser("chat", help="talk to a chat run in the terminal (or answer one --message)",
                       description="An interactive chat with RUN (a chat run or its model folder). Replies "
                                   "stream as they are generated; the history sent to the model keeps the latest "
                                   "turns that fit its context window. " + HELP + ".",
                       epilog="Example: gpt2tune chat runs/chat --system 'Answer briefly.'  |  "
                              "gpt2tune chat runs/chat --message 'add 2 and 3' --greedy")
    p.add_argument("model", metavar="RUN")
    p.add_argument("--message", "-m", default=None, help="answer this one message and exit")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages seen tokens (1.0: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the reply where this text appears (repeatable; the text is not kept)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--json", action="store_true", help="with --message: print a JSON object with the reply")
    from gpt2tune.commands.generate import add_weights_arg

    add_weights_arg(p)


class Session:
    """The conversation of one terminal chat: a system prompt and the user/assistant turns."""

    def __init__(self, chat, sampling, system: str = ""):
        self.chat = chat
        self.sampling = sampling
        self.system = system
        self.history: list[dict] = []

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def ask(self, user: str, out=None, err=None):
        """Stream the answer to `user` into `out` (stdout); return the finished Reply."""
        from gpt2tune.chat.reply import Reply

        out, err = out or sys.stdout, err or sys.stderr

        r = Reply(self.chat, self.messages(user), self.sampling)
        if r.dropped:
            print(f"(left out the {r.dropped} earliest messages to fit the model's context of "
                  f"{self.chat.n_positions} tokens)", file=err, flush=True)
        for piece in r:
            out.write(piece)
            out.flush()
        kept = [m for m in r.kept if m["role"] != "system"]
        self.history = kept + [{"role": "assistant", "content": r.text}]
        return r


def _sampling(a):
    from gpt2tune.generate.sampling import Sampling

    if a.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if a.temperature <= 0 or not 0 < a.top_p <= 1 or a.top_k < 0:
        raise UserError("--temperature must be > 0, --top-p in (0, 1] and --top-k >= 0")
    s = Sampling(max_new_tokens=a.max_new_tokens, greedy=a.greedy, temperature=a.temperature, top_k=a.top_k,
                 top_p=a.top_p, seed=a.seed, weights=a.weights, repetition_penalty=a.repetition_penalty,
                 stop=list(a.stop))
    msg = s.check()
    if msg:
        raise UserError(msg.replace("_", "-"))
    return s


def run(a) -> int:
    from gpt2tune.chat.reply import load_chat_model

    s = _sampling(a)
    chat = load_chat_model(a.model)
    from gpt2tune.commands.generate import check_weights

    check_weights(chat.model, chat.tok, chat.framing, s.weights, report=False)
    session = Session(chat, s, a.system)
    if a.message is not None:
        if not a.message.strip():
            raise UserError("--message is empty")
        if a.json:
            import io

            r = session.ask(a.message, out=io.StringIO())
            print(json.dumps({"reply": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                              "completion_tokens": r.completion_tokens, "dropped_messages": r.dropped},
                             ensure_ascii=False))
        else:
            session.ask(a.message)
            print()
        return 0
    return interactive(session, a.model)


def interactive(session: Session, name: str) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    print(f"chatting with {name} (template {session.chat.template.name}, context {session.chat.n_positions} "
          f"tokens). {HELP}", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.history = []
                print("(conversation cleared)", flush=True)
            elif cmd == "/system":
                session.system = arg.strip()
                print("(system prompt set)" if session.system else "(system prompt cleared)", flush=True)
            elif cmd == "/history":
                msgs = ([{"role": "system", "content": session.system}] if session.system else []) + session.history
                for m in msgs:
                    print(f"[{m['role']}] {m['content']}")
                print(f"({len(session.history)} messages)", flush=True)
            else:
                print(f"unknown command {cmd}; {HELP}", flush=True)
            continue
        sys.stdout.write("bot> ")
        sys.stdout.flush()
        try:
            session.ask(text)
        except UserError as err:
            print(f"\n(error: {err})", flush=True)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted; reply discarded)", flush=True)
            continue
        print(flush=True)
