//! Training examples from a JSON Lines file, one object per line:
//!
//! - `{"text": "..."}`: the loss on every token (the tokenizer adds BOS as
//!   it would for a prompt);
//! - `{"prompt": "...", "completion": "..."}`: the loss on the completion,
//!   which ends with EOS so the model learns to stop;
//! - `{"messages": [{"role", "content"}, ...]}` ending with an assistant
//!   turn: rendered with the model's chat template, the loss on that last
//!   turn (its text and the template's end-of-turn marks).

use super::Example;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::encode_chat;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    text: Option<String>,
    prompt: Option<String>,
    completion: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// The examples of a JSON Lines text; blank lines are skipped. Sequences
/// longer than `max_len` tokens are cut to their first `max_len` (an
/// example left with nothing to learn is an error naming its line).
pub fn parse_jsonl(
    text: &str,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| Error::InvalidRequest(format!("line {}: {m}", i + 1));
        let l: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let (prompt, completion): (Vec<u32>, Vec<u32>) = match l {
            Line {
                text: Some(t),
                prompt: None,
                completion: None,
                messages: None,
            } => {
                let ids = tokenizer.encode(&t, true)?;
                (
                    ids[..1.min(ids.len())].to_vec(),
                    ids[1.min(ids.len())..].to_vec(),
                )
            }
            Line {
                text: None,
                prompt: Some(p),
                completion: Some(c),
                messages: None,
            } => {
                let mut c = tokenizer.encode(&c, false)?;
                c.extend(tokenizer.special.eos);
                (tokenizer.encode(&p, true)?, c)
            }
            Line {
                text: None,
                prompt: None,
                completion: None,
                messages: Some(m),
            } => {
                let Some((_, context)) = m.split_last().filter(|(l, _)| l.role == "assistant")
                else {
                    return Err(bad("`messages` must end with an assistant turn".into()));
                };
                let head = template.render(context, true)?;
                let full = template.render(&m, false)?;
                let tail = full.strip_prefix(head.as_str()).ok_or_else(|| {
                    bad(
                        "the chat template renders the conversation so that its last \
                         turn does not follow the rest's generation prompt"
                            .into(),
                    )
                })?;
                (
                    encode_chat(tokenizer, &head)?,
                    tokenizer.encode(tail, false)?,
                )
            }
            _ => {
                return Err(bad(
                    "give one of `text`, `prompt` with `completion`, or `messages`".into(),
                ))
            }
        };
        let first = prompt.len().max(1);
        let mut tokens = prompt;
        tokens.extend(completion);
        tokens.truncate(max_len);
        if tokens.len() <= first {
            return Err(bad(format!(
                "nothing to learn within {max_len} tokens (the prompt takes {first})"
            )));
        }
        out.push(Example::completion(tokens, first));
    }
    if out.is_empty() {
        return Err(Error::InvalidRequest("the data holds no examples".into()));
    }
    Ok(out)
}
