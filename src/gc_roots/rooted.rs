//! The rooted paths and their NAR sizes, with the total and the paths still without a size kept up to date as
//! roots come and go. A maintenance pass runs after every request that adds a root; were it to walk every root
//! for these, each request would cost a step per queued path, and a deep queue would slow every ack.

use std::collections::{HashMap, HashSet};

use crate::store_path::StorePath;

#[derive(Default)]
pub(super) struct Rooted {
    /// Every rooted path, with its NAR size once looked up.
    sizes: HashMap<StorePath, Option<u64>>,
    /// The sum of the known sizes.
    bytes: u64,
    /// Paths rooted without a size since the last [`Rooted::take_unsized`]; may name paths removed since.
    to_size: Vec<StorePath>,
}

impl Rooted {
    pub fn contains(&self, path: &StorePath) -> bool {
        self.sizes.contains_key(path)
    }

    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// The NAR bytes rooted, counting paths whose size is not known yet as nothing.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `None` when `path` has no root; `Some(None)` while its size is unknown.
    pub fn size(&self, path: &StorePath) -> Option<Option<u64>> {
        self.sizes.get(path).copied()
    }

    pub fn insert(&mut self, path: StorePath, size: Option<u64>) {
        if size.is_none() {
            self.to_size.push(path.clone());
        }
        let old = self.sizes.insert(path, size);
        self.bytes = self.bytes - old.flatten().unwrap_or(0) + size.unwrap_or(0);
    }

    /// Whether `path` had a root.
    pub fn remove(&mut self, path: &StorePath) -> bool {
        match self.sizes.remove(path) {
            Some(old) => {
                self.bytes -= old.unwrap_or(0);
                true
            }
            None => false,
        }
    }

    /// Records the size of a rooted path; nothing when it has no root any more.
    pub fn set_size(&mut self, path: &StorePath, size: u64) {
        if let Some(slot) = self.sizes.get_mut(path) {
            self.bytes = self.bytes - slot.unwrap_or(0) + size;
            *slot = Some(size);
        }
    }

    /// The rooted paths whose size is still unknown, each once; they are not returned again unless handed back
    /// with [`Rooted::return_unsized`] (when looking their sizes up failed).
    pub fn take_unsized(&mut self) -> Vec<StorePath> {
        let mut seen = HashSet::new();
        let taken = std::mem::take(&mut self.to_size);
        taken
            .into_iter()
            .filter(|p| self.sizes.get(p) == Some(&None) && seen.insert(p.clone()))
            .collect()
    }

    pub fn return_unsized(&mut self, paths: Vec<StorePath>) {
        self.to_size.extend(paths);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        StorePath::parse(
            &format!("/nix/store/{}-{name}", "a".repeat(32)),
            "/nix/store",
        )
        .unwrap()
    }

    #[test]
    fn the_total_follows_every_change() {
        let (a, b) = (path("a"), path("b"));
        let mut rooted = Rooted::default();
        rooted.insert(a.clone(), Some(100));
        rooted.insert(b.clone(), None);
        assert_eq!((rooted.len(), rooted.bytes()), (2, 100));
        rooted.set_size(&b, 50);
        assert_eq!(rooted.bytes(), 150);
        rooted.insert(a.clone(), Some(10));
        assert_eq!(rooted.bytes(), 60);
        assert!(rooted.remove(&b));
        assert!(!rooted.remove(&b));
        assert_eq!((rooted.len(), rooted.bytes()), (1, 10));
        rooted.set_size(&b, 1_000);
        assert_eq!(rooted.bytes(), 10, "a path without a root gets no size");
    }

    #[test]
    fn unsized_paths_are_handed_out_once_unless_returned() {
        let (a, b, c) = (path("a"), path("b"), path("c"));
        let mut rooted = Rooted::default();
        rooted.insert(a.clone(), None);
        rooted.insert(b.clone(), None);
        rooted.insert(c.clone(), Some(1));
        rooted.remove(&b);
        rooted.remove(&a);
        rooted.insert(a.clone(), None);
        assert_eq!(rooted.take_unsized(), vec![a.clone()]);
        assert!(rooted.take_unsized().is_empty());
        rooted.return_unsized(vec![a.clone()]);
        assert_eq!(rooted.take_unsized(), vec![a.clone()]);
        rooted.return_unsized(vec![a.clone()]);
        rooted.set_size(&a, 5);
        assert!(
            rooted.take_unsized().is_empty(),
            "a path sized meanwhile is not looked up again"
        );
    }
}
