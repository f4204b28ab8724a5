"""Checks a live `ruvllm serve` with the official `openai` client.

Run by tests/server.rs with OPENAI_BASE_URL pointing at the server. Every
check is on content, not only on status codes.
"""

import json
import math
import os
import sys
import urllib.request

import openai

client = openai.OpenAI()
base = os.environ["OPENAI_BASE_URL"].removesuffix("/v1")


def raw(path, body):
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


# Models: one, with the context length.
models = client.models.list().data
assert len(models) == 1, models
model = models[0].id
assert model.startswith("SmolLM2"), model

# Completions: greedy continuation of a counting prompt.
c = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
text = c.choices[0].text
assert text.startswith(" 5, 6, 7"), repr(text)
assert c.choices[0].finish_reason == "length"
assert c.usage.completion_tokens == 12 and c.usage.prompt_tokens > 0, c.usage
assert c.usage.prompt_tokens_details.cached_tokens == 0, c.usage  # under one full block

# A repeated prompt of several KV blocks is served from the prefix cache.
long_prompt = "Counting: " + ", ".join(str(i) for i in range(1, 40)) + ","
first = client.completions.create(model=model, prompt=long_prompt, max_tokens=2, temperature=0)
again = client.completions.create(model=model, prompt=long_prompt, max_tokens=2, temperature=0)
assert first.usage.prompt_tokens_details.cached_tokens == 0, first.usage
blocks = (again.usage.prompt_tokens - 1) // 16 * 16
assert again.usage.prompt_tokens_details.cached_tokens == blocks > 0, again.usage

# Streaming gives the same text, token by token, then usage.
chunks = list(
    client.completions.create(
        model=model,
        prompt="1, 2, 3, 4,",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
assert streamed == text, (streamed, text)
assert chunks[-1].usage.completion_tokens == 12, chunks[-1]
assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

# Stop strings cut the text before them.
s = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7", "xyz"])
assert s.choices[0].text == " 5, 6,", repr(s.choices[0].text)
assert s.choices[0].finish_reason == "stop"

# Echo puts the prompt in front.
e = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=3, temperature=0, echo=True)
assert e.choices[0].text.startswith("1, 2, 3, 4, 5"), e.choices[0].text

# Chat: the model's template, and the same tokens as completing the rendered prompt.
messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
reply = chat.choices[0].message
assert reply.role == "assistant" and reply.content, reply
ids = raw("/tokenize", {"model": model, "messages": messages})["tokens"]
assert len(ids) == chat.usage.prompt_tokens, (len(ids), chat.usage)
same = client.completions.create(model=model, prompt=ids, max_tokens=16, temperature=0)
assert same.choices[0].text == reply.content, (same.choices[0].text, reply.content)

# Chat streaming: role first, then the same content.
parts = list(
    client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True)
)
assert parts[0].choices[0].delta.role == "assistant"
assert "".join(p.choices[0].delta.content or "" for p in parts) == reply.content
assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason, parts[-1]

# n = 2: greedy siblings agree with each other and with n = 1; seeded
# sampling is reproducible.
two = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0, n=2)
one = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0)
assert [c.index for c in two.choices] == [0, 1]
assert two.choices[0].text == two.choices[1].text == one.choices[0].text
assert two.usage.completion_tokens == 16
a = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=1.0, seed=7, n=2)
b = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=1.0, seed=7, n=2)
assert [c.text for c in a.choices] == [c.text for c in b.choices]

# Logprobs: the greedy token is the most likely one, probabilities are sane.
lp = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, logprobs=3).choices[0].logprobs
assert len(lp.tokens) == 6 and "".join(lp.tokens) == " 5, 6, 7"[: len("".join(lp.tokens))]
for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert len(top) == 3 and l <= 0.0
    assert math.isclose(max(top.values()), l, abs_tol=1e-5), (tok, l, top)
    assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-4
chat_lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
).choices[0].logprobs.content
assert len(chat_lp) == 4 and all(len(t.top_logprobs) == 2 for t in chat_lp)
assert all(t.logprob == t.top_logprobs[0].logprob for t in chat_lp)

# Embeddings: unit vectors of the hidden size, equal for equal input.
emb = client.embeddings.create(model=model, input=["hello world", "hello world", "a different text"]).data
assert [d.index for d in emb] == [0, 1, 2]
v0, v1, v2 = (d.embedding for d in emb)
assert len(v0) == 576
assert math.isclose(sum(x * x for x in v0), 1.0, rel_tol=1e-4)
assert v0 == v1 and v0 != v2
single = client.embeddings.create(model=model, input="hello world").data[0].embedding
assert max(abs(x - y) for x, y in zip(single, v0)) < 1e-6

# Errors come back as the client's exception types with a message.
try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    raise AssertionError("negative max_tokens was accepted")
except openai.BadRequestError as err:
    assert "max_tokens" in str(err), err
try:
    client.completions.create(model="no-such-model", prompt="x")
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    assert "no-such-model" in str(err) and err.code == "model_not_found", err

# Detokenize inverts tokenize.
toks = raw("/tokenize", {"model": model, "prompt": "Hello there, world!", "add_special_tokens": False})
assert toks["count"] == len(toks["tokens"]) and toks["max_model_len"] >= 1024
assert raw("/detokenize", {"model": model, "tokens": toks["tokens"]})["prompt"] == "Hello there, world!"

print("openai client: all checks passed")
sys.exit(0)
