"""LLM: the offline Python API, shaped like vLLM's.

    from rillm import LLM, SamplingParams
    llm = LLM()                                   # the default model
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outputs[0].outputs[0].text)

Every prompt is submitted at once and the engine batches them; results come back in the
order of the prompts, each with the whole text of every choice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.outputs import RequestOutput, merge_all
from rillm.sampling_params import SamplingParams

Prompt = str | Sequence[int] | Mapping[str, Any]
"""Text, token ids, or {"prompt": text} / {"prompt_token_ids": ids}."""

Message = Mapping[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        device: str = "cpu",
        seed: int = 0,
        config: EngineConfig | None = None,
        **engine_options: Any,
    ) -> None:
        """The engine's options as keywords (EngineConfig's fields), or a whole `config`."""
        if config is None:
            config = EngineConfig(model=model, dtype=dtype, max_model_len=max_model_len,
                                  device=device, seed=seed, **engine_options)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at exit)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (None where it has none)."""
        return self.engine.chat_template

    def stream(self, prompt_token_ids: Sequence[int],
               sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """One prompt's deltas as the engine makes them; leaving the loop early (or an
        exception in it, KeyboardInterrupt too) aborts the request. Raises ValueError for a
        request the model cannot take."""
        request_id = f"offline-{next(self._ids)}"
        self.engine.add_request(request_id, list(prompt_token_ids),
                                sampling_params or SamplingParams())
        try:
            while self.engine.has_unfinished_requests():
                yield from self.engine.step()
        finally:
            self.engine.abort_request(request_id)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        batch = cast(
            "list[Prompt]", [prompts] if _is_single_prompt(prompts) else list(prompts)  # type: ignore[arg-type]
        )
        encoded = [self._encode(p) for p in batch]
        return self._run(encoded, sampling_params)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them."""
        conversations = (
            [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        )
        encoded: list[tuple[str | None, list[int]]] = []
        for conversation in conversations:
            text = self.engine.tokenizer.apply_chat_template(
                [dict(m) for m in conversation],  # type: ignore[union-attr, arg-type]
                chat_template=chat_template or self.engine.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
            # The template already wrote the special tokens it wants.
            ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
            encoded.append((str(text), list(ids)))
        return self._run(encoded, sampling_params)

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self._encode(str(prompt["prompt"]))
        return None, list(prompt)

    def _run(
        self,
        encoded: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(encoded)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(encoded):
                raise ValueError("sampling_params must be one value or one per prompt")
        ids = []
        try:
            for (text, token_ids), params in zip(encoded, params_list, strict=True):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, token_ids, params, prompt=text)
                ids.append(request_id)
            deltas: dict[str, list[RequestOutput]] = {}
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    deltas.setdefault(delta.request_id, []).append(delta)
            results = {request_id: merge_all(d) for request_id, d in deltas.items()}
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return [results[i] for i in ids]


def _is_single_prompt(prompts: object) -> bool:
    if isinstance(prompts, str | Mapping):
        return True
    return isinstance(prompts, Sequence) and bool(prompts) and isinstance(prompts[0], int)
