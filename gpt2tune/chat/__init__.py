"""Chat and prompt->completion fine-tuning: chat templates (`template`), conversations read
from records (`messages`), label masks that train only on answers (`masking`),
prompt->completion templates (`prompt`), the history kept within the context window
(`history`) and streamed replies (`reply`).

Reusable outside the CLI (the HTTP server uses them):

    from gpt2tune.chat.template import load_chat_template
    from gpt2tune.chat.reply import chat_prompt_ids, stream_reply
"""
