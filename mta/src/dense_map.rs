//! An ordered map that costs little more than its keys and values: the per-message
//! indexes of the queue (issue 17: memory independent of queue depth).
//!
//! `std`'s `BTreeMap` fills its nodes about half when keys arrive in ascending order, as
//! queue ids (microsecond timestamps) and due times do: measured at 66 bytes an entry for
//! 32 bytes of key and value. This map keeps entries in sorted chunks of at most
//! [`CHUNK`] (key, value) pairs, found by binary search over the chunks' first keys. An
//! insert past the last key fills the last chunk and then starts a new one, so ascending
//! inserts leave every chunk full. An insert into a full chunk first passes one entry on to
//! a neighbour with room; only when both are full does the chunk split, in halves, except
//! the last chunk, which keeps 7/8. So nearly ascending keys (ids stored a few hundred
//! places out of order, as concurrent sessions commit them) still leave full chunks
//! behind, where plain halving left half of each chunk empty. A chunk that empties goes,
//! and one that falls below a quarter merges with its neighbour when both fit in one.
//! Lookups are O(log n); inserts and removals move at most one chunk's entries (two, when
//! one passes to a neighbour).
//!
//! It owns nothing but memory layout: no I/O, no knowledge of what the keys mean.

use std::ops::Bound;

/// Most entries in one chunk: small enough that moving a chunk's tail is cheap, large
/// enough that the per-chunk overhead (a `Vec` header) is negligible.
const CHUNK: usize = 512;

/// An ordered map of `Copy` keys, stored densely (see the module doc).
#[derive(Debug, Clone)]
pub struct DenseMap<K, V> {
    chunks: Vec<Vec<(K, V)>>,
    len: usize,
}

impl<K, V> Default for DenseMap<K, V> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Copy, V> DenseMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `key` if any chunk does: the last one whose first key is at
    /// most `key` (or the first chunk).
    fn chunk_for(&self, key: &K) -> usize {
        self.chunks
            .partition_point(|chunk| chunk.first().is_some_and(|(k, _)| k <= key))
            .saturating_sub(1)
    }

    fn position(&self, key: &K) -> Option<(usize, usize)> {
        let c = self.chunk_for(key);
        let chunk = self.chunks.get(c)?;
        chunk
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()
            .map(|i| (c, i))
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let (c, i) = self.position(key)?;
        Some(&self.chunks[c][i].1)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let (c, i) = self.position(key)?;
        Some(&mut self.chunks[c][i].1)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.position(key).is_some()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.chunks.is_empty() {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let c = self.chunk_for(&key);
        let at = match self.chunks[c].binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => return Some(std::mem::replace(&mut self.chunks[c][i].1, value)),
            Err(i) => i,
        };
        self.len += 1;
        let last = c + 1 == self.chunks.len();
        let chunk = &mut self.chunks[c];
        if chunk.len() < CHUNK {
            chunk.insert(at, (key, value));
            return None;
        }
        if at == CHUNK && last {
            // Past the end of the last, full chunk: ascending inserts start a new one.
            let mut next = Vec::with_capacity(CHUNK);
            next.push((key, value));
            self.chunks.push(next);
            return None;
        }
        // A full chunk first passes an entry to a neighbour with room, so that keys a few
        // places out of order fill the chunks around them instead of splitting them.
        if let Some(next) = self.chunks.get(c + 1)
            && next.len() < CHUNK
        {
            let spilled = if at == CHUNK {
                (key, value)
            } else {
                let chunk = &mut self.chunks[c];
                let last_entry = chunk.pop().expect("a full chunk");
                chunk.insert(at, (key, value));
                last_entry
            };
            self.chunks[c + 1].insert(0, spilled);
            return None;
        }
        if c > 0 && at > 0 && self.chunks[c - 1].len() < CHUNK {
            let chunk = &mut self.chunks[c];
            let first_entry = chunk.remove(0);
            chunk.insert(at - 1, (key, value));
            self.chunks[c - 1].push(first_entry);
            return None;
        }
        let chunk = &mut self.chunks[c];
        // The last chunk is where nearly ascending keys land: it keeps 7/8 of its entries
        // (like a B-tree's rightmost split), so the chunks left behind stay nearly full.
        // Elsewhere a split makes halves, with room for keys on both sides.
        let split = if last { CHUNK - CHUNK / 8 } else { CHUNK / 2 };
        let mut upper = Vec::with_capacity(CHUNK);
        upper.extend(chunk.drain(split..));
        if at <= split {
            chunk.insert(at, (key, value));
        } else {
            upper.insert(at - split, (key, value));
        }
        self.chunks.insert(c + 1, upper);
        None
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (c, i) = self.position(key)?;
        let (_, value) = self.chunks[c].remove(i);
        self.len -= 1;
        self.after_removal(c);
        Some(value)
    }

    /// Drops an empty chunk, or merges a sparse one into a neighbour when both fit.
    fn after_removal(&mut self, c: usize) {
        let len = self.chunks[c].len();
        if len == 0 {
            self.chunks.remove(c);
            return;
        }
        if len >= CHUNK / 4 {
            return;
        }
        let (into, from) = match (c.checked_sub(1), c + 1 < self.chunks.len()) {
            (Some(before), _) if self.chunks[before].len() + len <= CHUNK * 3 / 4 => (before, c),
            (_, true) if self.chunks[c + 1].len() + len <= CHUNK * 3 / 4 => (c, c + 1),
            _ => return,
        };
        let moved = self.chunks.remove(from);
        self.chunks[into].extend(moved);
    }

    /// The entry with the smallest key.
    pub fn first(&self) -> Option<(&K, &V)> {
        self.chunks.first()?.first().map(|(k, v)| (k, v))
    }

    /// The entry with the largest key.
    pub fn last(&self) -> Option<(&K, &V)> {
        self.chunks.last()?.last().map(|(k, v)| (k, v))
    }

    /// Removes and returns the entry with the smallest key.
    pub fn pop_first(&mut self) -> Option<(K, V)> {
        let chunk = self.chunks.first_mut()?;
        let first = chunk.remove(0);
        self.len -= 1;
        self.after_removal(0);
        Some(first)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.chunks.iter().flatten().map(|(k, v)| (k, v))
    }

    /// Entries in key order whose key is after `from` (`Bound::Unbounded`: all).
    pub fn range_from(&self, from: Bound<K>) -> impl Iterator<Item = (&K, &V)> {
        let (c, i) = match from {
            Bound::Unbounded => (0, 0),
            Bound::Included(key) | Bound::Excluded(key) => {
                let c = self.chunk_for(&key);
                let i = self.chunks.get(c).map_or(0, |chunk| {
                    chunk.partition_point(|(k, _)| match from {
                        Bound::Excluded(_) => *k <= key,
                        _ => *k < key,
                    })
                });
                (c, i)
            }
        };
        self.chunks
            .iter()
            .skip(c)
            .enumerate()
            .flat_map(move |(n, chunk)| chunk[if n == 0 { i.min(chunk.len()) } else { 0 }..].iter())
            .map(|(k, v)| (k, v))
    }

    /// Memory held by the chunks, for tests and figures.
    pub fn allocated_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Vec<(K, V)>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<(K, V)>())
                .sum::<usize>()
    }
}

/// An ordered set on [`DenseMap`].
#[derive(Debug, Clone, Default)]
pub struct DenseSet<K> {
    map: DenseMap<K, ()>,
}

impl<K: Ord + Copy> DenseSet<K> {
    pub fn new() -> Self {
        Self {
            map: DenseMap::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Returns whether it was new.
    pub fn insert(&mut self, key: K) -> bool {
        self.map.insert(key, ()).is_none()
    }
    /// Returns whether it was there.
    pub fn remove(&mut self, key: &K) -> bool {
        self.map.remove(key).is_some()
    }
    pub fn first(&self) -> Option<&K> {
        self.map.first().map(|(k, _)| k)
    }
    pub fn pop_first(&mut self) -> Option<K> {
        self.map.pop_first().map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every operation agrees with `BTreeMap` over a long random sequence, with keys
    /// mostly ascending (like queue ids) and sometimes anywhere.
    #[test]
    fn behaves_like_btreemap() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut dense = DenseMap::new();
        let mut reference = BTreeMap::new();
        let mut ascending = 0u64;
        for step in 0..200_000u64 {
            let roll = next() % 100;
            let key = if roll < 50 {
                ascending += 1 + next() % 3;
                ascending
            } else {
                next() % (ascending + 10)
            };
            if roll < 70 {
                assert_eq!(dense.insert(key, step), reference.insert(key, step));
            } else if roll < 95 {
                assert_eq!(dense.remove(&key), reference.remove(&key));
            } else {
                assert_eq!(dense.pop_first(), reference.pop_first());
            }
            assert_eq!(dense.len(), reference.len());
            if step % 5_000 == 0 {
                assert!(
                    dense
                        .iter()
                        .map(|(k, v)| (*k, *v))
                        .eq(reference.iter().map(|(k, v)| (*k, *v)))
                );
                let probe = next() % (ascending + 10);
                assert_eq!(dense.get(&probe), reference.get(&probe));
                for bound in [
                    Bound::Included(probe),
                    Bound::Excluded(probe),
                    Bound::Unbounded,
                ] {
                    let ours: Vec<_> = dense.range_from(bound).map(|(k, _)| *k).take(700).collect();
                    let theirs: Vec<_> = reference
                        .range((bound, Bound::Unbounded))
                        .map(|(k, _)| *k)
                        .take(700)
                        .collect();
                    assert_eq!(ours, theirs, "{bound:?}");
                }
                assert_eq!(
                    dense.first().map(|(k, _)| *k),
                    reference.first_key_value().map(|(k, _)| *k)
                );
            }
        }
    }

    /// Ascending inserts, as queue ids arrive, fill every chunk: the memory is the
    /// entries' own size plus a chunk's worth.
    #[test]
    fn ascending_inserts_are_dense() {
        let mut map = DenseMap::new();
        for id in 0..100_000u64 {
            map.insert(1_700_000_000_000_000 + id * 37, [0u32; 6]);
        }
        let entry = std::mem::size_of::<(u64, [u32; 6])>();
        assert!(
            map.allocated_bytes() <= 100_000 * entry + CHUNK * entry + 4096,
            "{} bytes for {} entries of {entry}",
            map.allocated_bytes(),
            map.len()
        );
    }

    /// Nearly ascending inserts, as the queue sees them (ids are taken in one order and
    /// stored or deferred in another, a few places apart), still fill the chunks: a split
    /// of the last chunk keeps most of it where it is.
    #[test]
    fn nearly_ascending_inserts_are_dense() {
        // Up to half a chunk out of order (as many as a group commit stores at once): the
        // chunks stay full. Two chunks' worth or more: some are left at about half.
        for (window, most) in [
            (16u64, 1.05),
            (64, 1.05),
            (256, 1.05),
            (1024, 1.5),
            (4096, 1.5),
        ] {
            nearly_ascending(window, most);
        }
    }

    fn nearly_ascending(window: u64, most: f64) {
        let mut map = DenseMap::new();
        let mut seed = 7u64;
        for block in 0..(100_000u64 / window) {
            let mut ids: Vec<u64> = (block * window..(block + 1) * window).collect();
            for i in (1..ids.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ids.swap(i, (seed >> 33) as usize % (i + 1));
            }
            for id in ids {
                map.insert(id, [0u32; 6]);
            }
        }
        let entry = std::mem::size_of::<(u64, [u32; 6])>();
        assert!(
            map.allocated_bytes() as f64 <= (map.len() * entry) as f64 * most,
            "window {window}: {} bytes for {} entries of {entry}",
            map.allocated_bytes(),
            map.len()
        );
    }

    /// Removing in ascending order (a queue draining oldest first) frees chunks as it goes.
    #[test]
    fn draining_in_order_frees_memory() {
        let mut map = DenseMap::new();
        for id in 0..50_000u64 {
            map.insert(id, id);
        }
        for id in 0..49_000u64 {
            assert_eq!(map.remove(&id), Some(id));
        }
        assert!(map.allocated_bytes() < 4 * CHUNK * 16 + 50_000 / CHUNK * 24 + 4096);
        assert_eq!(map.iter().count(), 1_000);
    }
}
