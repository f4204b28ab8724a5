//! Output processing: turns a step's logits and hidden states into what
//! each request hears (tokens and their text, log-probabilities,
//! embeddings, the summary at the end), appending sampled tokens to the
//! sequences and ending those that are done.

use crate::adapter_registry::AdapterMix;
use crate::model::Output;
use crate::request::{
    FinishReason, GenerationRequest, GenerationSummary, PromptTokenLogprob, SeqEvent, Sink,
    TokenEvent, TokenLogprobs,
};
use crate::runner::Rows;
use crate::sampling::Sampler;
use crate::scheduler::{Chunk, Scheduler, SeqId, Sequence};
use crate::tokenizer::Tokenizer;
use std::sync::Arc;
use std::time::Instant;

/// Totals since the engine started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    /// Draft tokens checked (speculative decoding), and those accepted.
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
}

/// The engine's state of one request, kept with its sequence in the
/// scheduler (which holds its tokens: prompt, then output).
pub struct RequestState {
    /// The request, its prompt moved into the sequence.
    pub req: GenerationRequest,
    pub sampler: Sampler,
    pub text: TextAssembler,
    pub max_tokens: usize,
    pub sink: Sink,
    pub arrival: Instant,
    pub first_token: Option<Instant>,
    /// Sum of the prompt's hidden states so far (embedding requests).
    pub embed_sum: Vec<f32>,
    /// Log-probabilities of prompt tokens 1.., by position (when asked for).
    pub prompt_lps: Vec<Option<PromptTokenLogprob>>,
    /// Every adapter applied to this sequence, with its weight (and its
    /// X-LoRA, if it runs under one).
    pub mix: AdapterMix,
    /// The output constraint's state, when the request has one.
    pub matcher: Option<llguidance::Matcher>,
    /// The constraint's mask for the next token, computed while the
    /// forward pass ran (see [`crate::engine::Engine::step`]).
    pub mask: Option<std::result::Result<llguidance::toktrie::SimpleVob, String>>,
    /// Drafts rejected whole, in a row; and steps to go before drafting
    /// again (it backs off while its drafts keep failing).
    pub draft_misses: u32,
    pub draft_wait: u32,
}

impl RequestState {
    /// The state of `req`, whose prompt has been taken out (it goes to the
    /// sequence), with at most `max_tokens` to generate.
    pub fn new(req: GenerationRequest, max_tokens: usize, sink: Sink, mix: AdapterMix) -> Self {
        RequestState {
            sampler: Sampler::new(req.sampling.clone()),
            // A constrained output ends where its grammar does (or at
            // max_tokens): a stop string must not cut it short of valid.
            text: TextAssembler::new(if req.constraint.is_some() {
                &[]
            } else {
                &req.stop
            }),
            max_tokens,
            sink,
            arrival: Instant::now(),
            first_token: None,
            embed_sum: Vec::new(),
            prompt_lps: Vec::new(),
            mix,
            matcher: None,
            mask: None,
            draft_misses: 0,
            draft_wait: 0,
            req,
        }
    }
}

/// Which rows of chunk `c` of `seq` the output processor needs.
pub fn rows(seq: &Sequence<RequestState>, c: &Chunk) -> Rows {
    let req = &seq.data.req;
    if req.embed {
        Rows::AllHidden
    } else if c.drafts > 0 || req.prompt_logprobs.is_some() && c.start + 1 < seq.prompt().len() {
        Rows::AllLogits
    } else if c.completes {
        Rows::Last
    } else {
        Rows::None
    }
}

pub struct OutputProcessor {
    tokenizer: Arc<Tokenizer>,
    vocab: usize,
    hidden: usize,
    pub counters: Counters,
}

impl OutputProcessor {
    /// For a model of `vocab` logits and `hidden` states per row.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize, hidden: usize) -> Self {
        OutputProcessor {
            tokenizer,
            vocab,
            hidden,
            counters: Counters::default(),
        }
    }

    /// Turns the outputs of a step that ran `chunks` into tokens and
    /// embeddings.
    pub fn process(
        &mut self,
        sched: &mut Scheduler<RequestState>,
        chunks: &[Chunk],
        mut out: Output,
    ) {
        let (vocab, h) = (self.vocab, self.hidden);
        let mut logit_rows = out.logits.chunks_exact_mut(vocab);
        let mut hidden_rows = out.hidden.chunks_exact(h);
        for c in chunks {
            let seq = sched.get_mut(c.id).expect("scheduled requests are active");
            let plan = rows(seq, c);
            let a = &mut seq.data;
            if a.req.embed {
                if c.start == 0 {
                    // Recomputed from the start after a preemption.
                    a.embed_sum = vec![0.0; h];
                }
                for row in hidden_rows.by_ref().take(c.len) {
                    a.embed_sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                if c.completes {
                    let mut v = std::mem::take(&mut a.embed_sum);
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    if norm > 0.0 {
                        v.iter_mut().for_each(|x| *x /= norm);
                    }
                    let tokens = seq.prompt_len;
                    (a.sink)(SeqEvent::Embedding { vector: v, tokens });
                    self.counters.prompt_tokens += tokens as u64;
                    self.finish(sched, c.id, FinishReason::Stop);
                }
                continue;
            }
            if c.drafts > 0 {
                let rows: Vec<&mut [f32]> = logit_rows.by_ref().take(c.drafts + 1).collect();
                self.verify(sched, c.id, rows);
                continue;
            }
            if plan == Rows::AllLogits {
                let k = a.req.prompt_logprobs.unwrap_or(0);
                let n = seq.prompt_len;
                a.prompt_lps.resize(n - 1, None);
                let mut last = None;
                for pos in c.start..c.start + c.len {
                    let row = logit_rows.next().expect("a logit row per position");
                    if pos + 1 < n {
                        a.prompt_lps[pos] = Some(prompt_logprob(row, seq.tokens[pos + 1], k));
                    }
                    last = Some(row);
                }
                if c.completes {
                    let row = last.expect("a chunk has at least one token");
                    if let Some(reason) = self.sample(sched, c.id, row) {
                        self.finish(sched, c.id, reason);
                    }
                }
                continue;
            }
            if !c.completes {
                continue;
            }
            let logits = logit_rows.next().expect("a logit row per completed chunk");
            if let Some(reason) = self.sample(sched, c.id, logits) {
                self.finish(sched, c.id, reason);
            }
        }
    }

    /// Samples a token from each row of a chunk that ended with draft
    /// tokens, as plain decoding would, while the sampled tokens equal the
    /// drafts: row j follows the last sampled token and the first j
    /// drafts. The first token that differs (or the one after every
    /// draft) ends the step, and the rest of the drafts' keys and values
    /// are left to be overwritten.
    fn verify(&mut self, sched: &mut Scheduler<RequestState>, id: SeqId, rows: Vec<&mut [f32]>) {
        let drafts = sched.take_drafts(id);
        self.counters.draft_tokens += drafts.len() as u64;
        let mut accepted = 0;
        for (j, row) in rows.into_iter().enumerate() {
            if let Some(reason) = self.sample(sched, id, row) {
                self.finish(sched, id, reason);
                return;
            }
            let Some(seq) = sched.get(id) else { return };
            let last = *seq.tokens().last().expect("a token was appended");
            if drafts.get(j) != Some(&last) {
                break;
            }
            accepted += 1;
            sched.keep_computed(id);
        }
        self.counters.accepted_draft_tokens += accepted as u64;
        sched.trim_surplus(id);
        if let Some(s) = sched.get_mut(id) {
            let a = &mut s.data;
            if accepted == 0 {
                // 1, 3, 7, 15 steps without drafts after failures in a row.
                a.draft_misses = (a.draft_misses + 1).min(4);
                a.draft_wait = (1 << a.draft_misses) - 1;
            } else {
                a.draft_misses = 0;
            }
        }
    }

    /// Hands a request its prompt log-probabilities, once, before its
    /// first token.
    fn send_prompt_logprobs(a: &mut RequestState) {
        if a.first_token.is_some() || a.req.prompt_logprobs.is_none() {
            return;
        }
        // Empty for a one-token prompt (nothing scores its only token).
        let lps = std::mem::take(&mut a.prompt_lps)
            .into_iter()
            .map(|e| e.expect("every prompt position was computed"))
            .collect();
        (a.sink)(SeqEvent::PromptLogprobs(lps));
    }

    /// Picks a sequence's next token, appends it and tells the sink;
    /// returns why the request ends, if it does.
    fn sample(
        &mut self,
        sched: &mut Scheduler<RequestState>,
        id: SeqId,
        logits: &mut [f32],
    ) -> Option<FinishReason> {
        let a = &mut sched.get_mut(id).expect("active").data;
        Self::send_prompt_logprobs(a);
        let lp = a.req.logprobs.map(|k| log_softmax_top(logits, k));
        let mask = match (a.mask.take(), a.matcher.as_mut()) {
            (Some(ready), _) => Some(ready),
            (None, Some(m)) => Some(m.compute_mask_or_eos().map_err(|e| e.to_string())),
            (None, None) => None,
        };
        match mask {
            Some(Ok(mask)) => crate::constraint::apply_mask(&mask, logits),
            Some(Err(e)) => return self.fail(sched, id, &e),
            None => {}
        }
        let tok = a.sampler.sample(logits);
        a.sampler.observe(tok);
        // The constraint follows the token (EOS included: it ends it).
        let mut complete = false;
        if let Some(m) = a.matcher.as_mut() {
            if let Err(e) = m.consume_token(tok) {
                return self.fail(sched, id, &format!("{e}"));
            }
            complete = m.is_stopped();
        }
        sched.append(id, tok);
        self.counters.generation_tokens += 1;
        let seq = sched.get_mut(id).expect("active");
        let a = &mut seq.data;
        if a.first_token.is_none() {
            a.first_token = Some(Instant::now());
            self.counters.prompt_tokens += seq.prompt_len as u64;
            self.counters.prefix_cache_hit_tokens += seq.cached_tokens.unwrap_or(0) as u64;
        }
        if !a.req.ignore_eos && self.tokenizer.special.stop.contains(&tok) {
            return Some(FinishReason::Stop);
        }
        let (mut piece, hit_stop) = a.text.push(self.tokenizer.token_bytes(tok));
        let out_of_room = !hit_stop && seq.tokens.len() - seq.prompt_len >= a.max_tokens;
        if out_of_room {
            // The last token carries what was held back, not an extra event.
            piece.push_str(&a.text.finish());
        }
        let logprobs = lp.map(|(all, top)| TokenLogprobs {
            logprob: all[tok as usize],
            top,
        });
        let alive = (a.sink)(SeqEvent::Token(TokenEvent {
            id: tok,
            text: piece,
            logprobs,
        }));
        if !alive {
            return Some(FinishReason::Cancelled);
        }
        if hit_stop || complete {
            return Some(FinishReason::Stop);
        }
        if out_of_room {
            return Some(FinishReason::Length);
        }
        None
    }

    /// Ends a request whose output constraint could not go on (its
    /// grammar ran past the library's limits for one token).
    fn fail(
        &mut self,
        sched: &mut Scheduler<RequestState>,
        id: SeqId,
        why: &str,
    ) -> Option<FinishReason> {
        if let Some(mut s) = sched.finish(id) {
            (s.data.sink)(SeqEvent::Failed(crate::Error::InvalidRequest(format!(
                "the output constraint could not go on: {why}"
            ))));
        }
        None
    }

    /// Ends a request: its blocks go back, its sink hears the rest of the
    /// text and the summary.
    pub fn finish(&mut self, sched: &mut Scheduler<RequestState>, id: SeqId, finish: FinishReason) {
        let Some(seq) = sched.finish(id) else {
            return;
        };
        let cached_tokens = seq.cached_tokens();
        let tokens = seq.output().to_vec();
        let prompt_tokens = seq.prompt_len;
        let mut a = seq.data;
        if a.req.embed && finish != FinishReason::Cancelled {
            return; // the embedding was its answer
        }
        let tail = a.text.finish();
        if !tail.is_empty() && finish != FinishReason::Cancelled {
            (a.sink)(SeqEvent::Token(TokenEvent {
                id: *tokens.last().unwrap_or(&0),
                text: tail,
                logprobs: None,
            }));
        }
        let now = Instant::now();
        let first = a.first_token.unwrap_or(now);
        tracing::debug!(
            seq = id,
            prompt = prompt_tokens,
            cached = cached_tokens,
            generated = tokens.len(),
            finish = finish.as_str(),
            "request done"
        );
        (a.sink)(SeqEvent::Finished(GenerationSummary {
            tokens,
            text: a.text.emitted,
            finish,
            prompt_tokens,
            cached_tokens,
            prefill_secs: (first - a.arrival).as_secs_f64(),
            decode_secs: (now - first).as_secs_f64(),
        }));
    }
}

/// The log-probability and rank of `token` under `logits`, with the `k`
/// most likely alternatives.
/// No allocation beyond the `k` alternatives: this runs for every prompt
/// position of a request that asks, on the engine's thread.
fn prompt_logprob(logits: &[f32], token: u32, k: usize) -> PromptTokenLogprob {
    let lse = log_sum_exp(logits);
    let own = logits[token as usize];
    PromptTokenLogprob {
        id: token,
        logprob: own - lse,
        rank: 1 + logits.iter().filter(|&&l| l > own).count(),
        top: top_k(logits, k)
            .into_iter()
            .map(|(i, l)| (i, l - lse))
            .collect(),
    }
}

/// ln Σ exp(logits), stable.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest logits, largest first (ties: lower id first).
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    #[derive(PartialEq)]
    struct Entry(f32, Reverse<u32>);
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Entry {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
        }
    }
    if k == 0 {
        return Vec::new();
    }
    // A min-heap of the best k so far.
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        let e = Entry(l, Reverse(i as u32));
        if heap.len() < k {
            heap.push(Reverse(e));
        } else if heap.peek().is_some_and(|Reverse(min)| e > *min) {
            heap.pop();
            heap.push(Reverse(e));
        }
    }
    let mut top: Vec<(u32, f32)> = heap
        .into_iter()
        .map(|Reverse(Entry(l, Reverse(i)))| (i, l))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

/// Log-probabilities of every token (natural log) and the `k` most likely.
fn log_softmax_top(logits: &[f32], k: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let lse = log_sum_exp(logits);
    let all: Vec<f32> = logits.iter().map(|&v| v - lse).collect();
    let top = top_k(&all, k);
    (all, top)
}

/// Turns token bytes into text: holds back incomplete UTF-8 and any tail that
/// might begin a stop string, and cuts the text at a stop string.
pub struct TextAssembler {
    stops: Vec<String>,
    bytes: Vec<u8>,
    pending: String,
    pub emitted: String,
}

impl TextAssembler {
    pub fn new(stops: &[String]) -> Self {
        TextAssembler {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            bytes: Vec::new(),
            pending: String::new(),
            emitted: String::new(),
        }
    }

    /// Adds a token's bytes; returns the text that is now final and whether
    /// a stop string was reached.
    pub fn push(&mut self, b: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(b);
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.pending.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.pending
                        .push_str(std::str::from_utf8(&self.bytes[..valid]).expect("valid prefix"));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.bytes.drain(..valid);
                            break;
                        }
                        Some(n) => {
                            self.pending.push('\u{FFFD}');
                            self.bytes.drain(..valid + n);
                        }
                    }
                }
            }
        }
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..i].to_string();
            self.emitted.push_str(&out);
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out: String = self.pending.drain(..cut).collect();
        self.emitted.push_str(&out);
        (out, false)
    }

    /// Flushes what was held back (generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.pending);
        if !self.bytes.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.bytes));
            self.bytes.clear();
        }
        self.emitted.push_str(&out);
        out
    }
}
