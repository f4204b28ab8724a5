//! Speculative decoding by prompt lookup: draft tokens are guessed from the
//! sequence's own context (where its last few tokens appeared before, what
//! followed them then), and the target model checks all of them in one
//! forward pass. Tokens are sampled from the target's logits exactly as in
//! plain decoding and a draft is kept only while it equals what was
//! sampled, so the output is the same token for token (with a seed too);
//! a draft only saves passes. This is the n-gram drafting of llama.cpp's
//! lookup decoding and vLLM's `ngram` method.

/// When and how much to draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    /// Draft tokens per step and sequence, at most.
    pub tokens: usize,
    /// The longest and shortest n-gram looked up (the longest first).
    pub max_ngram: usize,
    pub min_ngram: usize,
    /// Drafting stops when more sequences than this decode at once: under
    /// batch load a step is already busy with many rows, and rejected
    /// drafts' rows cost more than accepted ones save.
    pub max_seqs: usize,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            tokens: 4,
            max_ngram: 4,
            min_ngram: 2,
            max_seqs: 1,
        }
    }
}

/// Context searched back from its end, at most (the search is linear).
const MAX_LOOKBACK: usize = 8192;

/// Up to `k` tokens that followed an earlier occurrence of the context's
/// last n tokens, for the longest n in `max_n..=min_n` that occurs: the
/// most recent occurrence with `k` tokens after it (else the one with the
/// most); empty when none occurs.
pub fn propose(context: &[u32], k: usize, min_n: usize, max_n: usize) -> Vec<u32> {
    let min_n = min_n.max(1);
    if k == 0 || context.len() <= min_n {
        return Vec::new();
    }
    let lo = context.len().saturating_sub(MAX_LOOKBACK);
    for n in (min_n..=max_n.min(context.len() - 1)).rev() {
        let tail = &context[context.len() - n..];
        // Occurrences before the tail itself, most recent first; a recent
        // one overlapping the tail (periodic text) has few tokens after it.
        let mut best: Option<(usize, usize)> = None;
        for start in (lo..context.len() - n).rev() {
            if &context[start..start + n] == tail {
                let from = start + n;
                let len = (context.len() - from).min(k);
                if best.is_none_or(|(_, l)| len > l) {
                    best = Some((from, len));
                }
                if len == k {
                    break;
                }
            }
        }
        if let Some((from, len)) = best {
            return context[from..from + len].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_recent_match_is_followed() {
        // "1 2 3 9 ... 1 2 3 7 ... 2 3" -> after "2 3": the most recent
        // occurrence of the longest matching tail.
        let c = [1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 5, 2, 3];
        assert_eq!(propose(&c, 3, 2, 4), vec![7, 6, 5]);
        // A longer tail picks its own match even when older.
        let c = [5, 2, 3, 4, 0, 9, 2, 3, 1, 5, 2, 3];
        assert_eq!(propose(&c, 2, 2, 3), vec![4, 0]);
    }

    #[test]
    fn nothing_is_drafted_without_a_match() {
        assert!(propose(&[1, 2, 3, 4, 5], 4, 2, 4).is_empty());
        assert!(propose(&[1], 4, 2, 4).is_empty());
        assert!(propose(&[1, 2, 1, 2], 0, 2, 4).is_empty());
    }

    #[test]
    fn a_draft_stops_at_the_end_of_the_context() {
        // "7 7 7": the tail "7 7" occurs at 0, followed by one 7.
        assert_eq!(propose(&[7, 7, 7], 4, 2, 2), vec![7]);
        // Periodic text: an older occurrence gives a whole draft.
        let c = [1, 2, 1, 2, 1, 2, 1, 2];
        assert_eq!(propose(&c, 4, 2, 2), vec![1, 2, 1, 2]);
    }
}
