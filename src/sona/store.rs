//! What feedback refers to: the prompt and output tokens of recent
//! responses, by response id and choice, in a store of bounded size (the
//! oldest response goes first).

use std::collections::{HashMap, VecDeque};

/// One choice of a response: what the model was given and what it said.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    pub user: Option<String>,
}

pub struct ResponseStore {
    cap: usize,
    by_id: HashMap<String, Vec<Option<Recorded>>>,
    order: VecDeque<String>,
}

impl ResponseStore {
    pub fn new(cap: usize) -> Self {
        ResponseStore {
            cap: cap.max(1),
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records choice `choice` of response `id` (choices finish one by
    /// one); a new response past the cap pushes out the oldest.
    pub fn record(&mut self, id: &str, choice: usize, r: Recorded) {
        if !self.by_id.contains_key(id) {
            if self.order.len() >= self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.by_id.remove(&old);
                }
            }
            self.order.push_back(id.to_string());
            self.by_id.insert(id.to_string(), Vec::new());
        }
        let choices = self.by_id.get_mut(id).expect("inserted above");
        if choices.len() <= choice {
            choices.resize(choice + 1, None);
        }
        choices[choice] = Some(r);
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
            prompt: vec![t],
            output: vec![t + 1],
            user: None,
        };
        let mut s = ResponseStore::new(2);
        s.record("a", 0, r(1));
        s.record("a", 2, r(2));
        s.record("b", 0, r(3));
        assert_eq!(s.get("a", 2).unwrap().prompt, vec![2]);
        assert!(s.get("a", 1).is_none());
        s.record("c", 0, r(4));
        assert!(s.get("a", 0).is_none());
        assert_eq!(s.get("b", 0).unwrap().output, vec![4]);
        assert_eq!(s.len(), 2);
    }
}
