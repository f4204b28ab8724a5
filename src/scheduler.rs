//! Decides, step by step, which tokens of which sequences run next.
//!
//! The scheduler sees sequences only as token lists and KV block tables; it
//! knows nothing of the model. Each step it hands out a token budget: first
//! to running sequences (a decode is one token, an unfinished prompt gets a
//! chunk), oldest first, then to waiting sequences in arrival order. When
//! the block pool runs dry it preempts the most recently admitted sequence:
//! its blocks are released (they stay in the prefix cache while nobody needs
//! them) and it goes back to the front of the queue to be recomputed later.
//! The oldest sequence therefore always makes progress, and since no sequence
//! may outgrow the pool, every one finishes.

use crate::kv::BlockManager;
pub use crate::sequence::{SeqId, Sequence, RELEASED};
use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Tokens one step may run, across all sequences.
    pub max_batched_tokens: usize,
    /// Sequences that may hold KV blocks at once.
    pub max_num_seqs: usize,
    /// When every position attends to at most this many recent positions
    /// (a model whose layers all use one sliding window), blocks that fell
    /// out of the window are released while the sequence runs.
    pub window: Option<usize>,
    /// Prompt tokens one step may run for sequences that want the logits of
    /// every position (each such row costs a vocabulary of floats).
    pub max_full_logit_rows: usize,
}

/// How a sequence is to be scheduled.
#[derive(Debug, Clone, Default)]
pub struct SeqOptions {
    /// Start from the longest cached prefix (unless `full_logits`), and
    /// offer full blocks to the cache.
    pub use_prefix_cache: bool,
    /// Not admitted before this sequence has computed its prompt, so that
    /// the two share the prompt's blocks through the prefix cache.
    pub after: Option<SeqId>,
    /// Prefix-cache hits only among sequences with the same salt.
    pub cache_salt: Option<String>,
    /// The logits of every prompt position are wanted: prompt chunks are
    /// bounded by [`SchedulerConfig::max_full_logit_rows`].
    pub full_logits: bool,
    /// KV caches the sequence keeps (0 counts as 1): each logical block of
    /// its table is this many pool blocks in a row (X-LoRA keeps a second
    /// cache for its scaling pass). Only single-cache sequences use the
    /// prefix cache.
    pub kv_tables: usize,
}

/// `len` tokens of sequence `id` from position `start`, to run this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of the sequence's tokens: its last row's
    /// logits choose the next token.
    pub completes: bool,
    /// Draft tokens that end the chunk: every row's logits are wanted, to
    /// check them (then it `completes`).
    pub drafts: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: usize,
    /// Held by live sequences.
    pub blocks_used: usize,
    /// Free but kept for prefix reuse.
    pub blocks_cached: usize,
    pub preemptions: u64,
}

/// Sequences with the owner's state `T` of each (`()` when it keeps none).
pub struct Scheduler<T = ()> {
    cfg: SchedulerConfig,
    block_size: usize,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence<T>>,
    /// Admitted sequences, oldest first.
    running: Vec<SeqId>,
    waiting: VecDeque<SeqId>,
    preemptions: u64,
}

impl<T> Scheduler<T> {
    pub fn new(n_blocks: usize, block_size: usize, cfg: SchedulerConfig) -> Self {
        Scheduler {
            cfg: SchedulerConfig {
                max_batched_tokens: cfg.max_batched_tokens.max(1),
                max_num_seqs: cfg.max_num_seqs.max(1),
                window: cfg.window.filter(|&w| w > 0),
                max_full_logit_rows: cfg.max_full_logit_rows.max(1),
            },
            block_size,
            blocks: BlockManager::new(n_blocks),
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            preemptions: 0,
        }
    }

    /// Tokens the whole pool holds: no sequence may grow longer.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks.n_blocks() * self.block_size
    }

    /// Queues a sequence, with its owner's state. `tokens` must not be empty.
    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>, opts: SeqOptions, data: T) {
        debug_assert!(!tokens.is_empty());
        let SeqOptions {
            use_prefix_cache,
            after,
            cache_salt,
            full_logits,
            kv_tables,
        } = opts;
        let width = kv_tables.max(1);
        let mut s = Sequence {
            data,
            hash_root: BlockManager::chain_root(cache_salt.as_deref()),
            full_logits_until: if full_logits { tokens.len() - 1 } else { 0 },
            prompt_len: tokens.len(),
            tokens,
            computed: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            registered: 0,
            use_prefix_cache: use_prefix_cache && width == 1,
            after,
            cached_tokens: None,
            width,
            drafts: 0,
        };
        s.hash_full_blocks(self.block_size);
        self.seqs.insert(id, s);
        self.waiting.push_back(id);
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence<T>> {
        self.seqs.get(&id)
    }

    /// The sequence, to change its owner's state (`data`).
    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence<T>> {
        self.seqs.get_mut(&id)
    }

    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Every sequence, queued or running, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (SeqId, &Sequence<T>)> {
        self.seqs.iter().map(|(&id, s)| (id, s))
    }

    /// Prompt and output so far (drafts not included).
    pub fn tokens(&self, id: SeqId) -> &[u32] {
        self.seqs[&id].tokens()
    }

    pub fn block_table(&self, id: SeqId) -> &[u32] {
        &self.seqs[&id].blocks
    }

    pub fn cached_tokens(&self, id: SeqId) -> usize {
        self.seqs
            .get(&id)
            .and_then(|s| s.cached_tokens)
            .unwrap_or(0)
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        let total = self.blocks.n_blocks();
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            blocks_total: total,
            blocks_used: total - self.blocks.n_available(),
            blocks_cached: self.blocks.n_cached_idle(),
            preemptions: self.preemptions,
        }
    }

    /// The chunks to run this step (empty when there is nothing to do).
    pub fn schedule(&mut self) -> Vec<Chunk> {
        let mut budget = self.cfg.max_batched_tokens;
        let mut rows = self.cfg.max_full_logit_rows;
        let mut out = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = self.seqs.get_mut(&id).expect("running");
            if s.drafts > 0 {
                // Drafts run whole or not at all, and only with what is
                // spare: budget, full-logit rows, and blocks that are free,
                // hold no cached prefix and are left over once every later
                // running sequence has one to grow into.
                let total = s.tokens.len() - s.computed;
                let new_blocks = ((s.computed + total).div_ceil(self.block_size) * s.width)
                    .saturating_sub(s.blocks.len());
                let spare = self.blocks.n_available() - self.blocks.n_cached_idle();
                let later = self.running.len() - i - 1;
                if total > budget || total > rows || new_blocks + later > spare {
                    s.drop_drafts();
                }
            }
            let n = s.chunk_len(s.computed, budget, rows);
            let need = (s.computed + n).div_ceil(self.block_size) * s.width;
            let mut fits = true;
            while self.seqs[&id].blocks.len() < need {
                if let Some(b) = self.blocks.allocate() {
                    self.seqs.get_mut(&id).expect("running").blocks.push(b);
                    continue;
                }
                // Drafts were checked against the free blocks above.
                debug_assert_eq!(self.seqs[&id].drafts, 0, "drafts ran out of blocks");
                // The newest sequence sits at or after `i`, so nothing
                // already scheduled this step is taken away.
                let victim = *self.running.last().expect("running is not empty");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            let s = &self.seqs[&id];
            if n > 0 {
                out.push(Chunk {
                    id,
                    start: s.computed,
                    len: n,
                    completes: s.computed + n == s.tokens.len(),
                    drafts: s.drafts,
                });
                budget -= n;
                if s.computed < s.full_logits_until {
                    rows -= n;
                }
                if s.drafts > 0 {
                    // Every row of a drafted chunk is a vocabulary of logits.
                    rows -= n;
                }
            }
            i += 1;
        }
        // Admitting anyone right after a preemption would only thrash.
        if preempted {
            return out;
        }
        let mut w = 0;
        while w < self.waiting.len() && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let id = self.waiting[w];
            let s = &self.seqs[&id];
            let blocked = s
                .after
                .and_then(|a| self.seqs.get(&a))
                .is_some_and(|lead| lead.computed < lead.prompt_len);
            if blocked {
                w += 1;
                continue;
            }
            // At least one token is left to compute: its logits are needed.
            // A sequence that wants every prompt position's logits computes
            // them all (its blocks still go to the cache).
            let usable = if s.full_logits_until > 0 {
                0
            } else {
                (s.tokens.len() - 1) / self.block_size
            };
            let table = self
                .blocks
                .lookup_prefix(&s.block_hashes[..usable.min(s.block_hashes.len())]);
            let computed = table.len() * self.block_size;
            let n = s.chunk_len(computed, budget, rows);
            let need = (computed + n).div_ceil(self.block_size) * s.width - table.len();
            if n == 0 {
                // Out of full-logit rows this step: the others may go.
                self.release_lookup(&table);
                w += 1;
                continue;
            }
            // Leave every running sequence a block to grow into.
            if need + self.running.len() > self.blocks.n_available() {
                self.release_lookup(&table);
                break;
            }
            let s = self.seqs.get_mut(&id).expect("waiting");
            s.registered = table.len();
            s.blocks = table;
            s.computed = computed;
            s.cached_tokens.get_or_insert(computed.min(s.prompt_len));
            for _ in 0..need {
                let b = self.blocks.allocate().expect("checked available blocks");
                s.blocks.push(b);
            }
            out.push(Chunk {
                id,
                start: computed,
                len: n,
                completes: computed + n == s.tokens.len(),
                drafts: 0,
            });
            budget -= n;
            if computed < s.full_logits_until {
                rows -= n;
            }
            self.waiting.remove(w);
            self.running.push(id);
        }
        out
    }

    /// Records that `chunks` ran: their tokens are now cached, and blocks
    /// that filled up become reusable prefixes.
    pub fn commit(&mut self, chunks: &[Chunk]) {
        let bs = self.block_size;
        for c in chunks {
            let Some(s) = self.seqs.get_mut(&c.id) else {
                continue;
            };
            s.computed = s.computed.max(c.start + c.len);
            let full = (s.computed / bs).min(s.block_hashes.len());
            for i in s.registered..full {
                if s.blocks[i] != RELEASED {
                    self.blocks.register(s.blocks[i], s.block_hashes[i]);
                }
            }
            s.registered = s.registered.max(full);
            // The next position attends back to computed + 1 - window at
            // the earliest; blocks wholly before that are never read again.
            // (Drafts not counted: they may be rolled back.)
            if let Some(w) = self.cfg.window {
                let needed_from = (s.computed - s.drafts.min(s.computed) + 1).saturating_sub(w);
                for b in s.blocks.iter_mut().take(needed_from / bs * s.width) {
                    if *b != RELEASED {
                        self.blocks.release(&[*b]);
                        *b = RELEASED;
                    }
                }
            }
        }
    }

    /// Adds a generated token to a sequence; it runs in the next step.
    pub fn append(&mut self, id: SeqId, token: u32) {
        let bs = self.block_size;
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
            s.hash_full_blocks(bs);
        }
    }

    /// Puts draft tokens after a decoding sequence's last token, for the
    /// next step to check (see [`crate::speculative`]); ignored unless it
    /// is decoding and has none.
    pub fn set_drafts(&mut self, id: SeqId, drafts: &[u32]) {
        if let Some(s) = self.seqs.get_mut(&id) {
            if s.is_decoding() && s.drafts == 0 && self.running.contains(&id) {
                s.tokens.extend_from_slice(drafts);
                s.drafts = drafts.len();
            }
        }
    }

    /// Takes a sequence's drafts back out after the step that checked
    /// them: its tokens end with its last sampled token again, whose keys
    /// and values are computed. Each draft then accepted is appended
    /// and [`Scheduler::keep_computed`].
    pub fn take_drafts(&mut self, id: SeqId) -> Vec<u32> {
        let Some(s) = self.seqs.get_mut(&id) else {
            return Vec::new();
        };
        let d = s.tokens.split_off(s.tokens.len() - s.drafts);
        s.drafts = 0;
        s.computed = s.computed.min(s.tokens.len());
        d
    }

    /// Releases blocks a sequence holds beyond its tokens (taken for
    /// drafts that were rejected; they hold nothing cached).
    pub fn trim_surplus(&mut self, id: SeqId) {
        let bs = self.block_size;
        if let Some(s) = self.seqs.get_mut(&id) {
            let keep = s.tokens.len().div_ceil(bs) * s.width;
            while s.blocks.len() > keep {
                let b = s.blocks.pop().expect("more blocks than kept");
                if b != RELEASED {
                    self.blocks.release(&[b]);
                }
            }
        }
    }

    /// The token just appended was a checked draft: its keys and values
    /// were computed with it.
    pub fn keep_computed(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            debug_assert!(s.computed < s.tokens.len());
            s.computed += 1;
        }
    }

    /// Running sequences whose next step computes one token, oldest first.
    pub fn decoding(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.running
            .iter()
            .copied()
            .filter(|id| self.seqs[id].is_decoding())
    }

    /// Removes a sequence wherever it is, releases its blocks and returns
    /// it (`None` if it was not here).
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence<T>> {
        let s = self.seqs.remove(&id)?;
        self.release_seq(&s);
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
        Some(s)
    }

    /// Blocks for a sequence of `len` tokens that runs outside the
    /// schedule (a whole-sequence pass: logits, perplexity, benchmarks),
    /// taken from the pool so that no scheduled sequence is given them;
    /// `None` when the pool has not enough free. Hand them back with
    /// [`Scheduler::give_back`] before the next [`Scheduler::schedule`]:
    /// held across steps, they could leave a running sequence no room.
    pub fn lease(&mut self, len: usize) -> Option<Vec<u32>> {
        let need = len.div_ceil(self.block_size);
        // Checked first: allocating evicts cached prefixes, which a lease
        // that cannot be had must not cost.
        if need > self.blocks.n_available() {
            return None;
        }
        let mut table = Vec::with_capacity(need);
        while table.len() * self.block_size < len {
            match self.blocks.allocate() {
                Some(b) => table.push(b),
                None => {
                    self.blocks.release(&table);
                    return None;
                }
            }
        }
        Some(table)
    }

    /// Returns the blocks of a [`Scheduler::lease`].
    pub fn give_back(&mut self, table: Vec<u32>) {
        self.blocks.release(&table);
    }

    /// Gives back a prefix looked up for an admission that did not happen,
    /// tail first (as [`Scheduler::release_seq`] does).
    fn release_lookup(&mut self, table: &[u32]) {
        for &b in table.iter().rev() {
            self.blocks.release(&[b]);
        }
    }

    /// Releases a sequence's blocks tail first, so that the pool evicts a
    /// cached chain from its end: a lookup walks a chain from its head and
    /// stops at the first missing block, so an evicted head orphans every
    /// block after it. Blocks that a sliding window released earlier (and
    /// that are still cached) are refreshed in the same order.
    fn release_seq(&mut self, s: &Sequence<T>) {
        for (i, &b) in s.blocks.iter().enumerate().rev() {
            if b != RELEASED {
                self.blocks.release(&[b]);
            } else if let Some(h) = s.block_hashes.get(i).filter(|_| i < s.registered) {
                self.blocks.touch_idle(h);
            }
        }
    }

    fn preempt(&mut self, id: SeqId) {
        let s = self.seqs.remove(&id).expect("preempting a live sequence");
        self.release_seq(&s);
        let s = self.seqs.entry(id).or_insert(s);
        s.drop_drafts();
        s.blocks.clear();
        s.registered = 0;
        s.computed = 0;
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.preemptions += 1;
        tracing::debug!(seq = id, "preempted");
    }

    /// Forgets every cached block nobody holds and returns them.
    pub fn drop_cached(&mut self) -> Vec<u32> {
        self.blocks.evict_idle_cached()
    }

    /// Blocks nobody holds that keep no cached prefix (their memory can go).
    pub fn idle_uncached(&self) -> Vec<u32> {
        self.blocks.idle_uncached()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SeqOptions {
        SeqOptions {
            use_prefix_cache: true,
            ..Default::default()
        }
    }

    fn salted(salt: &str) -> SeqOptions {
        SeqOptions {
            cache_salt: Some(salt.into()),
            ..opts()
        }
    }

    fn sched(blocks: usize, budget: usize, seqs: usize) -> Scheduler {
        Scheduler::new(
            blocks,
            4,
            SchedulerConfig {
                max_batched_tokens: budget,
                max_num_seqs: seqs,
                window: None,
                max_full_logit_rows: 1 << 20,
            },
        )
    }

    /// Runs steps like an engine that appends token 7 after each completed
    /// chunk, until every sequence reaches `len` tokens.
    fn drive(s: &mut Scheduler, len: usize, ids: &[SeqId]) -> usize {
        let mut steps = 0;
        while ids.iter().any(|id| s.seqs.contains_key(id)) {
            let chunks = s.schedule();
            assert!(!chunks.is_empty(), "no progress");
            s.commit(&chunks);
            for c in chunks.iter().filter(|c| c.completes) {
                if s.tokens(c.id).len() >= len {
                    s.finish(c.id);
                } else {
                    s.append(c.id, 7);
                }
            }
            steps += 1;
            assert!(steps < 10_000);
        }
        steps
    }

    #[test]
    fn drafts_run_whole_with_spare_blocks_and_roll_back() {
        let mut s = sched(8, 16, 4);
        s.add(1, vec![1; 4], opts(), ());
        let c = s.schedule();
        s.commit(&c);
        s.append(1, 9);
        // Decoding at position 4 (block 1 of blocks of 4): three drafts
        // fit in that block.
        s.set_drafts(1, &[5, 6, 7]);
        assert_eq!(s.tokens(1), [1, 1, 1, 1, 9]);
        let c = s.schedule();
        assert_eq!(
            (c[0].start, c[0].len, c[0].drafts, c[0].completes),
            (4, 4, 3, true)
        );
        s.commit(&c);
        // The first draft is accepted, the second not: 9 5 then 8.
        assert_eq!(s.take_drafts(1), [5, 6, 7]);
        s.append(1, 5);
        s.keep_computed(1);
        s.append(1, 8);
        s.trim_surplus(1);
        let seq = s.get(1).unwrap();
        assert_eq!(
            (seq.computed, seq.tokens.len(), seq.blocks.len()),
            (6, 7, 2)
        );
        assert!(seq.is_decoding());
        // Drafts beyond the budget are dropped, not cut.
        s.set_drafts(1, &[1; 20]);
        let c = s.schedule();
        assert_eq!((c[0].len, c[0].drafts), (1, 0));
        assert_eq!(s.tokens(1).len(), 7);
    }

    #[test]
    fn drafts_never_take_the_block_another_sequence_needs() {
        // Two sequences of 4 tokens in a pool of 4 blocks (of 4 tokens):
        // after their prompts, 2 blocks are left, one for each next token;
        // the first sequence's drafts, which reach a third block, must not
        // take the second sequence's.
        let mut s = sched(4, 16, 4);
        s.add(1, vec![1; 4], opts(), ());
        s.add(2, vec![2; 4], opts(), ());
        let c = s.schedule();
        assert_eq!(c.len(), 2);
        s.commit(&c);
        s.append(1, 9);
        s.append(2, 9);
        s.set_drafts(1, &[3, 3, 3, 3]);
        let c = s.schedule();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].drafts, 0);
        assert_eq!(s.stats().preemptions, 0);
    }

    #[test]
    fn chunks_respect_the_budget_and_decodes_go_first() {
        let mut s = sched(64, 8, 4);
        s.add(1, vec![1; 3], opts(), ());
        let c = s.schedule();
        assert_eq!(
            c,
            vec![Chunk {
                id: 1,
                start: 0,
                len: 3,
                completes: true,
                drafts: 0
            }]
        );
        s.commit(&c);
        s.append(1, 9);
        s.add(2, vec![2; 20], opts(), ());
        let c = s.schedule();
        // The decode first, then 7 tokens of the new prompt.
        assert_eq!(
            c[0],
            Chunk {
                id: 1,
                start: 3,
                len: 1,
                completes: true,
                drafts: 0
            }
        );
        assert_eq!(
            c[1],
            Chunk {
                id: 2,
                start: 0,
                len: 7,
                completes: false,
                drafts: 0
            }
        );
        assert_eq!(c.iter().map(|c| c.len).sum::<usize>(), 8);
    }

    #[test]
    fn a_pool_too_small_preempts_and_still_finishes_everything() {
        // 12 blocks of 4 = 48 tokens; four sequences that grow to 24 each.
        let mut s = sched(12, 16, 4);
        for id in 0..4 {
            s.add(id, vec![id as u32 + 1; 6], opts(), ());
        }
        drive(&mut s, 24, &[0, 1, 2, 3]);
        assert!(s.stats().preemptions > 0);
        assert_eq!(s.stats().blocks_used, 0);
    }

    #[test]
    fn blocks_out_of_a_sliding_window_are_released() {
        let mut s = sched(32, 64, 4);
        s.cfg.window = Some(6);
        s.add(1, (0..20).collect(), opts(), ());
        let c = s.schedule();
        s.commit(&c);
        // 20 computed: the next position (20) reads 15.., so blocks 0..=2
        // (positions 0..12) are released and block 3 (12..16) is kept.
        assert_eq!(
            &s.block_table(1)[..4],
            &[RELEASED, RELEASED, RELEASED, s.block_table(1)[3]]
        );
        assert_eq!(s.stats().blocks_used, 2);
        s.append(1, 3);
        drive(&mut s, 40, &[1]);
        assert_eq!(s.stats().blocks_used, 0);
    }

    #[test]
    fn a_shared_prefix_is_computed_once() {
        let mut s = sched(32, 64, 4);
        s.add(1, (0..20).collect(), opts(), ());
        s.add(
            2,
            (0..20).collect(),
            SeqOptions {
                after: Some(1),
                ..opts()
            },
            (),
        );
        let c = s.schedule();
        assert_eq!(c.len(), 1, "the sibling waits for the prompt");
        s.commit(&c);
        s.append(1, 5);
        let c = s.schedule();
        // 16 of 20 tokens come from the cache; the last block is recomputed.
        assert_eq!(
            c[1],
            Chunk {
                id: 2,
                start: 16,
                len: 4,
                completes: true,
                drafts: 0
            }
        );
        assert_eq!(s.cached_tokens(2), 16);
        assert_eq!(s.block_table(1)[..4], s.block_table(2)[..4]);
    }

    /// Issue 7's scenario: a cached 1,051-token prompt, then a 2,105-token
    /// prompt that needs 16 of its 66 blocks. The evicted blocks must come
    /// from the end of the first prompt's chain, so most of it stays usable.
    #[test]
    fn eviction_takes_the_tail_of_a_cached_chain_first() {
        let mut s = Scheduler::new(
            182,
            16,
            SchedulerConfig {
                max_batched_tokens: 512,
                max_num_seqs: 4,
                window: None,
                max_full_logit_rows: 1 << 20,
            },
        );
        let a: Vec<u32> = (0..1051).map(|i| 1000 + i % 3000).collect();
        let b: Vec<u32> = (0..2105).map(|i| 5000 + i % 3000).collect();
        s.add(1, a.clone(), opts(), ());
        drive(&mut s, a.len() + 1, &[1]);
        s.add(2, b.clone(), opts(), ());
        drive(&mut s, b.len() + 1, &[2]);
        s.add(3, a.clone(), opts(), ());
        let c = s.schedule();
        assert_eq!(c[0].id, 3);
        let cached = s.cached_tokens(3);
        assert!(
            cached * 2 >= a.len(),
            "only {cached} of {} tokens still cached",
            a.len()
        );
    }

    #[test]
    fn blocks_a_sliding_window_released_are_evicted_after_the_tail() {
        let mut s = sched(16, 64, 4);
        s.cfg.window = Some(6);
        let a: Vec<u32> = (0..30).collect();
        s.add(1, a.clone(), opts(), ());
        drive(&mut s, 31, &[1]);
        // 7 full blocks of 4 stay cached; taking 12 of the 16 blocks takes
        // the 9 uncached ones, then the 3 cached ones released longest ago,
        // which must be the chain's tail, not the head the window let go
        // of first.
        let taken: Vec<u32> = (0..12).map(|_| s.blocks.allocate().unwrap()).collect();
        s.blocks.release(&taken);
        s.add(2, a, opts(), ());
        s.schedule();
        assert_eq!(s.cached_tokens(2), 16, "the first four blocks survive");
    }

    #[test]
    fn different_cache_salts_share_no_prefix() {
        let mut s = sched(32, 64, 4);
        let p: Vec<u32> = (0..20).collect();
        s.add(1, p.clone(), salted("alice"), ());
        drive(&mut s, 21, &[1]);
        s.add(2, p.clone(), salted("bob"), ());
        s.add(3, p.clone(), opts(), ());
        s.add(4, p, salted("alice"), ());
        s.schedule();
        assert_eq!(s.cached_tokens(2), 0);
        assert_eq!(s.cached_tokens(3), 0);
        assert_eq!(s.cached_tokens(4), 16);
    }

    #[test]
    fn a_lease_takes_whole_blocks_and_gives_them_all_back() {
        let mut s = sched(4, 64, 4);
        let t = s.lease(9).expect("3 of 4 blocks");
        assert_eq!(t.len(), 3);
        assert_eq!(s.stats().blocks_used, 3);
        assert!(s.lease(5).is_none(), "2 blocks do not fit");
        assert_eq!(s.stats().blocks_used, 3, "a failed lease keeps nothing");
        s.give_back(t);
        assert_eq!(s.stats().blocks_used, 0);
        // The blocks went back to the pool: a sequence may use all of them.
        s.add(1, vec![1; 16], opts(), ());
        assert_eq!(s.schedule()[0].len, 16);
    }

    #[test]
    fn a_lease_that_cannot_be_had_evicts_no_cached_prefix() {
        let mut s = sched(4, 64, 4);
        s.add(1, (0..9).collect(), opts(), ());
        drive(&mut s, 10, &[1]);
        assert!(s.lease(20).is_none(), "5 blocks of a pool of 4");
        s.add(2, (0..9).collect(), opts(), ());
        s.schedule();
        assert_eq!(s.cached_tokens(2), 8, "both full blocks still cached");
    }

    #[test]
    fn full_logit_rows_are_bounded_per_step() {
        let mut s = sched(64, 64, 4);
        s.cfg.max_full_logit_rows = 10;
        let full = SeqOptions {
            full_logits: true,
            ..Default::default()
        };
        s.add(1, vec![1; 30], full.clone(), ());
        s.add(2, vec![2; 30], full, ());
        s.add(3, vec![3; 30], opts(), ());
        let c = s.schedule();
        // Ten rows for the first, none left for the second, the third as usual.
        assert_eq!(
            c.iter().map(|c| (c.id, c.len)).collect::<Vec<_>>(),
            vec![(1, 10), (3, 30)]
        );
        s.commit(&c);
        s.append(3, 9);
        let c = s.schedule();
        assert_eq!(
            c.iter().map(|c| (c.id, c.len)).collect::<Vec<_>>(),
            vec![(1, 10), (3, 1)]
        );
    }
}
