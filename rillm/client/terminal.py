"""The interactive side of `rillm chat`: a prompt_toolkit line editor and the slash commands.

Line editing and history that outlives the session (a file under the user's data directory),
a bracketed paste arriving as one message whatever its newlines, multi-line input (Alt-Enter
for a new line, or a block between two `\"\"\"` lines), Ctrl-X Ctrl-E for an external editor,
tab completion of commands. The answer itself is streamed by chat.py's `answer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings

COMMANDS = ("/set", "/show", "/models", "/model", "/retry", "/save", "/load", "/reset",
            "/help", "/exit")
SETTINGS = ("temperature", "top_p", "max_tokens", "system", "think")
HELP = """\
/set temperature|top_p|max_tokens VALUE   sampling for the next answers (/set NAME to unset)
/set system TEXT                          the system message (/set system to clear it)
/set think on|off                         the chat template's thinking switch
/show                                     model, server and settings
/models, /model NAME                      list the served models, switch to one
/retry                                    ask the last question again
/save FILE, /load FILE                    the conversation as JSON
/reset, /exit                             forget the conversation, quit
Alt-Enter or a \"\"\" block: several lines; Ctrl-X Ctrl-E: an editor; Ctrl-C stops an answer;
Ctrl-D quits."""


def history_path() -> Path:
    """Where the input history lives: $XDG_DATA_HOME/rillm (~/.local/share/rillm)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "rillm" / "chat_history"


@dataclass
class Settings:
    """What the next request carries besides the conversation."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    system: str | None = None
    think: bool | None = None

    def request(self) -> dict[str, Any]:
        """The request fields these settings set (none for what is unset)."""
        body: dict[str, Any] = {}
        for name in ("temperature", "top_p", "max_tokens"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.think is not None:
            body["extra_body"] = {"chat_template_kwargs": {"enable_thinking": self.think}}
        return body

    def set(self, name: str, value: str) -> str:
        """Change one setting from its text; the line to show, or ValueError."""
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; one of {', '.join(SETTINGS)}")
        value = value.strip()
        if name == "system":
            self.system = value or None
        elif not value:
            setattr(self, name, None)
        elif name == "think":
            if value not in ("on", "off"):
                raise ValueError("think is on or off")
            self.think = value == "on"
        elif name == "max_tokens":
            self.max_tokens = int(value)
        else:
            setattr(self, name, float(value))
        return f"{name} = {self.show(name)}"

    def show(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            return "(server default)" if name != "system" else "(none)"
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def lines(self) -> list[str]:
        return [f"{f.name}: {self.show(f.name)}" for f in fields(self)]


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)

    def save(self, path: str, system: str | None) -> int:
        head = [{"role": "system", "content": system}] if system else []
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"messages": head + self.messages}, f, ensure_ascii=False, indent=2)
        return len(head) + len(self.messages)

    def load(self, path: str) -> str | None:
        """Replace the conversation with the file's; its system message, if any."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise ValueError("not a saved conversation ({\"messages\": [{role, content}]})")
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages
                         if m["role"] != "system"]
        return system


def line_reader(history_file: Path | None = None) -> Callable[[], str]:
    """A function that reads one message from the terminal (EOFError on Ctrl-D,
    KeyboardInterrupt on Ctrl-C)."""
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _(event: Any) -> None:
        event.current_buffer.insert_text("\n")  # Alt-Enter: a new line in the same message

    history = None
    if history_file is not None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        except OSError:
            history = None  # no writable data directory: history for this session only
    session: PromptSession[str] = PromptSession(
        history=history, key_bindings=bindings, enable_open_in_editor=True,
        completer=WordCompleter([*COMMANDS, *SETTINGS], sentence=True), complete_while_typing=False)

    def read() -> str:
        text = session.prompt("> ")
        if text.strip() != '"""':
            return text
        lines = []  # a block: everything up to the next line that is only """
        while (line := session.prompt("… ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)

    return read
