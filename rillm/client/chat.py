"""`rillm chat`: talk to any OpenAI-compatible server from the terminal, token by token.

Interactive on a terminal (rillm/client/terminal.py: line editing, history, pasted and
multi-line messages, /set, /show, /models, /model, /retry, /save, /load; answers rendered as
markdown while they stream; Ctrl-C stops an answer, Ctrl-D quits); one-shot with -p or piped
stdin, printing exactly the streamed text.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import openai
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from rillm.client.events import (
    ChatResult,
    Collector,
    ContentDelta,
    ReasoningDelta,
    ToolCallDelta,
    stream_chat,
)
from rillm.client.terminal import HELP, Conversation, Settings, history_path, line_reader


@dataclass(frozen=True)
class ChatOptions:
    base_url: str
    api_key: str
    model: str | None
    system: str | None
    temperature: float | None
    max_tokens: int | None


class ChatError(Exception):
    """A problem worth one line to the user (server down, bad key, unknown model)."""


def connect(options: ChatOptions) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=options.base_url, api_key=options.api_key, max_retries=0)
    try:
        models = client.models.list().data
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        raise ChatError(explain(exc, options)) from None
    if options.model is not None:
        return client, options.model
    if not models:
        raise ChatError(f"{options.base_url} serves no model")
    return client, models[0].id


def explain(exc: BaseException, options: ChatOptions) -> str:
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {options.base_url}: is the server running? (`rillm serve`)"
    if isinstance(exc, openai.AuthenticationError):
        return "the server refused the API key (pass --api-key or set OPENAI_API_KEY)"
    if isinstance(exc, openai.NotFoundError):
        return f"the server does not know model {options.model!r} (see --model)"
    if isinstance(exc, openai.APIStatusError):
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        return f"the server said {exc.status_code}: {message or exc.message}"
    if isinstance(exc, openai.APIError):
        return f"the server reported an error: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def answer(client: openai.OpenAI, model: str, messages: list[dict[str, str]],
           fields: dict[str, Any], out: TextIO, console: Console | None
           ) -> tuple[ChatResult, bool]:
    """Stream one answer: to `out` as plain text, or to `console` rendered — reasoning dimmed
    and apart, the answer as markdown while it streams, tool calls named. Returns the
    collected result and whether it was stopped with Ctrl-C."""
    collector = Collector()
    events = stream_chat(client, model=model, messages=messages, **fields)
    view = _AnswerView(console) if console is not None else None
    try:
        for event in events:
            collector.add(event)
            if view is not None:
                view.show(event)
            elif isinstance(event, ContentDelta):
                out.write(event.text)
                out.flush()
    except KeyboardInterrupt:
        events.close()  # closes the connection: the server aborts the request
        return _first(collector), True
    finally:
        if view is not None:
            view.close()
    return _first(collector), False


class _AnswerView:
    """An answer on the terminal as it streams."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.thinking = False
        self.text = ""
        self.live: Live | None = None
        self.calls: dict[int, list[str]] = {}

    def show(self, event: object) -> None:
        if isinstance(event, ReasoningDelta):
            if not self.thinking:
                self.console.print("thinking: ", style="dim italic", end="")
                self.thinking = True
            self.console.print(event.text, style="dim", end="", markup=False, highlight=False)
        elif isinstance(event, ContentDelta):
            if self.live is None:
                if self.thinking:
                    self.console.print("\n")
                self.live = Live(Markdown(""), console=self.console, refresh_per_second=10,
                                 vertical_overflow="visible")
                self.live.start()
            self.text += event.text
            self.live.update(Markdown(self.text))
        elif isinstance(event, ToolCallDelta):
            call = self.calls.setdefault(event.call_index, ["", ""])
            call[0] += event.name or ""
            call[1] += event.arguments

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        elif self.thinking:
            self.console.print()
        for name, arguments in self.calls.values():
            self.console.print(f"tool call: {name}({arguments})", style="cyan", markup=False,
                               highlight=False)


def _first(collector: Collector) -> ChatResult:
    results = collector.finish()
    return results[min(results)]


def stats_line(result: ChatResult) -> str:
    parts = []
    if result.time_to_first_token is not None:
        parts.append(f"first token {result.time_to_first_token:.2f} s")
    if result.tokens_per_second is not None:
        parts.append(f"{result.tokens_per_second:.1f} tok/s")
    if result.usage is not None:
        parts.append(f"{result.usage.prompt_tokens} prompt + "
                     f"{result.usage.completion_tokens} completion tokens")
    return " · ".join(parts)


def one_shot(options: ChatOptions, prompt: str, out: TextIO) -> int:
    client, model = connect(options)
    messages = [{"role": "system", "content": options.system}] if options.system else []
    messages.append({"role": "user", "content": prompt})
    console = Console() if out.isatty() else None
    settings = Settings(temperature=options.temperature, max_tokens=options.max_tokens)
    try:
        result, stopped = answer(client, model, messages, settings.request(), out, console)
    except openai.APIError as exc:
        raise ChatError(explain(exc, options)) from None
    out.write("\n")
    return 130 if stopped else (0 if result.finish_reason is not None else 1)


def interactive(options: ChatOptions, read: Callable[[], str] | None = None) -> int:
    console = Console()
    client, model = connect(options)
    read = read or line_reader(history_path())
    console.print(f"[bold]rillm chat[/bold] · {model} at {options.base_url} · /help for help")
    settings = Settings(temperature=options.temperature, max_tokens=options.max_tokens,
                        system=options.system)
    conversation = Conversation()
    while True:
        try:
            text = read()
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print("(Ctrl-D or /exit to quit)")
            continue
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command.startswith("/") and command != "/retry":
            model = _command(command, rest, client, model, settings, conversation, options,
                             console)
            continue
        if command == "/retry":
            last = next((i for i in range(len(conversation.messages) - 1, -1, -1)
                         if conversation.messages[i]["role"] == "user"), None)
            if last is None:
                console.print("(nothing to retry)", style="dim")
                continue
            text = conversation.messages[last]["content"]
            del conversation.messages[last:]
        if not text.strip():
            continue
        _turn(client, model, text, settings, conversation, options, console)


def _turn(client: openai.OpenAI, model: str, text: str, settings: Settings,
          conversation: Conversation, options: ChatOptions, console: Console) -> None:
    """One question and its streamed answer, kept in the conversation."""
    conversation.messages.append({"role": "user", "content": text})
    head = [{"role": "system", "content": settings.system}] if settings.system else []
    try:
        result, stopped = answer(client, model, head + conversation.messages,
                                 settings.request(), sys.stdout, console)
    except openai.APIError as exc:
        conversation.messages.pop()
        console.print(f"error: {explain(exc, options)}", style="red")
        return
    if stopped:
        console.print("(stopped)", style="dim")
    if result.text:
        conversation.messages.append({"role": "assistant", "content": result.text})
    else:
        conversation.messages.pop()
    console.print(stats_line(result), style="dim")


def _command(command: str, rest: str, client: openai.OpenAI, model: str, settings: Settings,
             conversation: Conversation, options: ChatOptions, console: Console) -> str:
    """Run a slash command; the model to use from now on."""
    name, _, value = rest.strip().partition(" ")
    try:
        if command == "/help":
            console.print(HELP, markup=False, highlight=False)
        elif command == "/reset":
            conversation.messages.clear()
            console.print("(conversation cleared)", style="dim")
        elif command == "/set":
            console.print(f"({settings.set(name, value)})", style="dim", markup=False)
        elif command == "/system":  # the old spelling of /set system
            console.print(f"({settings.set('system', rest)})", style="dim", markup=False)
        elif command == "/show":
            for line in [f"model: {model}", f"server: {options.base_url}", *settings.lines(),
                         f"messages: {len(conversation.messages)}"]:
                console.print(line, markup=False, highlight=False)
        elif command == "/models":
            for listed in client.models.list().data:
                console.print(("* " if listed.id == model else "  ") + listed.id, markup=False)
        elif command == "/model":
            names = [m.id for m in client.models.list().data]
            if rest.strip() not in names:
                raise ValueError(f"no model {rest.strip()!r}; /models lists them")
            console.print(f"(model = {rest.strip()})", style="dim", markup=False)
            return rest.strip()
        elif command == "/save":
            count = conversation.save(rest.strip(), settings.system)
            console.print(f"(saved {count} messages to {rest.strip()})", style="dim",
                          markup=False)
        elif command == "/load":
            system = conversation.load(rest.strip())
            if system is not None:
                settings.system = system
            console.print(f"(loaded {len(conversation.messages)} messages)", style="dim")
        else:
            console.print(f"unknown command {command}; /help lists them", style="red",
                          markup=False)
    except (ValueError, OSError) as exc:
        console.print(f"{command}: {exc}", style="red", markup=False, highlight=False)
    except openai.APIError as exc:
        console.print(f"error: {explain(exc, options)}", style="red", markup=False)
    return model
