//! Tokenizers taken from the model itself.
//!
//! * GGUF `gpt2` vocabularies: byte-level BPE (Hugging Face `tokenizers`)
//!   behind the pre-tokenizer regexes that llama.cpp uses for the named `pre`.
//! * GGUF `llama` vocabularies: SentencePiece merging by score, written here
//!   to match llama.cpp exactly.
//! * Hugging Face folders: `tokenizer.json` through `tokenizers`.
//!
//! For GGUF vocabularies, special-token text in the input (control and
//! user-defined tokens) is split out first, longest token first, as
//! llama.cpp does; the remaining fragments go through the model.

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

/// Token ids with special roles.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    /// Tokens that end generation: EOS and the model's end-of-turn tokens.
    pub stop: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// End-of-generation token texts recognised by name, as llama.cpp does.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|eom_id|>",
];

#[allow(clippy::large_enum_variant)] // one per tokenizer, never moved in a hot path
enum Model {
    /// BPE over fragments between special tokens.
    Bpe(tokenizers::Tokenizer),
    Spm(Spm),
    /// A complete HF tokenizer (does its own special-token handling).
    Hf(tokenizers::Tokenizer),
}

pub struct Tokenizer {
    model: Model,
    pub special: SpecialTokens,
    /// Bytes each token stands for in generated text (empty for control tokens).
    pieces: Vec<Vec<u8>>,
    /// Literal text of each token, for display and template variables.
    texts: Vec<String>,
    is_control: Vec<bool>,
    /// Finds the tokens split out of the input before the model runs.
    specials: Option<SpecialSplitter>,
    /// Raw `tokenizer.ggml.pre` or "hf".
    pub pre: String,
    /// See [`Tokenizer::max_token_bytes`]; found once at load, since every
    /// request's length check reads it.
    max_token_bytes: usize,
}

/// The longest piece or text of any token, at least 1.
fn longest_token(pieces: &[Vec<u8>], texts: &[String]) -> usize {
    pieces
        .iter()
        .map(Vec::len)
        .chain(texts.iter().map(String::len))
        .max()
        .unwrap_or(1)
        .max(1)
}

impl Tokenizer {
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The most bytes of text one token stands for: a text longer than
    /// `n` times this cannot encode to fewer than `n` tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(|s| s.as_str())
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.is_control.get(id as usize).copied().unwrap_or(false)
    }

    /// A text cut as llama-perplexity and llama-imatrix cut it: tokenized
    /// whole with BOS (when the model wants one), which shifts every window
    /// by that token, then up to `max` windows of `window` tokens, each
    /// starting with BOS in place of its first token. Also returns how many
    /// tokens the text has (for saying why there are no windows).
    pub fn bos_windows(
        &self,
        text: &str,
        window: usize,
        max: usize,
    ) -> Result<(Vec<Vec<u32>>, usize)> {
        let tokens = self.encode(text, true)?;
        let bos = self.special.bos.filter(|_| self.special.add_bos);
        let windows = tokens
            .chunks_exact(window.max(1))
            .take(max)
            .map(|w| {
                let mut w = w.to_vec();
                if let Some(b) = bos {
                    w[0] = b;
                }
                w
            })
            .collect();
        Ok((windows, tokens.len()))
    }

    /// Encodes text. With `add_special`, BOS/EOS are added as the model's
    /// metadata says. Special-token text always becomes the special token.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_special && self.special.add_bos {
            ids.extend(self.special.bos);
        }
        match &self.model {
            Model::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            _ => {
                for frag in self.split_special(text) {
                    match frag {
                        Fragment::Token(id) => ids.push(id),
                        Fragment::Text(s) => match &self.model {
                            Model::Bpe(t) => {
                                let enc = t
                                    .encode(s, false)
                                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                                ids.extend_from_slice(enc.get_ids());
                            }
                            Model::Spm(spm) => spm.encode(&s.replace(' ', "\u{2581}"), &mut ids),
                            Model::Hf(_) => unreachable!(),
                        },
                    }
                }
            }
        }
        if add_special && self.special.add_eos {
            ids.extend(self.special.eos);
        }
        Ok(ids)
    }

    /// Cuts `text` at every special token's text, leftmost first and the
    /// longest at each place, in one pass over the text whatever the
    /// number of special tokens (Gemma 3 has thousands).
    fn split_special<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let Some(sp) = &self.specials else {
            return vec![Fragment::Text(text)];
        };
        let mut frags = Vec::new();
        let mut at = 0;
        for m in sp.finder.find_iter(text) {
            if m.start() > at {
                frags.push(Fragment::Text(&text[at..m.start()]));
            }
            frags.push(Fragment::Token(sp.ids[m.pattern().as_usize()]));
            at = m.end();
        }
        if at < text.len() {
            frags.push(Fragment::Text(&text[at..]));
        }
        frags
    }

    /// The bytes a token contributes to generated text (control tokens: none).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces
            .get(id as usize)
            .map(|p| p.as_slice())
            .unwrap_or(&[])
    }

    /// Decodes ids to text. Control tokens are dropped unless `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if keep_special && self.is_control(id) {
                bytes.extend_from_slice(self.token_text(id).unwrap_or("").as_bytes());
            } else {
                bytes.extend_from_slice(self.token_bytes(id));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model_name = g
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Tokenizer("GGUF has no tokenizer.ggml.model".into()))?;
        let tokens: Vec<String> = strings(g, "tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::Tokenizer("GGUF has no tokenizer.ggml.tokens".into()))?;
        let n = tokens.len();
        let types: Vec<i64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Some(_) => {
                return Err(Error::Tokenizer(
                    "token_type length differs from tokens".into(),
                ))
            }
            None => vec![1; n],
        };
        let id = |k: &str| -> Option<u32> {
            g.get(k)
                .and_then(|v| v.as_u64())
                .filter(|&v| (v as usize) < n)
                .map(|v| v as u32)
        };
        let flag = |k: &str| g.get(k).and_then(|v| v.as_bool());
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let (model, pieces, add_bos_default): (Model, Vec<Vec<u8>>, bool) = match model_name {
            "gpt2" => {
                let merges = strings(g, "tokenizer.ggml.merges")?.unwrap_or_default();
                let byte_of = byte_decoder();
                let pieces = tokens
                    .iter()
                    .zip(&types)
                    .map(|(t, &ty)| match ty {
                        TYPE_CONTROL => Vec::new(),
                        TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                        _ => t
                            .chars()
                            .map(|c| byte_of.get(&c).copied().unwrap_or(b'?'))
                            .collect(),
                    })
                    .collect();
                (
                    Model::Bpe(bpe_tokenizer(&tokens, &merges, &pre)?),
                    pieces,
                    false,
                )
            }
            "llama" => {
                let scores: Vec<f32> =
                    match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                        Some(a) if a.len() == n => {
                            a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
                        }
                        _ => vec![0.0; n],
                    };
                let pieces = tokens
                    .iter()
                    .zip(&types)
                    .map(|(t, &ty)| match ty {
                        TYPE_CONTROL => Vec::new(),
                        TYPE_BYTE => parse_byte_token(t).map(|b| vec![b]).unwrap_or_default(),
                        _ => t.replace('\u{2581}', " ").into_bytes(),
                    })
                    .collect();
                let spm = Spm::new(&tokens, &types, scores);
                (Model::Spm(spm), pieces, true)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model '{other}' (gpt2 and llama are supported)"
                )))
            }
        };
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| {
                (ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED) && !t.is_empty()
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        // Of tokens with the same text, the lowest id wins.
        specials.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        specials.dedup_by(|a, b| a.0 == b.0);
        let specials = SpecialSplitter::new(specials)?;

        let eos = id("tokenizer.ggml.eos_token_id");
        let mut stop: Vec<u32> = eos
            .into_iter()
            .chain(id("tokenizer.ggml.eot_token_id"))
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            if EOG_NAMES.contains(&t.as_str()) && !stop.contains(&(i as u32)) {
                stop.push(i as u32);
            }
        }
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            pad: id("tokenizer.ggml.padding_token_id"),
            unk: id("tokenizer.ggml.unknown_token_id"),
            stop,
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default),
            add_eos: flag("tokenizer.ggml.add_eos_token").unwrap_or(false),
        };
        Ok(Tokenizer {
            model,
            special,
            max_token_bytes: longest_token(&pieces, &tokens),
            pieces,
            is_control: types.iter().map(|&t| t == TYPE_CONTROL).collect(),
            texts: tokens,
            specials,
            pre,
        })
    }

    /// Loads `tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS rules).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tk = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: serde_json::Value =
            read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let gen_cfg: serde_json::Value =
            read_json(&dir.join("generation_config.json"))?.unwrap_or_default();
        let model_cfg: serde_json::Value = read_json(&dir.join("config.json"))?.unwrap_or_default();
        let n = tk.get_vocab_size(true);
        let mut texts = vec![String::new(); n];
        for (t, i) in tk.get_vocab(true) {
            if (i as usize) < n {
                texts[i as usize] = t;
            }
        }
        let added = tk.get_added_tokens_decoder();
        let mut is_control = vec![false; n];
        for (i, at) in &added {
            if at.special && (*i as usize) < n {
                is_control[*i as usize] = true;
            }
        }
        let byte_level = tokenizer_json_uses_byte_level(&path);
        let byte_of = byte_decoder();
        let pieces: Vec<Vec<u8>> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if is_control[i] {
                    Vec::new()
                } else if added.contains_key(&(i as u32)) {
                    t.as_bytes().to_vec()
                } else if byte_level {
                    t.chars()
                        .map(|c| byte_of.get(&c).copied().unwrap_or(b'?'))
                        .collect()
                } else if let Some(b) = parse_byte_token(t) {
                    vec![b]
                } else {
                    t.replace('\u{2581}', " ").into_bytes()
                }
            })
            .collect();
        let token_of = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tk.token_to_id(s)
        };
        let id_of = |v: &serde_json::Value| -> Vec<u32> {
            match v {
                serde_json::Value::Number(n) => {
                    n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
                }
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let bos = token_of("bos_token").or_else(|| {
            model_cfg
                .get("bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
        });
        let eos = token_of("eos_token").or_else(|| {
            id_of(
                model_cfg
                    .get("eos_token_id")
                    .unwrap_or(&serde_json::Value::Null),
            )
            .first()
            .copied()
        });
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for id in id_of(
            gen_cfg
                .get("eos_token_id")
                .unwrap_or(&serde_json::Value::Null),
        ) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
        for name in EOG_NAMES {
            if let Some(id) = tk.token_to_id(name) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        let special = SpecialTokens {
            bos,
            eos,
            pad: token_of("pad_token"),
            unk: token_of("unk_token"),
            stop,
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            add_eos: cfg
                .get("add_eos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        Ok(Tokenizer {
            model: Model::Hf(tk),
            special,
            max_token_bytes: longest_token(&pieces, &texts),
            pieces,
            texts,
            is_control,
            specials: None,
            pre: "hf".into(),
        })
    }
}

/// An automaton over the texts of special tokens.
struct SpecialSplitter {
    finder: aho_corasick::AhoCorasick,
    ids: Vec<u32>,
}

impl SpecialSplitter {
    fn new(specials: Vec<(String, u32)>) -> Result<Option<Self>> {
        if specials.is_empty() {
            return Ok(None);
        }
        let finder = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(specials.iter().map(|(t, _)| t))
            .map_err(|e| Error::Tokenizer(format!("special tokens: {e}")))?;
        Ok(Some(SpecialSplitter {
            finder,
            ids: specials.into_iter().map(|(_, id)| id).collect(),
        }))
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn tokenizer_json_uses_byte_level(path: &Path) -> bool {
    let Ok(Some(j)) = read_json(path) else {
        return false;
    };
    let is_bl = |v: Option<&serde_json::Value>| -> bool {
        match v {
            Some(v) if v.get("type").and_then(|t| t.as_str()) == Some("ByteLevel") => true,
            Some(v) => v
                .get("decoders")
                .or_else(|| v.get("pretokenizers"))
                .and_then(|d| d.as_array())
                .is_some_and(|a| {
                    a.iter()
                        .any(|x| x.get("type").and_then(|t| t.as_str()) == Some("ByteLevel"))
                }),
            None => false,
        }
    };
    is_bl(j.get("decoder")) || is_bl(j.get("pre_tokenizer"))
}

/// More entries than any real vocabulary or merge list has (Gemma 3's
/// vocabulary is 262,144): a crafted file cannot make the tokenizer expand
/// capped GGUF metadata into gigabytes of `String`s.
const MAX_TOKENIZER_ENTRIES: usize = 1 << 22;

fn strings(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) if a.len() > MAX_TOKENIZER_ENTRIES => Err(Error::Tokenizer(format!(
            "{key} has {} entries (at most {MAX_TOKENIZER_ENTRIES} allowed)",
            a.len()
        ))),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| Error::Tokenizer(format!("{key} holds non-strings"))),
        Some(_) => Err(Error::Tokenizer(format!("{key} is not an array"))),
    }
}

fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's reversible byte ↔ printable-unicode mapping, decoding direction.
fn byte_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::new();
    let mut extra = 0;
    for b in 0..=255u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map.insert(char::from_u32(c).expect("valid"), b as u8);
    }
    map
}

/// llama.cpp's pre-tokenizer regexes for the named GGUF `pre` types.
fn pre_regexes(pre: &str) -> Vec<&'static str> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            vec![LLAMA3]
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" => vec![QWEN2],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        _ => vec![GPT2],
    }
}

fn bpe_tokenizer(tokens: &[String], merges: &[String], pre: &str) -> Result<tokenizers::Tokenizer> {
    use serde_json::json;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let mut pretok: Vec<serde_json::Value> = pre_regexes(pre)
        .into_iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    pretok.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretok},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": matches!(pre, "llama3" | "llama-bpe" | "llama-v3"),
            "vocab": vocab, "merges": merges,
        }
    });
    spec.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::Tokenizer(format!("building BPE tokenizer: {e}")))
}

/// SentencePiece-style tokenizer: merges adjacent symbols, best score first,
/// as llama.cpp's `llm_tokenizer_spm` does.
struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    // Highest score first; among equals, the leftmost.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    fn new(tokens: &[String], types: &[i64], scores: Vec<f32>) -> Self {
        let mut byte_ids = [None; 256];
        for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
            if ty == TYPE_BYTE {
                if let Some(b) = parse_byte_token(t) {
                    byte_ids[b as usize] = Some(i as u32);
                }
            }
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        Spm {
            ids,
            scores,
            byte_ids,
        }
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        if syms.is_empty() {
            return;
        }
        let mut queue = BinaryHeap::new();
        let try_add =
            |l: Option<usize>, r: Option<usize>, syms: &[Sym], queue: &mut BinaryHeap<Bigram>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                let s = &text[syms[l].start..syms[l].start + syms[l].len + syms[r].len];
                if let Some(&id) = self.ids.get(s) {
                    queue.push(Bigram {
                        score: self.scores[id as usize],
                        left: l,
                        right: r,
                        size: s.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(Some(i - 1), Some(i), &syms, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            let (prev, next) = (syms[l].prev, syms[l].next);
            try_add(prev, Some(l), &syms, &mut queue);
            try_add(Some(l), next, &syms, &mut queue);
        }
        // Every merged symbol is a vocabulary entry; single characters that
        // are not fall back to their bytes.
        let mut i = Some(0);
        while let Some(idx) = i {
            let s = &text[syms[idx].start..syms[idx].start + syms[idx].len];
            match self.ids.get(s) {
                Some(&id) => out.push(id),
                None => out.extend(s.bytes().filter_map(|b| self.byte_ids[b as usize])),
            }
            i = syms[idx].next;
        }
    }
}
