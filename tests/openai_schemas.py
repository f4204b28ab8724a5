"""Structured output over a suite of JSON schemas (tests/fixtures/schemas/
suite.json: nested objects, arrays, enums, anyOf/oneOf/allOf, $ref,
string formats and patterns, numbers with bounds), asked for through the
official `openai` client's `response_format` on a live `ruvllm serve`;
every output must parse and validate with the `jsonschema` package
(formats checked too).

Run by tests/structured.rs with OPENAI_BASE_URL pointing at the server.
Prints one line per schema and a summary; exits non-zero on any invalid
output or any output cut off by max_tokens.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

# Without these, jsonschema skips the hostname, uri and date-time formats
# silently (make pydeps installs them).
import fqdn  # noqa: F401
import rfc3339_validator  # noqa: F401
import rfc3987  # noqa: F401

client = openai.OpenAI()
model = client.models.list().data[0].id
suite = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "schemas", "suite.json")))
# The 2020-12 checker: a bare FormatChecker() mixes in draft 3's "time".
checker = jsonschema.Draft202012Validator.FORMAT_CHECKER


def create(name, case):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": case["prompt"] + " Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": case["schema"], "strict": True}},
        max_tokens=400,
        temperature=0.7,
        seed=1,
    )


def one(item):
    name, case = item
    try:
        r = create(name, case)
    except openai.BadRequestError as e:
        return name, f"refused: {e.body['message']}"
    c = r.choices[0]
    if c.finish_reason != "stop":
        return name, f"finish_reason {c.finish_reason}: {c.message.content!r}"
    try:
        v = json.loads(c.message.content)
        jsonschema.validate(v, case["schema"], format_checker=checker)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        return name, f"invalid: {e}; output {c.message.content!r}"
    return name, None


with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(one, suite.items()))
bad = [(n, why) for n, why in results if why]
for n, why in results:
    print(f"{n}: {'ok' if why is None else why}")
print(f"{len(results) - len(bad)} of {len(results)} schemas: valid output")
sys.exit(1 if bad else 0)
