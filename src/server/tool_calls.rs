//! A chat choice's output when tools are offered: the model's tokens turned
//! into OpenAI's `message` (content and `tool_calls`) or, streamed, into
//! `delta`s that carry content and tool-call pieces.

use super::openai::ToolRequest;
use crate::request::{FinishReason, TokenEvent};
use crate::tokenizer::Tokenizer;
use crate::tools::{ToolCall, ToolChoice, ToolDelta, ToolFormat, ToolStream};
use serde_json::{json, Value};

/// How one choice's output becomes a message.
pub enum ToolOutput {
    /// No tools: the output is the content.
    Text,
    /// Calls are read out of the output (`auto`, or the constrained list
    /// of `required`).
    Parsed(ToolStream),
    /// The output is the named function's arguments.
    Named { name: String, id: Option<String> },
}

/// One choice's output state.
pub struct ChoiceOutput {
    mode: ToolOutput,
    format: ToolFormat,
    /// Calls sent so far (their indices in the message).
    calls: usize,
}

impl ChoiceOutput {
    pub fn new(t: &ToolRequest, format: ToolFormat) -> Self {
        let mode = match &t.choice {
            ToolChoice::None => ToolOutput::Text,
            ToolChoice::Auto if t.offered.is_empty() => ToolOutput::Text,
            ToolChoice::Auto => {
                ToolOutput::Parsed(ToolStream::new(format, &t.offered, false, t.parallel))
            }
            ToolChoice::Required => {
                ToolOutput::Parsed(ToolStream::new(format, &t.offered, true, t.parallel))
            }
            ToolChoice::Named(n) => ToolOutput::Named {
                name: n.clone(),
                id: None,
            },
        };
        ChoiceOutput {
            mode,
            format,
            calls: 0,
        }
    }

    /// A streamed token's delta (`None`: nothing to send yet).
    pub fn token_delta(&mut self, tok: &Tokenizer, t: &TokenEvent) -> Option<Value> {
        match &mut self.mode {
            ToolOutput::Text => (!t.text.is_empty()).then(|| json!({"content": t.text})),
            ToolOutput::Parsed(s) => {
                let d = s.push(&t.text, control_text(tok, t));
                self.delta(d)
            }
            ToolOutput::Named { name, id } => {
                if t.text.is_empty() {
                    return None;
                }
                // The call's head goes with its first piece of arguments.
                let call = match id {
                    Some(_) => json!({"index": 0, "function": {"arguments": t.text}}),
                    None => {
                        let new = call_id(self.format);
                        *id = Some(new.clone());
                        self.calls = 1;
                        json!({"index": 0, "id": new, "type": "function",
                               "function": {"name": name, "arguments": t.text}})
                    }
                };
                Some(json!({ "tool_calls": [call] }))
            }
        }
    }

    /// What is left to send at the end (as a delta), and the choice's
    /// finish reason.
    pub fn finish_delta(&mut self, f: FinishReason) -> (Option<Value>, &'static str) {
        let rest = match &mut self.mode {
            ToolOutput::Parsed(s) => {
                let d = s.finish();
                self.delta(d)
            }
            ToolOutput::Named { name, id: None } => {
                // Arguments that never began (cut off at once): an empty
                // call still names the function.
                self.calls = 1;
                Some(
                    json!({"tool_calls": [{"index": 0, "id": call_id(self.format), "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                )
            }
            _ => None,
        };
        (rest, self.finish_reason(f))
    }

    /// The whole message of a choice that is not streamed.
    pub fn message(
        &mut self,
        tok: &Tokenizer,
        events: &[TokenEvent],
        f: FinishReason,
    ) -> (Value, &'static str) {
        let mut content = String::new();
        let mut calls: Vec<ToolCall> = Vec::new();
        match &mut self.mode {
            ToolOutput::Text => events.iter().for_each(|t| content.push_str(&t.text)),
            ToolOutput::Named { name, .. } => calls.push(ToolCall {
                name: name.clone(),
                arguments: events.iter().map(|t| t.text.as_str()).collect(),
            }),
            ToolOutput::Parsed(s) => {
                let mut take = |d: crate::tools::ToolDelta| {
                    content.push_str(&d.content);
                    calls.extend(d.calls);
                };
                for t in events {
                    take(s.push(&t.text, control_text(tok, t)));
                }
                take(s.finish());
            }
        }
        let mut m = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            if content.trim().is_empty() {
                m["content"] = Value::Null;
            }
            let calls: Vec<Value> = calls.into_iter().map(|c| self.call_json(None, c)).collect();
            m["tool_calls"] = Value::Array(calls);
        }
        (m, self.finish_reason(f))
    }

    /// A call in OpenAI's shape, with a fresh id (and its index in the
    /// message, for a streamed delta); counts it.
    fn call_json(&mut self, index: Option<usize>, ToolCall { name, arguments }: ToolCall) -> Value {
        self.calls += 1;
        let mut v = json!({"id": call_id(self.format), "type": "function",
                           "function": {"name": name, "arguments": arguments}});
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }

    /// A delta of content and completed calls.
    fn delta(&mut self, d: ToolDelta) -> Option<Value> {
        if d.content.is_empty() && d.calls.is_empty() {
            return None;
        }
        let mut v = json!({});
        if !d.content.is_empty() {
            v["content"] = json!(d.content);
        }
        if !d.calls.is_empty() {
            let calls: Vec<Value> = d
                .calls
                .into_iter()
                .map(|c| self.call_json(Some(self.calls), c))
                .collect();
            v["tool_calls"] = Value::Array(calls);
        }
        Some(v)
    }

    /// "tool_calls" when the model ended by calling a tool it chose (a
    /// named function's call ends with "stop", as OpenAI reports it); a
    /// cut-off output keeps "length".
    fn finish_reason(&self, f: FinishReason) -> &'static str {
        match (f, &self.mode) {
            (FinishReason::Stop, ToolOutput::Parsed(_)) if self.calls > 0 => "tool_calls",
            (f, _) => super::openai::finish_reason(f),
        }
    }
}

/// The text of a control token (which adds nothing to the output's text
/// but may be tool-call syntax).
fn control_text<'a>(tok: &'a Tokenizer, t: &TokenEvent) -> Option<&'a str> {
    tok.is_control(t.id).then(|| tok.token_text(t.id)).flatten()
}

/// A fresh call id: `call_` and 24 letters and digits, or 9 for Mistral
/// models (whose templates refuse other ids when the call comes back).
fn call_id(format: ToolFormat) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // The sampler's generator over a counter and the clock: unique and
    // unguessable enough for ids that only pair calls with their results.
    let mut rng =
        crate::sampling::Rng::new(NEXT.fetch_add(1, Ordering::Relaxed) ^ nanos.rotate_left(17));
    let (prefix, len) = match format {
        ToolFormat::Mistral => ("", 9),
        _ => ("call_", 24),
    };
    let mut id = String::from(prefix);
    for _ in 0..len {
        id.push(ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize] as char);
    }
    id
}
