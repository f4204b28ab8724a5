//! Tool calling: the tools a chat request offers, how they reach the
//! model's prompt, the constraints that force a call, and reading the calls
//! back out of what the model writes (whole or as it streams).
//!
//! With `tool_choice` "auto" the model writes calls in its own syntax and
//! [`ToolStream`] takes them out of the text: Hermes/Qwen
//! `<tool_call>{...}</tool_call>`, Llama 3 JSON (after `<|python_tag|>` or
//! as the whole answer), Mistral `[TOOL_CALLS][{...}]` (and its newer
//! `[TOOL_CALLS]name[ARGS]{...}`). With "required" or a named function the
//! output is constrained (as vLLM does it): a JSON list of
//! `{"name", "arguments"}` objects, or the named function's arguments.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::constraint::Constraint;
use serde_json::{json, Value};

/// Tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// One call the model made: a function's name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// The syntax a model writes its calls in, told from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes,
    /// Qwen, and our fallback prompt).
    Hermes,
    /// A JSON object `{"name": ..., "parameters": ...}`, after
    /// `<|python_tag|>` or as the whole answer (Llama 3.1+).
    Llama3,
    /// `[TOOL_CALLS]` then a JSON list of calls, or `name[ARGS]{...}`.
    Mistral,
}

impl ToolFormat {
    /// The format a chat template writes calls in; Hermes when it shows none
    /// (the fallback prompt asks for Hermes).
    pub fn detect(template: &str) -> ToolFormat {
        if template.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if template.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if template.contains("<|python_tag|>") || template.contains("<|start_header_id|>") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }

    /// The syntax a model writes calls in, from its chat template: the
    /// fallback prompt of templates without tool support asks for Hermes.
    pub fn of_template(template: &ChatTemplate) -> ToolFormat {
        if template.supports_tools() {
            ToolFormat::detect(template.source())
        } else {
            ToolFormat::Hermes
        }
    }

    /// The text that opens a call.
    fn marker(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Llama3 => "<|python_tag|>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
        }
    }
}

/// Reads a request's `tools`: a list of `{"type": "function", "function":
/// {"name", "description", "parameters"}}`. Names follow OpenAI's rule
/// (1–64 of `a-zA-Z0-9_-`) and are unique.
pub fn parse_tools(v: &Value) -> Result<Vec<Tool>, String> {
    let list = v.as_array().ok_or("tools must be a list")?;
    if list.len() > MAX_TOOLS {
        return Err(format!("{} tools offered; at most {MAX_TOOLS}", list.len()));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(format!("tools[{i}].type must be \"function\""));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| format!("tools[{i}].function must be an object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("tools[{i}].function.name must be a string"))?;
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "tools[{i}].function.name '{name}' must be 1-64 letters, digits, '_' or '-'"
            ));
        }
        if tools.iter().any(|t| t.name == name) {
            return Err(format!("tools[{i}]: the name '{name}' is used twice"));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(format!("tools[{i}].function.description must be a string")),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(format!(
                    "tools[{i}].function.parameters must be a JSON schema (an object)"
                ))
            }
        };
        tools.push(Tool {
            name: name.to_string(),
            description,
            parameters,
        });
    }
    Ok(tools)
}

/// Reads `tool_choice`: "none", "auto", "required" or `{"type": "function",
/// "function": {"name"}}` naming an offered tool. Absent, it is "auto" when
/// tools are offered and "none" otherwise.
pub fn parse_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, String> {
    let choice = match v {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            s => {
                return Err(format!(
                    "tool_choice must be none, auto, required or a function, got '{s}'"
                ))
            }
        },
        Some(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or(
                    "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!("tool_choice names '{name}', which is not in tools"));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if tools.is_empty() && choice != ToolChoice::None && choice != ToolChoice::Auto {
        return Err("tool_choice asks for a tool call but no tools are offered".into());
    }
    Ok(choice)
}

/// The tools in the shape chat templates read (OpenAI's request shape).
pub fn template_tools(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                json!({"type": "function", "function": f})
            })
            .collect(),
    )
}

/// The output constraint that forces calls: with `Required`, a list of one
/// or more `{"name", "arguments"}` objects (one at most without parallel
/// calls); with a named function, that function's arguments.
pub fn choice_constraint(
    choice: &ToolChoice,
    tools: &[Tool],
    parallel: bool,
) -> Option<Constraint> {
    match choice {
        ToolChoice::None | ToolChoice::Auto => None,
        ToolChoice::Named(n) => {
            let t = tools.iter().find(|t| &t.name == n)?;
            Some(Constraint::JsonSchema(t.parameters.clone()))
        }
        ToolChoice::Required => {
            // Each tool's schema goes under `$defs` of the new root, its
            // own references (`#/$defs/...`, `#`) rebased there.
            let mut defs = serde_json::Map::new();
            let calls: Vec<Value> = tools
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let key = format!("tool{i}");
                    let mut params = t.parameters.clone();
                    rebase_refs(&mut params, &format!("#/$defs/{key}"));
                    defs.insert(key.clone(), params);
                    json!({
                        "type": "object",
                        "properties": {
                            "name": {"const": t.name},
                            "arguments": {"$ref": format!("#/$defs/{key}")},
                        },
                        "required": ["name", "arguments"],
                        "additionalProperties": false,
                    })
                })
                .collect();
            let mut s =
                json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}, "$defs": defs});
            if !parallel {
                s["maxItems"] = json!(1);
            }
            Some(Constraint::JsonSchema(s))
        }
    }
}

/// Rewrites a schema's document-local references (`#...`) to point below
/// `base`, where the schema now sits.
fn rebase_refs(v: &mut Value, base: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match x {
                    Value::String(r) if k == "$ref" && r.starts_with('#') => {
                        *r = format!("{base}{}", &r[1..]);
                    }
                    _ => rebase_refs(x, base),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rebase_refs(x, base)),
        _ => {}
    }
}

/// Instructions offering the tools to a model whose chat template has no
/// place for them (it is then asked for the Hermes syntax).
pub fn fallback_prompt(tools: &[Tool]) -> String {
    let mut s = String::from(
        "You may call functions to answer. They are described by JSON schemas inside <tools></tools>:\n<tools>\n",
    );
    for t in template_tools(tools).as_array().into_iter().flatten() {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call a function, answer with a JSON object of its name and arguments inside <tool_call></tool_call> tags, one block per call:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments>}}\n</tool_call>\nEach result comes back inside <tool_response></tool_response> tags. When no function helps, answer directly.",
    );
    s
}

/// A conversation with tool calls and results for a template without tool
/// support: calls become Hermes text in the assistant's turn, results user
/// turns (consecutive ones merged, so turns still alternate), and the
/// tools' description joins the system message.
pub fn fallback_messages(messages: &[ChatMessage], tools: Option<&[Tool]>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(tools) = tools.filter(|t| !t.is_empty()) {
        let p = fallback_prompt(tools);
        match messages.first() {
            Some(m) if m.role == "system" => {
                out.push(ChatMessage::new("system", format!("{}\n\n{p}", m.content)))
            }
            _ => out.push(ChatMessage::new("system", p)),
        }
    }
    let skip = usize::from(!out.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    let mut last_was_result = false;
    for m in &messages[skip..] {
        match m.role.as_str() {
            "tool" => {
                // The call's id and name, when given, pair results with
                // calls made in parallel.
                let body = match (&m.tool_call_id, &m.name) {
                    (None, None) => m.content.clone(),
                    (id, name) => {
                        json!({"tool_call_id": id, "name": name, "content": m.content}).to_string()
                    }
                };
                let block = format!("<tool_response>\n{body}\n</tool_response>");
                match out.last_mut() {
                    Some(prev) if last_was_result => {
                        prev.content.push('\n');
                        prev.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", block)),
                }
                last_was_result = true;
                continue;
            }
            "assistant" if m.tool_calls.is_some() => {
                let mut text = m.content.clone();
                for c in m.tool_calls.iter().flat_map(|v| v.as_array()).flatten() {
                    let f = &c["function"];
                    let call = json!({"name": f["name"], "arguments": f["arguments"]});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            // A user turn right after results joins them: turns alternate.
            "user" if last_was_result => {
                let prev = out.last_mut().expect("results came before");
                prev.content.push_str("\n\n");
                prev.content.push_str(&m.content);
            }
            _ => out.push(ChatMessage::new(m.role.clone(), m.content.clone())),
        }
        last_was_result = false;
    }
    out
}

/// [`fallback_messages`] for templates that refuse a system turn: the
/// tools' description opens the first user turn instead.
pub fn fallback_messages_without_system(
    messages: &[ChatMessage],
    tools: Option<&[Tool]>,
) -> Vec<ChatMessage> {
    let mut out = fallback_messages(messages, tools);
    if out.first().is_some_and(|m| m.role == "system") {
        let sys = out.remove(0);
        match out.iter_mut().find(|m| m.role == "user") {
            Some(u) => u.content = format!("{}\n\n{}", sys.content, u.content),
            None => out.insert(0, ChatMessage::new("user", sys.content)),
        }
    }
    out
}

/// The prompt text of a conversation with `tools` offered: given to a
/// template that takes them, else described in a system message (or the
/// first user turn, for templates that refuse a system turn) with the
/// conversation's calls and results written as text.
pub fn render_prompt(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    tools: &[Tool],
) -> crate::Result<String> {
    if template.supports_tools() {
        let list = (!tools.is_empty()).then(|| template_tools(tools));
        return template.render_with_tools(messages, list.as_ref(), true);
    }
    let tools = (!tools.is_empty()).then_some(tools);
    match template.render(&fallback_messages(messages, tools), true) {
        Err(_) if tools.is_some() && messages.first().is_none_or(|m| m.role != "system") => {
            template.render(&fallback_messages_without_system(messages, tools), true)
        }
        r => r,
    }
}

/// A call read from a JSON value `{"name", "arguments" | "parameters"}`
/// (and perhaps `"type"` and `"id"`, nothing else: an answer that merely
/// has a `name` is no call); string arguments must be JSON text.
fn call_of(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    let known = ["name", "arguments", "parameters", "type", "id"];
    if !o.keys().all(|k| known.contains(&k.as_str())) {
        return None;
    }
    let name = o.get("name")?.as_str()?.to_string();
    let arguments = match o.get("arguments").or_else(|| o.get("parameters"))? {
        Value::String(s) => {
            serde_json::from_str::<Value>(s).ok()?;
            s.clone()
        }
        Value::Null => "{}".to_string(),
        a => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// Calls from a JSON object or a list of them; `None` unless every item is
/// a call.
fn calls_of(v: &Value) -> Option<Vec<ToolCall>> {
    match v {
        Value::Array(a) if !a.is_empty() => a.iter().map(call_of).collect(),
        Value::Object(_) => call_of(v).map(|c| vec![c]),
        _ => None,
    }
}

/// Calls in JSON text: one value, or several separated by `;` or newlines
/// (Llama 3 writes parallel calls so).
fn calls_in_json_text(text: &str) -> Option<Vec<ToolCall>> {
    let mut rest = text.trim();
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        calls.extend(calls_of(&v)?);
        rest = rest[values.byte_offset()..]
            .trim_start_matches(|c: char| c.is_whitespace() || c == ';');
    }
    (!calls.is_empty()).then_some(calls)
}

/// The calls among the complete items of a JSON list that was cut off.
fn complete_items(text: &str) -> Vec<ToolCall> {
    let mut calls = Vec::new();
    let Some(mut rest) = text.trim_start().strip_prefix('[') else {
        return calls;
    };
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        match values.next() {
            Some(Ok(v)) => match call_of(&v) {
                Some(c) => calls.push(c),
                None => return calls,
            },
            _ => return calls,
        }
        rest = &rest[values.byte_offset()..];
    }
}

/// What [`ToolStream`] lets out after a piece of output.
#[derive(Debug, Default, PartialEq)]
pub struct ToolDelta {
    /// Text for the message's content.
    pub content: String,
    /// Calls completed by this piece.
    pub calls: Vec<ToolCall>,
}

#[derive(Debug, PartialEq)]
enum Phase {
    /// Ordinary text; what might begin a call is held back.
    Text,
    /// The answer began like JSON (Llama 3's bare calls, or the forced
    /// list): all of it is held until the end, when it is either calls of
    /// offered tools or text.
    Json,
    /// A marker opened a call: a Hermes block until its closing tag; for
    /// the other formats, the rest of the output.
    Call,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Takes a model's tool calls out of its output as it is generated; the
/// content around them streams on.
pub struct ToolStream {
    format: ToolFormat,
    names: Vec<String>,
    /// The output is a constrained list of calls (`tool_choice: required`).
    forced: bool,
    parallel: bool,
    phase: Phase,
    /// Output not yet let out.
    held: String,
    /// Bytes of `held` already searched for a Hermes block's end.
    scanned: usize,
    /// The call's marker was a control token (no text of the output).
    control_marker: bool,
    /// Whether any content went out (a JSON answer must come first).
    said: bool,
    calls: usize,
}

impl ToolStream {
    pub fn new(format: ToolFormat, tools: &[Tool], forced: bool, parallel: bool) -> Self {
        ToolStream {
            format,
            names: tools.iter().map(|t| t.name.clone()).collect(),
            forced,
            parallel,
            phase: if forced { Phase::Json } else { Phase::Text },
            held: String::new(),
            scanned: 0,
            control_marker: false,
            said: false,
            calls: 0,
        }
    }

    /// Feeds a token's text; `control` is the text of a control token
    /// (which adds nothing to the output's text, but may be the format's
    /// syntax: a marker, Mistral's `[ARGS]`).
    pub fn push(&mut self, text: &str, control: Option<&str>) -> ToolDelta {
        let mut d = ToolDelta::default();
        match control {
            Some(c) if self.format.syntax().contains(&c) => {
                if self.phase == Phase::Text && c == self.format.marker() {
                    d.content = std::mem::take(&mut self.held);
                    self.control_marker = true;
                }
                self.held.push_str(c);
            }
            // Other control tokens (end of turn...) are no text.
            Some(_) => {}
            None => self.held.push_str(text),
        }
        self.advance(&mut d);
        self.said |= !d.content.is_empty();
        self.limit(&mut d.calls);
        d
    }

    /// Lets out what can go: content that cannot begin a call, and Hermes
    /// blocks that closed.
    fn advance(&mut self, d: &mut ToolDelta) {
        let marker = self.format.marker();
        loop {
            match self.phase {
                Phase::Json => return,
                Phase::Text => {
                    if let Some(p) = self.held.find(marker) {
                        d.content.push_str(&self.held[..p]);
                        self.held.drain(..p);
                        self.phase = Phase::Call;
                        self.scanned = 0;
                        continue;
                    }
                    if !self.said && self.format == ToolFormat::Llama3 {
                        let start = self.held.trim_start();
                        if start.starts_with('{') || start.starts_with('[') {
                            self.phase = Phase::Json;
                            return;
                        }
                        if start.is_empty() {
                            // Whitespace before a possible JSON answer.
                            return;
                        }
                    }
                    let cut = self.held.len() - partial_marker(&self.held, marker);
                    d.content.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return;
                }
                Phase::Call => {
                    if self.format != ToolFormat::Hermes {
                        return; // read whole at the end
                    }
                    let mut from = self.scanned.saturating_sub(CLOSE.len() - 1);
                    while !self.held.is_char_boundary(from) {
                        from -= 1;
                    }
                    let Some(close) = self.held[from..].find(CLOSE).map(|c| from + c) else {
                        self.scanned = self.held.len();
                        return;
                    };
                    let end = close + CLOSE.len();
                    let body = &self.held[OPEN.len().min(close)..close];
                    match self.checked(calls_in_json_text(body)) {
                        Some(c) => d.calls.extend(c),
                        // A block that is no call stays text.
                        None => d.content.push_str(&self.held[..end]),
                    }
                    self.held.drain(..end);
                    self.phase = Phase::Text;
                }
            }
        }
    }

    /// The end of the output: whatever is held goes out as calls if it
    /// reads as calls, else as content (text is never lost).
    pub fn finish(&mut self) -> ToolDelta {
        let held = std::mem::take(&mut self.held);
        let mut d = ToolDelta::default();
        let calls = match self.phase {
            Phase::Text => None,
            Phase::Json if self.forced => {
                Some(calls_in_json_text(&held).unwrap_or_else(|| complete_items(&held)))
            }
            Phase::Json => self.checked(calls_in_json_text(&held)),
            Phase::Call => {
                let body = &held[self.format.marker().len().min(held.len())..];
                self.checked(self.format.calls_after_marker(body))
            }
        };
        match calls {
            Some(c) => d.calls = c,
            // A marker that was a control token is no text.
            None if self.phase == Phase::Call && self.control_marker => {
                d.content = held[self.format.marker().len().min(held.len())..].to_string()
            }
            None => d.content = held,
        }
        self.limit(&mut d.calls);
        d
    }

    /// Calls only of offered tools.
    fn checked(&self, calls: Option<Vec<ToolCall>>) -> Option<Vec<ToolCall>> {
        calls.filter(|c| c.iter().all(|c| self.names.contains(&c.name)))
    }

    /// Keeps one call at most when parallel calls are off.
    fn limit(&mut self, calls: &mut Vec<ToolCall>) {
        if !self.parallel {
            calls.truncate(usize::from(self.calls == 0));
        }
        self.calls += calls.len();
    }
}

impl ToolFormat {
    /// Control tokens that are part of the format's syntax.
    fn syntax(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &[OPEN, CLOSE],
            ToolFormat::Llama3 => &["<|python_tag|>"],
            ToolFormat::Mistral => &["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"],
        }
    }

    /// Calls in what follows the marker, up to the end of the output.
    fn calls_after_marker(self, body: &str) -> Option<Vec<ToolCall>> {
        match self {
            // A block the model ended without its closing tag.
            ToolFormat::Hermes => calls_in_json_text(body.trim_end().trim_end_matches(CLOSE)),
            ToolFormat::Llama3 => calls_in_json_text(body),
            ToolFormat::Mistral => {
                if let Some(c) = calls_in_json_text(body) {
                    return Some(c);
                }
                // The newer syntax: name[ARGS]{...} (or
                // name[CALL_ID]id[ARGS]{...}), repeated after markers.
                let mut calls = Vec::new();
                for part in body.split("[TOOL_CALLS]") {
                    let (head, args) = part.split_once("[ARGS]")?;
                    let name = head.split("[CALL_ID]").next().unwrap_or(head);
                    let args: Value = serde_json::from_str(args.trim()).ok()?;
                    calls.push(ToolCall {
                        name: name.trim().to_string(),
                        arguments: args.to_string(),
                    });
                }
                Some(calls)
            }
        }
    }
}

/// How many bytes at the end of `s` could begin `marker`.
fn partial_marker(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && marker.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        parse_tools(&json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add"}}
        ]))
        .unwrap()
    }

    /// Feeds `pieces` one at a time and gathers what comes out.
    fn run(s: &mut ToolStream, pieces: &[&str]) -> ToolDelta {
        let mut all = ToolDelta::default();
        for p in pieces {
            let d = s.push(p, None);
            all.content.push_str(&d.content);
            all.calls.extend(d.calls);
        }
        let d = s.finish();
        all.content.push_str(&d.content);
        all.calls.extend(d.calls);
        all
    }

    #[test]
    fn hermes_calls_are_taken_out_of_the_text() {
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, true);
        let d = run(
            &mut s,
            &[
                "Let me",
                " check. <tool",
                "_call>\n{\"name\": \"get_weather\", ",
                "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                "\n<tool_call>{\"name\": \"add\", \"arguments\": {}}</tool_call>",
            ],
        );
        assert_eq!(d.content, "Let me check. \n");
        assert_eq!(
            d.calls,
            vec![
                ToolCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                ToolCall {
                    name: "add".into(),
                    arguments: "{}".into()
                },
            ]
        );
    }

    #[test]
    fn a_held_back_prefix_that_is_not_a_marker_comes_out() {
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, true);
        let d = s.push("a <tool", None);
        assert_eq!(d.content, "a ");
        let d = s.push("box> b", None);
        assert_eq!(d.content, "<toolbox> b");
        assert_eq!(s.finish(), ToolDelta::default());
    }

    #[test]
    fn a_json_answer_is_a_call_only_of_an_offered_tool() {
        let mut s = ToolStream::new(ToolFormat::Llama3, &tools(), false, true);
        let d = run(
            &mut s,
            &[" {\"name\": \"add\", ", "\"parameters\": {\"a\": 1}}"],
        );
        assert_eq!(
            d.calls,
            vec![ToolCall {
                name: "add".into(),
                arguments: r#"{"a":1}"#.into()
            }]
        );
        assert!(d.content.is_empty());
        let mut s = ToolStream::new(ToolFormat::Llama3, &tools(), false, true);
        let d = run(&mut s, &["{\"name\": \"rm\", \"parameters\": {}}"]);
        assert!(d.calls.is_empty());
        assert_eq!(d.content, "{\"name\": \"rm\", \"parameters\": {}}");
    }

    #[test]
    fn control_token_markers_open_calls() {
        let mut s = ToolStream::new(ToolFormat::Mistral, &tools(), false, true);
        assert_eq!(s.push("", Some("[TOOL_CALLS]")), ToolDelta::default());
        let d = run(
            &mut s,
            &["[{\"name\": \"add\", \"arguments\": {\"a\": 2}}]"],
        );
        assert_eq!(
            d.calls,
            vec![ToolCall {
                name: "add".into(),
                arguments: r#"{"a":2}"#.into()
            }]
        );
        let mut s = ToolStream::new(ToolFormat::Mistral, &tools(), false, true);
        s.push("", Some("[TOOL_CALLS]"));
        let d = run(&mut s, &["add[ARGS]{\"a\": 3}"]);
        assert_eq!(
            d.calls,
            vec![ToolCall {
                name: "add".into(),
                arguments: r#"{"a":3}"#.into()
            }]
        );
    }

    #[test]
    fn malformed_calls_stay_text() {
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, true);
        let d = run(&mut s, &["<tool_call>{\"name\": broken"]);
        assert!(d.calls.is_empty());
        assert_eq!(d.content, "<tool_call>{\"name\": broken");
    }

    #[test]
    fn text_between_and_after_blocks_streams_and_bad_blocks_stay_text() {
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, true);
        let d = run(
            &mut s,
            &[
                "A <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call> then ",
                "<tool_call>{\"name\": broken}</tool_call> and ",
                "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
                " <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Ōsaka\"}}</tool_call> é<tool",
            ],
        );
        assert_eq!(
            d.content,
            "A  then <tool_call>{\"name\": broken}</tool_call> and <tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>  é<tool"
        );
        let names: Vec<&str> = d.calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["add", "get_weather"]);
    }

    #[test]
    fn plain_answers_in_brackets_stream_at_once() {
        // Only Llama 3's format holds a JSON-looking answer back.
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, true);
        assert_eq!(s.push("[1] The first", None).content, "[1] The first");
        let mut s = ToolStream::new(ToolFormat::Llama3, &tools(), false, true);
        assert_eq!(
            s.push("{\"name\": \"add\", \"extra\": 1}", None).content,
            ""
        );
        let d = s.finish();
        assert!(d.calls.is_empty());
        assert_eq!(d.content, "{\"name\": \"add\", \"extra\": 1}");
    }

    #[test]
    fn other_control_tokens_are_no_text_and_markers_do_not_leak() {
        let mut s = ToolStream::new(ToolFormat::Llama3, &tools(), false, true);
        s.push("", Some("<|python_tag|>"));
        let d = run(&mut s, &["brave_search.call(query=\"x\")"]);
        assert!(d.calls.is_empty());
        assert_eq!(d.content, "brave_search.call(query=\"x\")");
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, true);
        assert_eq!(s.push("hi", Some("<|im_end|>")), ToolDelta::default());
    }

    #[test]
    fn required_schemas_keep_their_references() {
        let t = parse_tools(&json!([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
            "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
        }}}]))
        .unwrap();
        let Some(Constraint::JsonSchema(s)) = choice_constraint(&ToolChoice::Required, &t, true)
        else {
            panic!()
        };
        assert_eq!(
            s["$defs"]["tool0"]["properties"]["p"]["$ref"],
            "#/$defs/tool0/$defs/P"
        );
    }

    #[test]
    fn a_cut_off_forced_list_keeps_its_complete_calls() {
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), true, true);
        let d = run(
            &mut s,
            &["[{\"name\": \"add\", \"arguments\": {}},\n {\"name\": \"add\", \"argu"],
        );
        assert_eq!(
            d.calls,
            vec![ToolCall {
                name: "add".into(),
                arguments: "{}".into()
            }]
        );
        assert!(d.content.is_empty());
    }

    #[test]
    fn parallel_calls_off_keeps_the_first() {
        let mut s = ToolStream::new(ToolFormat::Hermes, &tools(), false, false);
        let d = run(&mut s, &["<tool_call>{\"name\": \"add\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>"]);
        assert_eq!(d.calls.len(), 1);
        assert_eq!(d.calls[0].name, "add");
    }

    #[test]
    fn bad_tools_and_choices_are_refused() {
        for bad in [
            json!({}),
            json!([{"type": "function"}]),
            json!([{"type": "retrieval", "function": {"name": "a"}}]),
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!([{"type": "function", "function": {"name": "a", "parameters": 3}}]),
            json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]),
        ] {
            assert!(parse_tools(&bad).is_err(), "{bad}");
        }
        let t = tools();
        assert_eq!(parse_choice(None, &t), Ok(ToolChoice::Auto));
        assert_eq!(parse_choice(None, &[]), Ok(ToolChoice::None));
        assert!(parse_choice(Some(&json!("always")), &t).is_err());
        assert!(parse_choice(
            Some(&json!({"type": "function", "function": {"name": "nope"}})),
            &t
        )
        .is_err());
        assert!(parse_choice(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn fallback_messages_alternate() {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(
            json!([{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]),
        );
        let msgs = vec![
            ChatMessage::new("user", "hi"),
            call,
            ChatMessage::new("tool", "1"),
            ChatMessage::new("tool", "2"),
        ];
        let out = fallback_messages(&msgs, Some(&tools()));
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[2].content.contains(
            r#"<tool_call>
{"name":"add","arguments":{"a":1}}
</tool_call>"#
        ));
        assert_eq!(
            out[3].content,
            "<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>"
        );
    }
}
