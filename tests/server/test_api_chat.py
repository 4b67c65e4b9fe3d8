"""/v1/chat/completions through the official `openai` client; the chat template (default and a file)."""

from __future__ import annotations

import dataclasses

import openai
import pytest

from server.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from server.config import ConfigError
from server.errors import BadRequest

MESSAGES = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Speak."}]


def test_default_template_is_a_plain_transcript():
    t = ChatTemplate.load(None)
    text = t.render(MESSAGES + [{"role": "assistant", "content": "I will."}, {"role": "user", "content": "Now."}])
    assert text == "A play.\n\nUser: Speak.\n\nAssistant: I will.\n\nUser: Now.\n\nAssistant:"
    assert t.render(MESSAGES, add_generation_prompt=False) == "A play.\n\nUser: Speak.\n\n"
    assert t.source == DEFAULT_TEMPLATE and "\nUser:" in t.stop


def test_template_file_errors_name_chat_template(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError) as e:
        ChatTemplate.load(str(bad))
    assert e.value.variable == "CHAT_TEMPLATE"
    refusing = tmp_path / "refuse.jinja"
    refusing.write_text("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(BadRequest) as e:
        ChatTemplate.load(str(refusing)).render(MESSAGES)
    assert e.value.field == "messages" and "first must be user" in e.value.message


def test_template_is_sandboxed(tmp_path):
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(BadRequest):
        ChatTemplate.load(str(evil)).render(MESSAGES)


async def test_chat_equals_a_completion_of_the_rendered_prompt(oai):
    chat = await oai.chat.completions.create(model="tiny-char", messages=MESSAGES, max_tokens=9, temperature=0.8,
                                             seed=4)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    prompt = ChatTemplate.load(None).render(MESSAGES)
    plain = await oai.completions.create(model="tiny-char", prompt=prompt, max_tokens=9, temperature=0.8, seed=4,
                                         stop=["\nUser:"])
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == len(prompt) and chat.usage.completion_tokens == plain.usage.completion_tokens


async def test_chat_stream_matches_json(oai):
    kwargs = dict(model="tiny-char", messages=MESSAGES, max_completion_tokens=10, temperature=0.7, seed=2)
    stream = await oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, roles, reasons, usage = [], [], [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    whole = await oai.chat.completions.create(**kwargs)
    assert roles[0] == "assistant" and "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens


async def test_chat_n_logprobs_and_stop(oai):
    c = await oai.chat.completions.create(model="tiny-char", messages=MESSAGES, max_tokens=6, temperature=1.0,
                                          seed=8, n=3, logprobs=True, top_logprobs=2)
    assert len(c.choices) == 3 and len({ch.message.content for ch in c.choices}) == 3
    for ch in c.choices:
        content = ch.logprobs.content
        assert "".join(t.token for t in content) == ch.message.content
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob for t in content)
        assert all(bytes(t.bytes).decode() == t.token for t in content)
    text = c.choices[0].message.content
    cut = await oai.chat.completions.create(model="tiny-char", messages=MESSAGES, max_tokens=6, temperature=1.0,
                                            seed=8, stop=[text[2]])
    assert cut.choices[0].message.content == text[:text.index(text[2])] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user"}], "messages[0].content"),
])
async def test_bad_messages_are_400_naming_the_field(client, messages, field):
    resp = await client.post("/v1/chat/completions", json={"messages": messages})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == field


async def test_tools_and_unknown_model_are_refused(client, oai):
    resp = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [{"type": "function"}]})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tools"
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def test_text_parts_and_a_template_file(make_client, config, tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    client = await make_client(dataclasses.replace(config, chat_template=str(path)))
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    tok = await (await client.post("/tokenize", json={"messages": parts, "return_token_strs": True})).json()
    assert "".join(tok["token_strs"]) == "<user>ab\n<assistant>"
    resp = await client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 3})
    assert resp.status == 200 and (await resp.json())["usage"]["prompt_tokens"] == tok["count"]


async def test_chat_stream_with_n_and_logprobs_equals_json(oai):
    """n=3 streamed: every choice opens with the role and ends with its finish_reason; each delta's
    logprobs.content are its own tokens', and put together they are the JSON response's."""
    kwargs = dict(model="tiny-char", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=8, n=3,
                  logprobs=True, top_logprobs=2)
    whole = await oai.chat.completions.create(**kwargs)
    stream = await oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, content, roles, reasons, usage = {}, {}, {}, {}, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            assert ch.index not in reasons
            roles.setdefault(ch.index, ch.delta.role)
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
            if ch.delta.content:
                assert "".join(t.token for t in ch.logprobs.content) == ch.delta.content  # one char per token
            content.setdefault(ch.index, []).extend(ch.logprobs.content if ch.logprobs else [])
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    for i, ch in enumerate(whole.choices):
        assert text[i] == ch.message.content and reasons[i] == ch.finish_reason
        assert [t.model_dump() for t in content[i]] == [t.model_dump() for t in ch.logprobs.content]
    assert usage.completion_tokens == whole.usage.completion_tokens
