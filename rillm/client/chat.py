"""`rillm chat`: talk to any OpenAI-compatible server from the terminal, token by token.

Interactive on a terminal (history kept, /system, /reset, /save, /exit; Ctrl-C stops the
answer, Ctrl-D quits); one-shot with -p or piped stdin, printing exactly the streamed text.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import openai
from rich.console import Console

from rillm.client.events import (
    ChatResult,
    Collector,
    ContentDelta,
    ReasoningDelta,
    stream_chat,
)

HELP = ("Commands: /system TEXT (set the system message), /reset (forget the conversation), "
        "/save FILE (write it as JSON), /exit. End a line with \\ to continue it; Ctrl-C stops "
        "an answer; Ctrl-D quits.")


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
           options: ChatOptions, out: TextIO, console: Console | None) -> tuple[ChatResult, bool]:
    """Stream one answer to `out` (content only) or to `console` (reasoning dimmed).
    Returns the collected result and whether it was stopped with Ctrl-C."""
    request: dict[str, Any] = {"model": model, "messages": messages}
    if options.temperature is not None:
        request["temperature"] = options.temperature
    if options.max_tokens is not None:
        request["max_tokens"] = options.max_tokens
    collector = Collector()
    events = stream_chat(client, **request)
    in_reasoning = False
    try:
        for event in events:
            collector.add(event)
            if isinstance(event, ReasoningDelta) and console is not None:
                if not in_reasoning:
                    console.print("thinking: ", style="dim italic", end="")
                    in_reasoning = True
                console.print(event.text, style="dim", end="", markup=False, highlight=False)
            elif isinstance(event, ContentDelta):
                if in_reasoning and console is not None:
                    console.print()
                    in_reasoning = False
                if console is not None:
                    console.print(event.text, end="", markup=False, highlight=False)
                else:
                    out.write(event.text)
                    out.flush()
    except KeyboardInterrupt:
        events.close()  # closes the connection: the server aborts the request
        return _first(collector), True
    return _first(collector), False


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
    try:
        result, stopped = answer(client, model, messages, options, out, console)
    except openai.APIError as exc:
        raise ChatError(explain(exc, options)) from None
    out.write("\n")
    return 130 if stopped else (0 if result.finish_reason is not None else 1)


def interactive(options: ChatOptions, read: Any = input) -> int:
    console = Console()
    client, model = connect(options)
    console.print(f"[bold]rillm chat[/bold] · {model} at {options.base_url} · /help for help")
    system = options.system
    history: list[dict[str, str]] = []
    while True:
        try:
            text = read_message(read)
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print("\n(Ctrl-D or /exit to quit)")
            continue
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            console.print(HELP)
            continue
        if command == "/reset":
            history.clear()
            console.print("(conversation cleared)", style="dim")
            continue
        if command == "/system":
            system = rest.strip() or None
            console.print(f"(system message {'set' if system else 'cleared'})", style="dim")
            continue
        if command == "/save":
            save(rest.strip(), system, history, console)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            result, stopped = answer(client, model, messages, options, sys.stdout, console)
        except openai.APIError as exc:
            history.pop()
            console.print(f"\nerror: {explain(exc, options)}", style="red")
            continue
        console.print()
        if stopped:
            console.print("(stopped)", style="dim")
        if result.text:
            history.append({"role": "assistant", "content": result.text})
        else:
            history.pop()
        console.print(stats_line(result), style="dim")


def read_message(read: Any) -> str:
    """One message; a line ending in a backslash continues on the next."""
    lines = []
    line = read("> ")
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("… ")
    lines.append(line)
    return "\n".join(lines)


def save(path: str, system: str | None, history: list[dict[str, str]],
         console: Console) -> None:
    if not path:
        console.print("usage: /save FILE", style="red")
        return
    messages = ([{"role": "system", "content": system}] if system else []) + history
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"messages": messages}, f, ensure_ascii=False, indent=2)
    except OSError as exc:
        console.print(f"cannot save: {exc}", style="red")
        return
    console.print(f"(saved {len(messages)} messages to {path})", style="dim")
