"""The official Python SDKs against our services, run by tests/clients.rs.

- The `openai` SDK against chat-stream's OpenAI-compatible route: streamed
  and whole answers reassemble the text `/chat` gives for the same request;
  an unsupported parameter is the BadRequestError the SDK raises; a wrong
  key is an AuthenticationError; the models list; the stream id header.
- The `anthropic` and `openai` SDKs against model-sim itself, with both
  ways the Messages API takes a key (`x-api-key`, `Authorization: Bearer`).

Environment (set by tests/clients.rs): CHAT_URL (chat-stream's root),
CHAT_KEY (an API key it accepts), SIM_URL, SIM_KEY.
"""

import json
import os
import urllib.request

import anthropic
import openai
import pytest

CHAT_URL = os.environ["CHAT_URL"].rstrip("/")
CHAT_KEY = os.environ["CHAT_KEY"]
SIM_URL = os.environ["SIM_URL"].rstrip("/")
SIM_KEY = os.environ["SIM_KEY"]
MODEL = "sim-sdk"


@pytest.fixture
def client():
    return openai.OpenAI(base_url=f"{CHAT_URL}/v1", api_key=CHAT_KEY, max_retries=0)


def chat_text(message, max_tokens, system=None):
    """The text POST /chat streams for the same request (read by hand)."""
    body = {"message": message, "model": MODEL, "max_tokens": max_tokens}
    if system:
        body["system"] = system
    req = urllib.request.Request(
        f"{CHAT_URL}/chat",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {CHAT_KEY}"},
    )
    text, kinds = "", []
    with urllib.request.urlopen(req, timeout=20) as resp:
        for block in resp.read().decode().split("\n\n"):
            event = data = None
            for line in block.splitlines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
            if event:
                kinds.append(event)
            if event == "delta":
                text += data["text"]
    assert kinds[0] == "meta" and kinds[-1] == "done", kinds
    return text


def test_a_streamed_answer_is_the_text_chat_gives(client):
    expected = chat_text("what does a relay do?", 48, system="be brief")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what does a relay do?"},
        ],
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert len(parts) > 3, parts
    assert "".join(parts) == expected
    assert finish == ["stop"]
    assert usage is not None and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_whole_answer_is_the_text_chat_gives(client):
    expected = chat_text("and a cache?", 32)
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "and a cache?"}]}],
        max_completion_tokens=32,
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.model == MODEL


def test_the_stream_id_is_a_response_header(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "headers please"}],
        stream=True,
    )
    assert raw.headers["x-stream-id"]
    assert raw.headers["x-cache"] in ("miss", "hit", "follow", "bypass")
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text


def test_an_unsupported_parameter_is_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert e.value.status_code == 400
    assert e.value.param == "tools"
    assert e.value.code == "unsupported_parameter"
    assert "tools" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_object"},
        )
    assert e.value.param == "response_format"


def test_a_wrong_key_is_an_authentication_error():
    bad = openai.OpenAI(base_url=f"{CHAT_URL}/v1", api_key="ck_not_a_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_the_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids


# --- model-sim speaks what today's official SDKs send ------------------------


@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_the_anthropic_sdk_against_model_sim(how):
    if how == "x-api-key":
        sim = anthropic.Anthropic(base_url=SIM_URL, api_key=SIM_KEY, max_retries=0)
    else:
        sim = anthropic.Anthropic(base_url=SIM_URL, auth_token=SIM_KEY, max_retries=0)
    whole = sim.messages.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello sim"}]
    )
    assert whole.stop_reason == "end_turn"
    text = whole.content[0].text
    assert text
    with sim.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello sim"}]
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    wrong = anthropic.Anthropic(base_url=SIM_URL, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])


def test_the_openai_sdk_against_model_sim():
    sim = openai.OpenAI(base_url=f"{SIM_URL}/v1", api_key=SIM_KEY, max_retries=0)
    whole = sim.chat.completions.create(
        model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "hello sim"}]
    )
    text = whole.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in sim.chat.completions.create(
            model=MODEL,
            max_tokens=24,
            messages=[{"role": "user", "content": "hello sim"}],
            stream=True,
        )
        if c.choices
    )
    assert text and streamed == text
    # The same conversation gets the same words in either wire format.
    ant = anthropic.Anthropic(base_url=SIM_URL, api_key=SIM_KEY, max_retries=0)
    a = ant.messages.create(
        model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "hello sim"}]
    )
    assert a.content[0].text == text
