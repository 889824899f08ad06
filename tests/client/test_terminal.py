"""rillm chat's settings and saved conversations: what /set and /load accept and refuse."""

from __future__ import annotations

import json

import pytest

from rillm.client.terminal import Conversation, Settings


def test_set_changes_what_the_next_request_carries():
    settings = Settings(max_tokens=8)
    assert settings.set("temperature", "0.3") == "temperature = 0.3"
    assert settings.set("think", "off") == "think = off"
    assert settings.request() == {"temperature": 0.3, "max_tokens": 8, "extra_body": {
        "chat_template_kwargs": {"enable_thinking": False}}}
    settings.set("temperature", "")  # unset: the server's default again
    settings.set("system", "Be brief.  ")
    assert "temperature" not in settings.request() and settings.system == "Be brief."
    assert "temperature: (server default)" in settings.lines()


@pytest.mark.parametrize("name, value", [("temperature", "hot"), ("max_tokens", "1.5"),
                                         ("think", "maybe"), ("colour", "red")])
def test_set_refuses_what_it_cannot_read(name, value):
    with pytest.raises(ValueError):
        Settings().set(name, value)


def test_save_then_load_restores_the_conversation(tmp_path):
    conversation = Conversation([{"role": "user", "content": "Hi\nthere"},
                                 {"role": "assistant", "content": "Hello"}])
    path = tmp_path / "chat.json"
    assert conversation.save(str(path), "Be brief.") == 3
    restored = Conversation()
    assert restored.load(str(path)) == "Be brief."
    assert restored.messages == conversation.messages


@pytest.mark.parametrize("content", ['{"messages": [{"role": "wizard", "content": "x"}]}',
                                     '{"messages": "no"}', "[1, 2]"])
def test_load_refuses_what_is_not_a_saved_conversation(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    conversation = Conversation([{"role": "user", "content": "kept"}])
    with pytest.raises(ValueError):
        conversation.load(str(path))
    assert conversation.messages == [{"role": "user", "content": "kept"}]


def test_load_of_a_file_that_is_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        Conversation().load(str(path))
