//! Structured output: constrained decoding with llguidance. Every output of
//! a constrained request matches its constraint, whatever the sampling
//! settings, or ends at max_tokens with finish_reason "length"; a bad
//! constraint is a 400 naming the problem; the server keeps serving.

mod common;
use common::server::{post, run_python_check, start};
use common::*;
use ruvllm::constraint::Constraint;
use ruvllm::engine::Engine;
use ruvllm::request::{FinishReason, GenerationRequest, SeqEvent};
use ruvllm::sampling::SamplingParams;
use serde_json::{json, Value};

/// Runs `reqs` together; each one's text and finish reason (or error).
fn run(
    e: &mut Engine,
    reqs: Vec<GenerationRequest>,
) -> Vec<Result<(String, FinishReason), String>> {
    run_all(e, reqs)
        .into_iter()
        .map(|rx| {
            let mut text = String::new();
            loop {
                match rx.recv().unwrap() {
                    SeqEvent::Token(t) => text.push_str(&t.text),
                    SeqEvent::Finished(s) => return Ok((text, s.finish)),
                    SeqEvent::Failed(e) => return Err(e.to_string()),
                    _ => {}
                }
            }
        })
        .collect()
}

fn sampled(prompt: &[u32], seed: u64, c: Constraint, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        max_tokens,
        constraint: Some(c),
        stop: vec!["a".into(), "1".into()],
        ..Default::default()
    }
}

/// The tiny random-weight llama samples whatever its logits say: only the
/// constraint keeps it in line, in a batch with unconstrained requests.
#[test]
fn every_constrained_output_matches_in_a_mixed_batch() {
    // One thread leaves a core to compute the masks beside the forward
    // pass; two compute them before sampling: both paths run.
    for threads in [1, 2] {
        mixed_batch(threads);
    }
}

fn mixed_batch(threads: usize) {
    let dir = fixtures().join("llama");
    let mut e = engine(&dir, threads);
    let prompt = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let regex = "[0-9]{3}-[a-z]{2,4}";
    let re_ok = |s: &str| {
        let (d, l) = s.split_at(s.find('-').unwrap_or(0));
        d.len() == 3
            && d.bytes().all(|b| b.is_ascii_digit())
            && (3..=5).contains(&l.len())
            && l[1..].bytes().all(|b| b.is_ascii_lowercase())
    };
    let choices = vec!["alpha".to_string(), "beta".into(), "gamma delta".into()];
    let schema = json!({
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": false,
        // The random model pads with whitespace wherever it may: a
        // schema's own options turn that off.
        "x-guidance": {"whitespace_flexible": false}
    });
    let mut reqs = Vec::new();
    for seed in 0..6 {
        reqs.push(sampled(&prompt, seed, Constraint::Regex(regex.into()), 64));
        reqs.push(sampled(
            &prompt,
            seed,
            Constraint::Choice(choices.clone()),
            64,
        ));
        reqs.push(sampled(
            &prompt,
            seed,
            Constraint::JsonSchema(schema.clone()),
            48,
        ));
        let mut free = sampled(&prompt, seed, Constraint::Regex(String::new()), 8);
        free.constraint = None;
        reqs.push(free);
    }
    let out = run(&mut e, reqs);
    let (mut json_done, mut free_texts) = (0, Vec::new());
    for (i, r) in out.iter().enumerate() {
        let (text, finish) = r.as_ref().unwrap_or_else(|e| panic!("request {i}: {e}"));
        match i % 4 {
            0 => {
                assert_eq!(*finish, FinishReason::Stop, "{text:?}");
                assert!(re_ok(text), "{text:?} does not match {regex}");
            }
            1 => {
                assert_eq!(*finish, FinishReason::Stop, "{text:?}");
                assert!(choices.contains(text), "{text:?}");
            }
            2 if *finish == FinishReason::Stop => {
                let v: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
                let o = v.as_object().expect("an object");
                assert!(o["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
                assert!(o["ok"].is_boolean(), "{text}");
                assert_eq!(o.len(), 2, "{text}");
                json_done += 1;
            }
            2 => assert_eq!(*finish, FinishReason::Length, "{text:?}"),
            _ => free_texts.push(text.clone()),
        }
    }
    assert!(
        json_done > 0,
        "no JSON output completed: the test shows nothing"
    );
    // The unconstrained requests were not held to any constraint.
    assert!(free_texts.iter().any(|t| !re_ok(t) && !choices.contains(t)));
    assert_eq!(e.stats().blocks_used, 0);
}

/// Constraints that cannot compile are refused with the library's reason;
/// nothing is left in flight.
#[test]
fn bad_constraints_are_refused() {
    let dir = fixtures().join("llama");
    let mut e = engine(&dir, 1);
    let prompt = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    for (c, words) in [
        (Constraint::Regex("(a".into()), "regex"),
        (
            Constraint::Lark("start: nothing_here".into()),
            "nothing_here",
        ),
        (Constraint::Choice(vec![]), "choice"),
        (
            Constraint::JsonSchema(json!({"$ref": "#/definitions/missing"})),
            "missing",
        ),
        (Constraint::Regex("a".repeat(300_000)), "bytes"),
        (
            Constraint::JsonSchema((0..40).fold(
                json!({"type": "string"}),
                |s, _| json!({"type": "array", "items": s}),
            )),
            "deeper",
        ),
    ] {
        let out = run(&mut e, vec![sampled(&prompt, 1, c.clone(), 8)]);
        let err = out[0].as_ref().expect_err("a bad constraint ran");
        assert!(err.contains(words), "{c:?}: {err}");
    }
    assert_eq!(e.stats().blocks_used, 0);
}

/// The OpenAI shapes on the default model: `response_format` (json_schema
/// and json_object), vLLM's `guided_*` and `structured_outputs`, streamed
/// and not, with `n` > 1 and a stop string that would cut the object.
#[tokio::test]
async fn the_server_constrains_outputs() {
    let s = start(&[]).await;
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let check = |text: &str, finish: &str| {
        if finish == "length" {
            return;
        }
        assert_eq!(finish, "stop", "{text}");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["name"].is_string() && v["age"].is_i64(), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
    };
    let body = json!({
        "messages": [{"role": "user", "content": "Describe a cat as JSON with its name and age."}],
        "max_tokens": 60, "temperature": 0.9, "seed": 3, "n": 3, "stop": ["}", "\""],
        "response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": true}},
    });
    let (st, v) = post(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut stopped = 0;
    for c in choices {
        let f = c["finish_reason"].as_str().unwrap();
        check(c["message"]["content"].as_str().unwrap(), f);
        stopped += (f == "stop") as usize;
    }
    assert!(stopped > 0, "{v}");

    // Streamed: the deltas put together are the object.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["n"] = json!(1);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.url))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let (mut content, mut finish) = (String::new(), String::new());
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let ev: Value = serde_json::from_str(line).unwrap();
        if let Some(c) = ev["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if let Some(f) = ev["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    check(&content, &finish);

    // json_object, on the completions endpoint, greedy.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "A JSON object about the weather:", "max_tokens": 40, "temperature": 0,
               "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (text, f) = (
        v["choices"][0]["text"].as_str().unwrap(),
        v["choices"][0]["finish_reason"].as_str().unwrap(),
    );
    if f == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert_eq!(f, "length");
    }

    for (extra, want) in [
        (
            json!({"guided_choice": ["red", "green"]}),
            vec!["red", "green"],
        ),
        (
            json!({"structured_outputs": {"choice": ["up", "down"]}}),
            vec!["up", "down"],
        ),
    ] {
        let mut b = json!({"prompt": "Pick one:", "max_tokens": 8, "temperature": 1, "n": 4});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, v) = post(&s, "/v1/completions", b).await;
        assert_eq!(st, 200, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert!(want.contains(&c["text"].as_str().unwrap()), "{v}");
        }
    }

    // Mistakes are 400s naming the field; the server goes on.
    for (b, param) in [
        (
            json!({"response_format": {"type": "xml"}}),
            Some("response_format"),
        ),
        (
            json!({"response_format": {"type": "json_schema"}}),
            Some("response_format"),
        ),
        (json!({"guided_regex": "(a"}), None),
        (json!({"guided_regex": 5}), Some("guided_regex")),
        (json!({"guided_choice": []}), Some("guided_choice")),
        (
            json!({"guided_regex": "a", "guided_choice": ["b"]}),
            Some("guided_choice"),
        ),
        (json!({"guided_json": "{not json"}), Some("guided_json")),
        (
            json!({"guided_grammar": "root ::= \"yes\" | \"no\""}),
            Some("guided_grammar"),
        ),
    ] {
        let mut body = json!({"prompt": "x", "max_tokens": 4});
        body.as_object_mut()
            .unwrap()
            .extend(b.as_object().unwrap().clone());
        let (st, v) = post(&s, "/v1/completions", body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}: {v}");
        }
    }
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
}

/// Tool calling through the official `openai` client
/// (`tests/openai_tools.py`): required, named and parallel-off calls
/// validated with `jsonschema`, streamed and not; a round trip with the
/// tool's result; the model's own syntax parsed out under `auto`; mistakes
/// and hostile schemas refused while another stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_through_the_openai_client() {
    let s = start(&[]).await;
    run_python_check(&s, "openai_tools.py");
}

/// A template that takes tools gets them, and the calls and results of the
/// conversation, in the shapes templates read (arguments as JSON values).
#[test]
fn templates_with_tools_get_them() {
    use ruvllm::chat::{ChatMessage, ChatTemplate};
    use ruvllm::tools::{parse_tools, template_tools, ToolFormat};
    let src = "{% if tools %}TOOLS:{% for t in tools %}[{{ t.function.name }}:{{ t.function.parameters | tojson }}]{% endfor %}\n{% endif %}\
{% for m in messages %}{{ m.role }}:{{ m.content }}\
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% endif %}\
{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}\n{% endfor %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert!(t.supports_tools());
    assert_eq!(ToolFormat::detect(t.source()), ToolFormat::Hermes);
    let tools = parse_tools(
        &json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]),
    )
    .unwrap();
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = Some(json!([{"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]));
    let mut result = ChatMessage::new("tool", "5 degrees");
    result.tool_call_id = Some("c1".into());
    let msgs = [ChatMessage::new("user", "Weather in Oslo?"), call, result];
    let text = t
        .render_with_tools(&msgs, Some(&template_tools(&tools)), true)
        .unwrap();
    assert_eq!(
        text,
        "TOOLS:[get_weather:{\"properties\":{\"city\":{\"type\":\"string\"}},\"type\":\"object\"}]\n\
user:Weather in Oslo?\nassistant:<tool_call>get_weather(Oslo)\ntool:5 degrees#c1\n"
    );
    // Without tools the same template renders as before.
    let plain = t.render(&msgs[..1], true).unwrap();
    assert_eq!(plain, "user:Weather in Oslo?\n");
}

/// The schema suite (`tests/fixtures/schemas/suite.json`, 53 schemas)
/// through `response_format`, sampled: every output parses and validates
/// with `jsonschema`, formats included (`tests/openai_schemas.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_of_the_suite_gets_valid_output() {
    let s = start(&[]).await;
    run_python_check(&s, "openai_schemas.py");
}
