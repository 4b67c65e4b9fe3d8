"""The OpenAI-compatible API, through the official `openai` client against a listening server."""

from __future__ import annotations

import dataclasses
import json

import openai
import pytest
import torch

# Every test here runs against the in-process Engine, also with async scheduling.
pytestmark = pytest.mark.parametrize("engine_mode", ["in_process", "async"], indirect=True)


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
        await oai.completions.create(model="tiny-char", prompt="x", presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"


async def test_models_cards_carry_the_fields_clients_read(client, tiny_checkpoint):
    body = await (await client.get("/v1/models")).json()
    [card] = body["data"]
    assert card["max_model_len"] == 128 and card["parent"] is None and card["owned_by"] == "nanogpt-k8s"
    assert card["root"] == str(tiny_checkpoint) and isinstance(card["created"], int)


async def test_served_model_name_and_aliases(make_client, config):
    client = await make_client(dataclasses.replace(config, served_model_name=("team/char", "char")))
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    try:
        assert [m.id for m in (await api.models.list()).data] == ["team/char", "char"]
        for name in ("team/char", "char"):
            c = await api.completions.create(model=name, prompt="ab", max_tokens=2, temperature=0)
            assert c.model == name
        with pytest.raises(openai.NotFoundError) as e:
            await api.completions.create(model="tiny-char", prompt="ab", max_tokens=2)  # the checkpoint's own name
        assert e.value.body["param"] == "model"
        health = await (await client.get("/health")).json()
        assert health["model"] == "team/char"
    finally:
        await api.close()


async def test_n_choices_are_independent_and_seeded_ones_reproducible(oai):
    kwargs = dict(model="tiny-char", prompt=["ab", "cd"], max_tokens=12, temperature=1.0, n=3, seed=11)
    first = await oai.completions.create(**kwargs)
    again = await oai.completions.create(**kwargs)
    assert [c.index for c in first.choices] == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices[:3]}) == 3  # three samples, not one thrice
    single = await oai.completions.create(model="tiny-char", prompt="ab", max_tokens=12, temperature=1.0, seed=11)
    assert single.choices[0].text == first.choices[0].text  # sample 0 keeps the request's seed
    assert first.usage.completion_tokens == 6 * 12 and first.usage.prompt_tokens == 4


async def test_n_and_best_of_limits(oai, client):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.completions.create(model="tiny-char", prompt="ab", max_tokens=2, n=17)
    assert e.value.body["param"] == "n"
    resp = await client.post("/v1/completions", json={"prompt": "ab", "n": 2, "best_of": 3})
    assert resp.status == 422 and (await resp.json())["error"]["param"] == "best_of"
    ok = await client.post("/v1/completions", json={"prompt": "ab", "n": 2, "best_of": 2, "max_tokens": 1})
    assert ok.status == 200


async def test_echo_logprobs_are_the_prompts_own(oai, tiny_model):
    """lm-eval's loglikelihood request: token ids, echo, max_tokens 1 (or 0), logprobs, temperature 0."""
    ids = tiny_model.tokenizer.encode("ROMEO: wherefore")
    c = await oai.completions.create(model="tiny-char", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                     logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        logits, _ = tiny_model(torch.tensor([ids]))
    ref = torch.log_softmax(logits[0].float(), dim=-1)
    for p in range(1, len(ids)):
        assert abs(lp.token_logprobs[p] - ref[p - 1, ids[p]].item()) < 1e-4
        token = lp.tokens[p]
        assert lp.top_logprobs[p][token] == lp.token_logprobs[p] and len(lp.top_logprobs[p]) in (2, 3)
    assert lp.text_offset == list(range(len(ids) + 1))  # one character per token
    assert abs(lp.token_logprobs[-1] - ref[-1].max().item()) < 1e-4  # greedy: the generated token is the top one
    zero = await oai.completions.create(model="tiny-char", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert zero.choices[0].text == "ROMEO: wherefore" and zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]


async def test_logprobs_without_echo_and_with_stop(oai):
    c = await oai.completions.create(model="tiny-char", prompt="xy", max_tokens=8, temperature=1.0, seed=5,
                                     logprobs=1)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs)
    stop = c.choices[0].text[3]
    cut = await oai.completions.create(model="tiny-char", prompt="xy", max_tokens=8, temperature=1.0, seed=5,
                                       logprobs=1, stop=[stop])
    assert "".join(cut.choices[0].logprobs.tokens) == cut.choices[0].text == c.choices[0].text[:3]


async def test_logprobs_limits(client):
    for body, field in (({"prompt": "a", "logprobs": 21}, "logprobs"), ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "a", "logprobs": 1, "stream": True, "max_tokens": 0}, "max_tokens")):
        resp = await client.post("/v1/completions", json=body)
        assert resp.status in (400, 422) and (await resp.json())["error"]["param"] == field, body


async def streamed(stream) -> tuple[dict, dict, object]:
    """A completions stream gathered per choice index: (text, logprobs lists end to end), finish_reason, usage."""
    out, reasons, usage = {}, {}, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            text, lp = out.setdefault(ch.index, ["", {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                       "text_offset": []}])
            out[ch.index][0] = text + ch.text
            for key in lp if ch.logprobs is not None else ():
                lp[key] += getattr(ch.logprobs, key)
            assert ch.index not in reasons, "a chunk after the choice's finish_reason"
            if ch.finish_reason is not None:
                reasons[ch.index] = ch.finish_reason
    return out, reasons, usage


def as_lists(lp) -> dict:
    return {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "top_logprobs": lp.top_logprobs,
            "text_offset": lp.text_offset}


@pytest.mark.parametrize("kwargs", [
    dict(prompt="xy", max_tokens=8, temperature=1.0, seed=5, logprobs=2),
    dict(prompt="ROMEO: where", max_tokens=5, temperature=0, echo=True, logprobs=1),
    dict(prompt="ROMEO: where", max_tokens=0, echo=True, logprobs=3),
    dict(prompt="xy", max_tokens=8, temperature=1.0, seed=5, logprobs=1, stop=["e", "a", "o"]),
])
async def test_streamed_logprobs_put_together_equal_the_json_response(oai, kwargs):
    """Each chunk carries the logprobs of its own text (offsets into the whole choice); with echo the
    prompt's come first; put end to end they are the non-streamed response's."""
    whole = await oai.completions.create(model="tiny-char", **kwargs)
    out, reasons, usage = await streamed(await oai.completions.create(
        model="tiny-char", stream=True, stream_options={"include_usage": True}, **kwargs))
    text, lp = out[0]
    assert text == whole.choices[0].text and reasons[0] == whole.choices[0].finish_reason
    assert lp == as_lists(whole.choices[0].logprobs) and lp["tokens"]
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_streamed_chunks_carry_their_own_tokens_logprobs(client):
    resp = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 6, "temperature": 0,
                                                      "logprobs": 2, "stream": True})
    events = [json.loads(ln[6:]) for ln in (await resp.text()).splitlines() if ln.startswith("data: {")]
    for e in events:
        ch = e["choices"][0]
        if ch["text"]:
            assert "".join(ch["logprobs"]["tokens"]) == ch["text"]  # one character per token
            assert all(len(top) in (2, 3) for top in ch["logprobs"]["top_logprobs"])


async def test_n_streamed_choices_each_with_index_and_finish_reason(oai):
    kwargs = dict(model="tiny-char", prompt=["ab", "cd"], max_tokens=10, temperature=1.0, n=3, seed=11)
    whole = await oai.completions.create(**kwargs)
    out, reasons, usage = await streamed(await oai.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert sorted(out) == list(range(6)) == sorted(reasons)
    assert [out[i][0] for i in range(6)] == [c.text for c in whole.choices]  # same seeds, same choices
    assert [reasons[i] for i in range(6)] == [c.finish_reason for c in whole.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
