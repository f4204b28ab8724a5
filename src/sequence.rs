//! One sequence as the scheduler tracks it: its tokens (prompt, then
//! output), how many of them are in the KV cache, its block table, and
//! whatever its owner keeps with it (`data`), so that a request has one
//! state, not a copy in the scheduler and another in the engine.

use crate::kv::{BlockHash, BlockManager};

pub type SeqId = u64;

/// A block-table entry whose block was released (out of the window).
pub const RELEASED: u32 = u32::MAX;

pub struct Sequence<T> {
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub(crate) computed: usize,
    pub(crate) blocks: Vec<u32>,
    /// Chained hashes of every full block of `tokens`, each computed once as
    /// its block fills (empty without prefix caching).
    pub(crate) block_hashes: Vec<BlockHash>,
    /// Leading blocks already offered to the prefix cache.
    pub(crate) registered: usize,
    pub(crate) use_prefix_cache: bool,
    /// Not admitted before this sequence has computed its prompt, so that
    /// the two share the prompt's blocks through the prefix cache.
    pub(crate) after: Option<SeqId>,
    /// Prompt tokens that came from the prefix cache at first admission.
    pub(crate) cached_tokens: Option<usize>,
    /// Where the block hash chain starts (the request's cache salt).
    pub(crate) hash_root: BlockHash,
    /// Positions below this need their logits (prompt log-probabilities).
    pub(crate) full_logits_until: usize,
    /// Pool blocks per logical block (KV caches the sequence keeps).
    pub(crate) width: usize,
    /// Draft tokens at the end of `tokens`, guessed rather than sampled:
    /// the next step checks them (see [`crate::speculative`]). They are
    /// never hashed for the prefix cache.
    pub(crate) drafts: usize,
    /// The owner's state of this sequence (the engine's: sampler, sink...).
    pub data: T,
}

impl<T> Sequence<T> {
    /// Prompt and output so far (drafts not included).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - self.drafts]
    }

    /// Its tokens with the drafts after them: what a step runs.
    pub(crate) fn scheduled_tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The tokens generated so far (drafts not included).
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..self.tokens.len() - self.drafts]
    }

    /// Whether its next step computes one token: the last one sampled.
    pub fn is_decoding(&self) -> bool {
        !self.blocks.is_empty() && self.computed + 1 == self.tokens.len()
    }

    /// Drops its draft tokens.
    pub(crate) fn drop_drafts(&mut self) {
        let keep = self.tokens.len() - self.drafts;
        self.tokens.truncate(keep);
        self.drafts = 0;
    }

    /// Its pool blocks: with several KV caches, each logical block's
    /// blocks in a row (see [`crate::scheduler::SeqOptions::kv_tables`]).
    pub fn block_table(&self) -> &[u32] {
        &self.blocks
    }

    /// Prompt tokens that came from the prefix cache (0 before admission).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens.unwrap_or(0)
    }

    /// Tokens to run from position `from` with `budget` tokens and `rows`
    /// full-logit rows left this step.
    pub(crate) fn chunk_len(&self, from: usize, budget: usize, rows: usize) -> usize {
        let n = (self.tokens.len() - from).min(budget);
        if from < self.full_logits_until {
            n.min(rows)
        } else {
            n
        }
    }

    /// Extends `block_hashes` over blocks of `tokens` that filled up.
    pub(crate) fn hash_full_blocks(&mut self, bs: usize) {
        if !self.use_prefix_cache {
            return;
        }
        while self.block_hashes.len() < self.tokens.len() / bs {
            let i = self.block_hashes.len();
            let prev = self.block_hashes.last().copied().unwrap_or(self.hash_root);
            let h = BlockManager::chain_hash(&prev, &self.tokens[i * bs..(i + 1) * bs]);
            self.block_hashes.push(h);
        }
    }
}
