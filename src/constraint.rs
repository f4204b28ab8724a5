//! Constrained decoding (structured output): a request may require its
//! output to match a JSON schema, a regular expression, one of a list of
//! strings or a Lark grammar. `llguidance` (the library llama.cpp, vLLM and
//! mistral.rs use) compiles the constraint against the model's vocabulary
//! and, before each token is sampled, gives the set of tokens that keep the
//! output valid; every other token's logit is set to -inf.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid under this JSON schema (`{"type": "object"}` for
    /// OpenAI's `json_object`).
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar (llguidance's dialect: `start: ...`).
    Lark(String),
}

/// Whitespace allowed between JSON tokens: enough for pretty-printing
/// nested objects, not enough to pad without end.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,40}";

/// JSON schemas nesting deeper are refused: the library compiles them
/// recursively, on the engine thread's stack.
const MAX_SCHEMA_DEPTH: usize = 32;

/// How deep a JSON value nests.
fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Constraint sources bigger than this are refused before compiling.
pub const MAX_CONSTRAINT_BYTES: usize = 256 << 10;

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonSchema(s) => {
                let mut s = s.clone();
                // Whitespace between tokens is bounded (as llama.cpp's
                // grammars bound it): unbounded, a sampled model can pad
                // forever and never close the object. A schema's own
                // `x-guidance` options win.
                if s == serde_json::Value::Bool(true) {
                    s = serde_json::json!({});
                }
                if let Some(o) = s.as_object_mut() {
                    let x = o
                        .entry("x-guidance")
                        .or_insert_with(|| serde_json::json!({}));
                    if let Some(x) = x.as_object_mut() {
                        if !x.keys().any(|k| k.starts_with("whitespace_")) {
                            x.insert("whitespace_pattern".into(), JSON_WHITESPACE.into());
                        }
                    }
                }
                TopLevelGrammar::from_json_schema(s)
            }
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Choice(c) => {
                let alts: Vec<String> = c
                    .iter()
                    .map(|s| serde_json::Value::String(s.clone()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }

    /// The size of its source, for the bound on what compiles.
    fn source_bytes(&self) -> usize {
        match self {
            Constraint::JsonSchema(s) => s.to_string().len(),
            Constraint::Regex(r) => r.len(),
            Constraint::Choice(c) => c.iter().map(|s| s.len() + 3).sum(),
            Constraint::Lark(g) => g.len(),
        }
    }
}

/// The model's vocabulary as llguidance sees it: each token's bytes
/// (control tokens as llguidance's marked special names).
struct Vocab {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
    }
}

/// Compiles constraints for one model's vocabulary (built once: the token
/// trie of a large vocabulary takes a while).
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
}

impl Grammars {
    /// The compiler for `tokenizer`'s vocabulary, padded to the model's
    /// `vocab` rows of logits.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self> {
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if tokenizer.is_control(id) || tokenizer.token_bytes(id).is_empty() {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    let name = tokenizer
                        .token_text(id)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("<[{id}]>"));
                    w.extend_from_slice(name.as_bytes());
                    w
                } else {
                    tokenizer.token_bytes(id).to_vec()
                }
            })
            .collect();
        let special = &tokenizer.special;
        let eos = special
            .eos
            .or_else(|| special.stop.first().copied())
            .ok_or_else(|| {
                Error::Unsupported(
                    "structured output needs an end-of-sequence token, and the model has none"
                        .into(),
                )
            })?;
        let info = TokRxInfo {
            vocab_size: vocab as u32,
            tok_eos: eos,
            tok_bos: special.bos,
            tok_pad: special.pad,
            tok_unk: special.unk,
            tok_end_of_turn: None,
        };
        // Every token that ends generation may end a constrained output
        // (a chat model ends its turn with its own token, not EOS).
        let mut ends = vec![eos];
        ends.extend(
            special
                .stop
                .iter()
                .copied()
                .filter(|&t| t != eos && (t as usize) < vocab),
        );
        let env: TokEnv = Arc::new(Vocab {
            trie: TokTrie::from(&info, &words).with_eos_tokens(&ends),
            tokenizer,
        });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Internal(format!("structured output: {e}")))?;
        factory.quiet();
        // The library's own bounds on compiling and on each token's mask
        // keep a hostile grammar from stalling the engine; the grammar's
        // size is bounded here too.
        *factory.limits_mut() = ParserLimits {
            max_grammar_size: 200_000,
            // A few tens of MB of lexer at most per sequence (the default
            // allows hundreds).
            max_lexer_states: 50_000,
            // Errors go to clients: no grammar dumps or parser state.
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Grammars { factory, vocab })
    }

    /// A fresh matcher of `c` (one per sequence), or why `c` cannot be
    /// used (a client's mistake).
    pub fn matcher(&self, c: &Constraint) -> Result<Matcher> {
        if c.source_bytes() > MAX_CONSTRAINT_BYTES {
            return Err(Error::InvalidRequest(format!(
                "the output constraint has {} bytes, more than {MAX_CONSTRAINT_BYTES}",
                c.source_bytes()
            )));
        }
        if let Constraint::Choice(v) = c {
            if v.is_empty() || v.iter().any(|s| s.is_empty()) {
                return Err(Error::InvalidRequest(
                    "a choice constraint needs non-empty strings".into(),
                ));
            }
        }
        if let Constraint::JsonSchema(s) = c {
            if depth(s) > MAX_SCHEMA_DEPTH {
                return Err(Error::InvalidRequest(format!(
                    "the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
                )));
            }
        }
        let short = |mut e: String| {
            if e.len() > 1024 {
                let mut cut = 1024;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
                e.push('…');
            }
            Error::InvalidRequest(format!("the output constraint: {e}"))
        };
        let parser = self
            .factory
            .create_parser(c.grammar())
            .map_err(|e| short(e.to_string()))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(short(e));
        }
        Ok(m)
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// [`Self::matcher`], to hand to a request ([`crate::request::GenerationRequest::compiled`]).
    pub fn compile(&self, c: &Constraint) -> Result<Compiled> {
        self.matcher(c).map(Compiled)
    }
}

/// A constraint compiled for one model's vocabulary, not yet started:
/// each clone is a sequence's own state (the parser and its lexer caches
/// copied), so one compilation serves every choice of a request.
pub struct Compiled(Matcher);

impl Compiled {
    /// The matcher, for the sequence that takes this copy.
    pub fn into_matcher(self) -> Matcher {
        self.0
    }
}

impl Clone for Compiled {
    fn clone(&self) -> Self {
        Compiled(self.0.deep_clone())
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compiled(..)")
    }
}

/// Sets every logit `mask` does not allow to -inf.
pub fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    for (i, l) in logits.iter_mut().enumerate() {
        if !mask.get(i) {
            *l = f32::NEG_INFINITY;
        }
    }
}
