"""A terminal conversation: history, decoding mode and slash commands.

The ``dhara-mlx chat`` command reads lines and prints; this holds what the
conversation is. Each reply re-renders the whole history with the chat template;
the session's PrefixCache makes that cheap, since a turn's prompt extends the
previous one.
"""

from typing import Iterator, Optional

from optiq_dhara.runtime import PrefixCache, stream_text
from optiq_dhara.runtime.settings import MODES, require_mode

HELP = "commands: /mode ar|diffusion|spec, /reset (forget the history), /help, /quit"


class ChatSession:
    """The state of one chat: messages so far, the mode, and the decoding options."""

    def __init__(self, model, tokenizer, *, mode: str, system: Optional[str] = None, **options):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        require_mode(model.args, mode)
        self.model, self.tokenizer = model, tokenizer
        self.mode, self.system, self.options = mode, system, options
        self.prefix_cache = PrefixCache()
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> str:
        """Apply a slash command (``/mode spec``); returns what to tell the user."""
        name, _, arg = line.strip()[1:].partition(" ")
        arg = arg.strip()
        if name == "mode":
            if arg not in MODES:
                raise ValueError(f"/mode takes one of {', '.join(MODES)}; got {arg!r}.")
            require_mode(self.model.args, arg)  # diffusion and spec need a MASK token
            self.mode = arg
            return f"mode: {arg}"
        if name == "reset":
            self.reset()
            return "history cleared"
        if name == "help":
            return HELP
        raise ValueError(f"unknown command /{name}; {HELP}")

    def reply(self, text: str) -> Iterator:
        """Stream the answer to ``text`` (TextChunks) and record both turns."""
        self.history.append({"role": "user", "content": text})
        answer = ""
        try:
            for chunk in stream_text(
                self.model,
                self.tokenizer,
                self.history,
                chat=True,
                mode=self.mode,
                prefix_cache=self.prefix_cache,
                **self.options,
            ):
                answer += chunk.text
                yield chunk
        finally:
            self.history.append({"role": "assistant", "content": answer})
