//! What feedback refers to: the prompt and output tokens of recent
//! responses, by response id and choice, in a store bounded both in
//! responses and in tokens (the oldest response goes first).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One choice of a response: what the model was given and what it said.
/// Choices of one prompt share its tokens.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub prompt: Arc<[u32]>,
    pub output: Vec<u32>,
    pub user: Option<String>,
    /// The API key (by index) the request came with, when the server has
    /// several: only the same key may rate it.
    pub tenant: Option<usize>,
}

impl Recorded {
    /// Tokens it holds (a shared prompt is counted by each choice, which
    /// bounds the store from above); the user id counts a token per 4
    /// bytes, so that long ids cannot grow the store past its budget.
    fn tokens(&self) -> usize {
        self.prompt.len()
            + self.output.len()
            + self.user.as_ref().map_or(0, |u| u.len().div_ceil(4))
    }
}

pub struct ResponseStore {
    cap: usize,
    max_tokens: usize,
    tokens: usize,
    by_id: HashMap<String, Vec<Option<Recorded>>>,
    order: VecDeque<String>,
}

impl ResponseStore {
    /// A store of `cap` responses and `max_tokens` tokens at most.
    pub fn new(cap: usize, max_tokens: usize) -> Self {
        ResponseStore {
            cap: cap.max(1),
            max_tokens: max_tokens.max(1),
            tokens: 0,
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.order.pop_front() {
            if let Some(choices) = self.by_id.remove(&old) {
                self.tokens -= choices
                    .iter()
                    .flatten()
                    .map(Recorded::tokens)
                    .sum::<usize>();
            }
        }
    }

    /// Records choice `choice` of response `id` (choices finish one by
    /// one); past either bound the oldest responses go. A choice larger
    /// than the whole token budget is not kept.
    pub fn record(&mut self, id: &str, choice: usize, r: Recorded) {
        let size = r.tokens();
        if size > self.max_tokens {
            return;
        }
        if !self.by_id.contains_key(id) {
            if self.order.len() >= self.cap {
                self.evict_oldest();
            }
            self.order.push_back(id.to_string());
            self.by_id.insert(id.to_string(), Vec::new());
        }
        while self.tokens + size > self.max_tokens && self.order.len() > 1 {
            if self.order.front().map(String::as_str) == Some(id) {
                break;
            }
            self.evict_oldest();
        }
        let choices = self.by_id.get_mut(id).expect("inserted above");
        if choices.len() <= choice {
            choices.resize(choice + 1, None);
        }
        if let Some(old) = choices[choice].replace(r) {
            self.tokens -= old.tokens();
        }
        self.tokens += size;
    }

    pub fn get(&self, id: &str, choice: usize) -> Option<&Recorded> {
        self.by_id.get(id)?.get(choice)?.as_ref()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_response_goes_first() {
        let r = |t: u32| Recorded {
            prompt: vec![t].into(),
            output: vec![t + 1],
            user: None,
            tenant: None,
        };
        let mut s = ResponseStore::new(2, 1000);
        s.record("a", 0, r(1));
        s.record("a", 2, r(2));
        s.record("b", 0, r(3));
        assert_eq!(&*s.get("a", 2).unwrap().prompt, &[2]);
        assert!(s.get("a", 1).is_none());
        s.record("c", 0, r(4));
        assert!(s.get("a", 0).is_none());
        assert_eq!(s.get("b", 0).unwrap().output, vec![4]);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_token_budget_pushes_out_old_responses() {
        let r = |n: usize| Recorded {
            prompt: vec![1; n].into(),
            output: vec![2; n],
            user: None,
            tenant: None,
        };
        let mut s = ResponseStore::new(100, 100);
        s.record("a", 0, r(20));
        s.record("b", 0, r(20));
        s.record("c", 0, r(20));
        assert_eq!(s.len(), 2);
        assert!(s.get("a", 0).is_none() && s.get("c", 0).is_some());
        s.record("huge", 0, r(60));
        assert!(s.get("huge", 0).is_none());
        assert_eq!(s.len(), 2);
    }
}
