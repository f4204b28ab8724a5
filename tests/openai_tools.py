"""Tool calling on a live `ruvllm serve`, driven by the official `openai`
client; arguments are validated with the `jsonschema` package.

Run by tests/structured.rs with OPENAI_BASE_URL pointing at the server.
"""

import json
import threading

import jsonschema
import openai

client = openai.OpenAI()
model = client.models.list().data[0].id

weather = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
convert = {
    "type": "object",
    "properties": {"amount": {"type": "number", "minimum": 0}, "to": {"type": "string", "maxLength": 3}},
    "required": ["amount", "to"],
    "additionalProperties": False,
}
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now", "parameters": weather}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Converts an amount of euros", "parameters": convert}},
]
schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
question = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def check_call(name, arguments):
    assert name in schemas, name
    jsonschema.validate(json.loads(arguments), schemas[name])


def streamed(**kw):
    """Content, tool calls (put together from their deltas) and the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert call["id"] is None, "a call's id comes once"
                call["id"] = d.id
            if d.function and d.function.name:
                call["name"] += d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
        finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


# Required: one or more calls of offered tools, each valid; streamed the
# same. A small model may list calls until max_tokens: the complete ones
# come back, with finish_reason "length".
r = client.chat.completions.create(model=model, messages=question, tools=tools, tool_choice="required", max_tokens=150, temperature=0)
m = r.choices[0].message
assert r.choices[0].finish_reason in ("tool_calls", "length"), r
assert m.tool_calls and m.content is None, m
for c in m.tool_calls:
    assert c.type == "function" and c.id.startswith("call_"), c
    check_call(c.function.name, c.function.arguments)
content, calls, finish = streamed(messages=question, tools=tools, tool_choice="required", max_tokens=150, temperature=0)
assert finish == r.choices[0].finish_reason and content == "", (content, finish)
assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
    (c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls
], (calls, m.tool_calls)

# Schemas with references (as pydantic writes them) work when required.
refs = [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"guest": {"$ref": "#/$defs/Guest"}, "nights": {"type": "integer", "minimum": 1, "maximum": 30}},
    "required": ["guest", "nights"], "additionalProperties": False,
    "$defs": {"Guest": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"], "additionalProperties": False}},
}}}]
for choice in ("required", {"type": "function", "function": {"name": "book"}}):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Book two nights for Ann."}], tools=refs,
        tool_choice=choice, parallel_tool_calls=False, max_tokens=100, temperature=0,
    )
    assert r.choices[0].finish_reason in ("tool_calls", "stop"), r
    args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
    jsonschema.validate(args, refs[0]["function"]["parameters"])

# Without parallel calls, exactly one; sampled, with several choices.
r = client.chat.completions.create(
    model=model, messages=question, tools=tools, tool_choice="required", parallel_tool_calls=False,
    max_tokens=150, temperature=1.0, seed=5, n=3,
)
for ch in r.choices:
    if ch.finish_reason == "length":
        continue
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
    check_call(ch.message.tool_calls[0].function.name, ch.message.tool_calls[0].function.arguments)

# A named function: its arguments, streamed as they are generated.
named = {"type": "function", "function": {"name": "convert_currency"}}
content, calls, finish = streamed(
    messages=[{"role": "user", "content": "How much is 20 euros in dollars?"}],
    tools=tools, tool_choice=named, max_tokens=100, temperature=0,
)
# A named function's call ends with "stop", as OpenAI reports it.
assert finish == "stop" and len(calls) == 1 and content == "", (content, calls, finish)
assert calls[0]["name"] == "convert_currency" and calls[0]["id"], calls
check_call("convert_currency", calls[0]["arguments"])

# The round trip: the call and its result go back through the template;
# the model answers in text (auto, the tools still offered).
call = m.tool_calls[0]
history = question + [
    m.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})},
]
r = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=40, temperature=0)
assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r
longer = r.usage.prompt_tokens
r = client.chat.completions.create(model=model, messages=question, tools=tools, max_tokens=1, temperature=0)
assert longer > r.usage.prompt_tokens + 10, (longer, r.usage)
content, calls, finish = streamed(messages=history, tools=tools, max_tokens=40, temperature=0)
assert finish in ("stop", "length", "tool_calls"), finish

# Auto: the model's own Hermes syntax (forced here by a regex, as a small
# model rarely calls on its own) is parsed out and never leaks as text.
forced = r'Checking\. <tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}"\}\}\n</tool_call>'
for stream in (False, True):
    kw = dict(messages=question, tools=tools, max_tokens=80, temperature=0, extra_body={"guided_regex": forced})
    if stream:
        content, calls, finish = streamed(**kw)
    else:
        r = client.chat.completions.create(model=model, **kw)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in r.choices[0].message.tool_calls or []]
    assert finish == "tool_calls", (stream, content, calls, finish)
    assert content == "Checking. ", (stream, content)
    assert len(calls) == 1 and calls[0]["name"] == "get_weather", calls
    check_call("get_weather", calls[0]["arguments"])

# tool_choice "none": the tools stay out of the prompt and the output is
# text, even when it is written in call syntax.
plain = client.chat.completions.create(model=model, messages=question, max_tokens=1, temperature=0)
r = client.chat.completions.create(
    model=model, messages=question, tools=tools, tool_choice="none", max_tokens=80, temperature=0,
    extra_body={"guided_regex": forced},
)
assert r.usage.prompt_tokens == plain.usage.prompt_tokens, (r.usage, plain.usage)
assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content, r
assert r.choices[0].finish_reason == "stop", r

# Mistakes are 400s naming the field.
bad_requests = [
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools"),
    (dict(tools=[{"type": "function"}]), "tools"),
    (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=tools, tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=tools, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
]
for kw, param in bad_requests:
    try:
        client.chat.completions.create(model=model, messages=question, max_tokens=4, **kw)
        raise AssertionError(f"accepted: {kw}")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, (kw, e.body)

# Hostile schemas in forced calls are refused while another stream flows.
flowing = {}


def long_stream():
    flowing["result"] = streamed(
        messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        max_tokens=200, temperature=0, extra_body={"ignore_eos": True},
    )


t = threading.Thread(target=long_stream)
t.start()
deep = {"type": "object"}
for _ in range(40):
    deep = {"type": "object", "properties": {"a": deep}}
hostile = [
    deep,
    {"type": "object", "properties": {"x": {"enum": [f"value-{i}" for i in range(30000)]}}},
    {"type": "object", "properties": {"x": {"type": "strnig"}}},
    {"type": "object", "properties": {"x": {"type": "string", "pattern": "(a"}}},
]
for schema in hostile:
    bad = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    try:
        client.chat.completions.create(model=model, messages=question, tools=bad, tool_choice="required", max_tokens=8)
        raise AssertionError(f"accepted: {json.dumps(schema)[:200]}")
    except openai.BadRequestError:
        pass
t.join()
content, _, finish = flowing["result"]
assert finish == "length" and len(content) > 200, (finish, content)
print("tool calling checks passed")
