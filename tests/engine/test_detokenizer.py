"""IncrementalDetokenizer against the default model's real byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models

from rillm.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from rillm.sampling_params import SamplingParams

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog.\n\nIt's 3:45 p.m.; «quoted» — dashes…",
    "emoji": "Great job 🤗👍🏽! Family: 👨‍👩‍👧, flags 🇫🇷🇯🇵, and ❤️‍🔥 at the end 🎉",
    "cjk": "日本語のテキスト、中文文本和한국어 텍스트가 섞여 있습니다。",
    "accents": "naïve café in Zürich, crème brûlée, São Paulo, Ångström, ŁÓDŹ, Ελληνικά, русский",
    "code": (
        "def fib(n: int) -> int:\n"
        "\tif n < 2:\n"
        "\t\treturn n  # base case\n"
        "    return fib(n - 1) + fib(n - 2)\n\n"
        "print({'a': [1, 2, 3]}, end='\\n')\r\n"
    ),
    "mixed": 'x = "héllo 世界 🌍"\n  \n\n\t∑ᵢ xᵢ² ≤ ∞ — done ✅',
}
ALL_TEXT = "\n".join(TEXTS.values()) * 4  # a long stream, about 1,500 tokens


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def feed(detok: IncrementalDetokenizer, ids: list[int], group: int = 1) -> list[DetokenizerDelta]:
    """Feed `ids` `group` at a time; the last update says the request finished."""
    deltas = []
    for start in range(0, len(ids), group):
        last = start + group >= len(ids)
        deltas.append(detok.update(ids[start : start + group], finished=last))
        if deltas[-1].stop_string is not None:
            break
    return deltas


def make(tokenizer, prompt: str = "", **params) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), SamplingParams(**params))


@pytest.mark.parametrize("group", [1, 2, 3, 7, 10_000])
@pytest.mark.parametrize("name", [*TEXTS, "all"])
def test_deltas_concatenate_to_full_decode(smollm_tokenizer, name, group):
    text = ALL_TEXT if name == "all" else TEXTS[name]
    ids = encode(smollm_tokenizer, text)
    detok = make(smollm_tokenizer, prompt="<|im_start|>assistant\n")

    deltas = feed(detok, ids, group)

    joined = "".join(d.text for d in deltas)
    assert joined == smollm_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.output_text == joined
    assert all(d.stop_string is None for d in deltas)


def test_valid_text_never_yields_a_replacement_char(smollm_tokenizer):
    ids = encode(smollm_tokenizer, ALL_TEXT)
    detok = make(smollm_tokenizer)

    deltas = [detok.update([token_id]) for token_id in ids]

    assert not any("\ufffd" in d.text for d in deltas)
    # Multi-byte characters really were split across tokens, so the check means something.
    assert any("\ufffd" in t for t in token_texts(smollm_tokenizer, ids))


def test_emoji_split_across_tokens_comes_out_whole(smollm_tokenizer):
    ids = encode(smollm_tokenizer, " 🤗")
    assert len(ids) == 3  # " \xf0\x9f", "\xa4", "\x97"
    detok = make(smollm_tokenizer)

    assert [detok.update([i]).text for i in ids] == ["", "", " 🤗"]


def test_text_is_emitted_as_soon_as_it_cannot_start_a_stop_string(smollm_tokenizer):
    stops = ("\n\n", "return 0", "🎉!")
    ids = encode(smollm_tokenizer, ALL_TEXT.replace("\n\n", "\n"))
    detok = make(smollm_tokenizer, stop=stops)

    decoded = ""
    for n in range(1, len(ids) + 1):
        delta = detok.update(ids[n - 1 : n])
        assert delta.stop_string is None
        if not smollm_tokenizer.decode(ids[:n]).endswith("\ufffd"):  # not mid-character
            decoded = smollm_tokenizer.decode(ids[:n])
        expected = decoded
        for k in range(1, len(decoded) + 1):  # minus the longest tail that may start a stop
            if any(s.startswith(decoded[-k:]) and len(s) > k for s in stops):
                expected = decoded[:-k]
        assert detok.output_text == expected


def test_stop_string_inside_one_token_cuts_that_token(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "Hello world again")
    assert token_texts(smollm_tokenizer, ids) == ["Hello", " world", " again"]
    detok = make(smollm_tokenizer, stop="orl")

    deltas = [detok.update([i]) for i in ids[:2]]

    assert [d.text for d in deltas] == ["Hell", "o w"]  # the "o" waited: it could start "orl"
    assert [d.stop_string for d in deltas] == [None, "orl"]
    assert detok.output_text == "Hello w"


def test_stop_string_split_across_three_tokens(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "The quick brown fox jumps")
    assert token_texts(smollm_tokenizer, ids)[1:4] == [" quick", " brown", " fox"]
    detok = make(smollm_tokenizer, stop="ick brown f")

    deltas = [detok.update([i]) for i in ids[:4]]

    assert [d.text for d in deltas] == ["The", " qu", "", ""]
    assert [d.stop_string for d in deltas] == [None, None, None, "ick brown f"]
    assert detok.output_text == "The qu"


@pytest.mark.parametrize("group", [1, 5])
def test_earliest_stop_string_wins(smollm_tokenizer, group):
    ids = encode(smollm_tokenizer, "The quick brown fox jumps")
    detok = make(smollm_tokenizer, stop=["fox", "quick", "jumps"])

    deltas = feed(detok, ids, group)

    assert deltas[-1].stop_string == "quick"
    assert detok.output_text == "The "


def test_stop_string_completed_first_wins_over_one_starting_earlier(smollm_tokenizer):
    # Token by token, "brown" is complete before "quick brown fox" is: grouping must not matter.
    ids = encode(smollm_tokenizer, "The quick brown fox jumps")
    for group in (1, len(ids)):
        detok = make(smollm_tokenizer, stop=["quick brown fox", "brown"])
        assert feed(detok, ids, group)[-1].stop_string == "brown"
        assert detok.output_text == "The quick "


def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "The quick brown fox jumps")
    detok = make(smollm_tokenizer, stop="ick bro", include_stop_str_in_output=True)

    deltas = feed(detok, ids)

    assert deltas[-1].stop_string == "ick bro"
    assert detok.output_text == "The quick bro"  # not the "wn" of the completing token


def test_held_back_text_is_released_when_it_is_not_a_stop_string(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "ab d")
    assert token_texts(smollm_tokenizer, ids) == ["ab", " d"]
    detok = make(smollm_tokenizer, stop="ab c")

    deltas = [detok.update([i]) for i in ids]

    assert [(d.text, d.stop_string) for d in deltas] == [("", None), ("ab d", None)]


def test_finished_flushes_held_back_text(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "Hello world")
    detok = make(smollm_tokenizer, stop="world peace")

    assert detok.update(ids[:1]).text == "Hello"
    assert detok.update(ids[1:]).text == " "  # "world" may still become "world peace"
    assert detok.update([], finished=True) == DetokenizerDelta("world", None)
    assert detok.output_text == "Hello world"


def test_finished_flushes_an_unfinished_character_like_a_full_decode(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "ok 🤗")[:-1]  # the emoji's last byte never comes
    detok = make(smollm_tokenizer)

    deltas = [detok.update([i]) for i in ids[:-1]]
    deltas.append(detok.update(ids[-1:], finished=True))

    assert "".join(d.text for d in deltas) == smollm_tokenizer.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(smollm_tokenizer, skip):
    im_end = smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*encode(smollm_tokenizer, "Hi there 🤗"), im_end, *encode(smollm_tokenizer, " more")]
    detok = make(smollm_tokenizer, skip_special_tokens=skip)

    feed(detok, ids)

    expected = "Hi there 🤗<|im_end|> more" if not skip else "Hi there 🤗 more"
    assert detok.output_text == smollm_tokenizer.decode(ids, skip_special_tokens=skip) == expected


def test_special_token_can_be_a_stop_string(smollm_tokenizer):
    im_end = smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*encode(smollm_tokenizer, "Hi"), im_end, *encode(smollm_tokenizer, " more")]
    detok = make(smollm_tokenizer, skip_special_tokens=False, stop="<|im_end|>")

    assert feed(detok, ids)[-1].stop_string == "<|im_end|>"
    assert detok.output_text == "Hi"


def test_stop_string_in_the_prompt_does_not_trigger(smollm_tokenizer):
    prompt = "Say STOP now, then ST"
    detok = make(smollm_tokenizer, prompt=prompt, stop="STOP")
    ids = encode(smollm_tokenizer, "OP ok then")  # completes "STOP" only with the prompt

    deltas = feed(detok, ids)

    assert all(d.stop_string is None for d in deltas)
    assert detok.output_text == "OP ok then"


def test_grouping_of_tokens_does_not_change_the_result(smollm_tokenizer):
    ids = encode(smollm_tokenizer, ALL_TEXT)
    # "(n - 1)" starts after "return fib(n - 1) + f" but is complete first.
    stops = ("return fib(n - 1) + f", "(n - 1)", '🌍"\n  \n', "zz")
    rng = random.Random(0)
    results = set()
    for _ in range(20):
        detok = make(smollm_tokenizer, stop=stops)
        start = 0
        while start < len(ids):
            size = rng.randint(1, 12)
            delta = detok.update(ids[start : start + size], finished=start + size >= len(ids))
            start += size
            if delta.stop_string:
                break
        results.add((detok.output_text, delta.stop_string))

    expected = ALL_TEXT[: ALL_TEXT.index("(n - 1)")]
    assert results == {(expected, "(n - 1)")}


def test_updates_after_a_stop_string_yield_nothing(smollm_tokenizer):
    ids = encode(smollm_tokenizer, "The quick brown fox jumps")
    detok = make(smollm_tokenizer, stop="quick")

    feed(detok, ids[:2])

    assert detok.update(ids[2:]) == DetokenizerDelta("", None)
    assert detok.update([], finished=True) == DetokenizerDelta("", None)
    assert detok.output_text == "The "


def test_prompt_context_keeps_the_first_tokens_leading_space():
    # A sentencepiece-style decoder drops the space of the first token it decodes; decoded after
    # the prompt, the output's first word keeps it, as in decode(prompt + output).
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams())

    deltas = feed(detok, [2, 3])

    assert [d.text for d in deltas] == [" world", "!"]
    assert tokenizer.decode([1, 2, 3]) == "Hello" + detok.output_text


def test_a_tokenizer_without_a_fast_backend_is_refused():
    with pytest.raises(TypeError, match="fast tokenizer"):
        IncrementalDetokenizer(object(), [], SamplingParams())  # type: ignore[arg-type]
