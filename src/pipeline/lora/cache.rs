//! The merged variants kept in memory, least recently used first out, within a byte budget. The most
//! recently used variant is always kept, whatever its size: the next batch with the same adapters
//! (the common case: a burst of jobs for one style) must not merge again.

use std::sync::Arc;

/// A cache of values of a known size, keyed by `K`, most recently used last.
pub(crate) struct Lru<K, V> {
    entries: Vec<(K, Arc<V>, u64)>,
    budget: u64,
}

impl<K: PartialEq, V> Lru<K, V> {
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            entries: Vec::new(),
            budget,
        }
    }

    pub(crate) fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
        self.evict();
    }

    /// The value for `key`, now the most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<Arc<V>> {
        let i = self.entries.iter().position(|(k, _, _)| k == key)?;
        let entry = self.entries.remove(i);
        let value = entry.1.clone();
        self.entries.push(entry);
        Some(value)
    }

    /// Adds `value` (`bytes` big) as the most recently used, then drops the least recently used
    /// entries until the rest fit the budget (never the new one).
    pub(crate) fn insert(&mut self, key: K, value: Arc<V>, bytes: u64) {
        self.entries.retain(|(k, _, _)| *k != key);
        self.entries.push((key, value, bytes));
        self.evict();
    }

    fn evict(&mut self) {
        while self.entries.len() > 1 && self.bytes() > self.budget {
            self.entries.remove(0);
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.entries.iter().map(|(_, _, b)| b).sum()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_go_first_and_the_newest_always_stays() {
        let mut c: Lru<&str, u32> = Lru::new(10);
        c.insert("a", Arc::new(1), 4);
        c.insert("b", Arc::new(2), 4);
        assert_eq!(c.get(&"a").as_deref(), Some(&1)); // a is now newer than b
        c.insert("c", Arc::new(3), 4);
        assert!(c.get(&"b").is_none(), "b was the least recently used");
        assert_eq!((c.len(), c.bytes()), (2, 8));
        c.insert("huge", Arc::new(4), 100);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&"huge").as_deref(), Some(&4));
        c.set_budget(0);
        assert_eq!(c.len(), 1);
    }
}
