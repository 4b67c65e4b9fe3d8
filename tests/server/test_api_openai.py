"""The OpenAI-compatible API, through the official `openai` client against a listening server."""

from __future__ import annotations

import json

import openai
import pytest

# Every test here runs against the in-process Engine and the engine core in its own process.
pytestmark = pytest.mark.parametrize(
    "engine_mode", ["in_process", pytest.param("remote", marks=pytest.mark.slow)], indirect=True)


@pytest.fixture
async def oai(client):
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=30)
    yield api
    await api.close()


async def test_models_lists_the_served_model(oai):
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["tiny-char"]


async def test_completion_with_usage_and_finish_reason(oai):
    c = await oai.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=7, temperature=0)
    assert c.object == "text_completion" and c.model == "tiny-char"
    assert len(c.choices) == 1 and len(c.choices[0].text) == 7
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (6, 7, 13)


async def test_completion_matches_generate(client, oai):
    c = await oai.completions.create(model="tiny-char", prompt="abc", max_tokens=9, temperature=0.9, seed=42,
                                     top_p=0.9)
    g = await (await client.post("/generate", json={"prompt": "abc", "max_length": 9, "temperature": 0.9,
                                                    "seed": 42, "top_p": 0.9, "top_k": 0})).json()
    assert "abc" + c.choices[0].text == g["generated_text"]


async def test_completion_stop_gives_finish_reason_stop(oai):
    full = await oai.completions.create(model="tiny-char", prompt="xy", max_tokens=30, temperature=1.0, seed=5)
    text = full.choices[0].text
    cut = next(i for i in range(1, len(text)) if text[i] not in text[:i])
    c = await oai.completions.create(model="tiny-char", prompt="xy", max_tokens=30, temperature=1.0, seed=5,
                                     stop=[text[cut]])
    assert c.choices[0].text == text[:cut]
    assert c.choices[0].finish_reason == "stop"


async def test_streaming_ends_with_done_and_matches(oai, client):
    stream = await oai.completions.create(model="tiny-char", prompt="Hello", max_tokens=12, temperature=0.7,
                                          seed=9, stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            reasons.append(choice.finish_reason)
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == 12 and usage.prompt_tokens == 5
    plain = await oai.completions.create(model="tiny-char", prompt="Hello", max_tokens=12, temperature=0.7, seed=9)
    assert "".join(pieces) == plain.choices[0].text
    # the raw stream ends with OpenAI's sentinel
    resp = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True})
    lines = [ln for ln in (await resp.text()).splitlines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][len("data: "):])["object"] == "text_completion"


async def test_several_prompts_and_token_ids(oai):
    c = await oai.completions.create(model="tiny-char", prompt=["ab", "cd"], max_tokens=3, temperature=0)
    assert [ch.index for ch in c.choices] == [0, 1]
    ids = await oai.completions.create(model="tiny-char", prompt=[66, 67], max_tokens=3, temperature=0, echo=True)
    assert ids.choices[0].text.startswith("ab")  # ids 66, 67 are 'a', 'b' in the test vocabulary


async def test_openai_errors(oai):
    with pytest.raises(openai.NotFoundError) as e:
        await oai.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await oai.completions.create(model="tiny-char", prompt="x", max_tokens=100000)
    assert e.value.body["param"] == "max_tokens" and "1000" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        await oai.completions.create(model="tiny-char", prompt="x", n=2)
    assert e.value.body["param"] == "n"
