//! The two caches of a view: a bounded map with per-entry expiry for metadata, and a byte-bounded
//! LRU of data blocks. Both are plain data structures; the view wraps them in mutexes and never
//! holds a lock across an await.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A map whose entries expire, holding at most `capacity` of them. When full, expired entries
/// are dropped first, then the ones closest to expiry.
pub(crate) struct TtlCache<K, V> {
    map: HashMap<K, (V, Instant)>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        TtlCache { map: HashMap::new(), capacity: capacity.max(1) }
    }

    /// The value, if present and not expired at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        match self.map.get(key) {
            Some((value, expires)) if *expires > now => Some(value.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&mut self, key: K, value: V, ttl: Duration, now: Instant) {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.map.retain(|_, (_, expires)| *expires > now);
            // Still full: drop the entries closest to expiry, an eighth at a time, so that a
            // full cache does not scan itself on every insert.
            if self.map.len() >= self.capacity {
                let mut by_expiry: Vec<(Instant, K)> =
                    self.map.iter().map(|(k, (_, expires))| (*expires, k.clone())).collect();
                by_expiry.sort_by_key(|(expires, _)| *expires);
                let drop = (self.capacity / 8).max(1);
                for (_, k) in by_expiry.into_iter().take(drop) {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(key, (value, now + ttl));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// An LRU of blocks bounded by their total size in bytes.
pub(crate) struct BlockCache<K> {
    map: HashMap<K, (Bytes, u64)>,
    /// Last-use tick → key; the first entry is the least recently used.
    order: BTreeMap<u64, K>,
    tick: u64,
    bytes: u64,
    capacity: u64,
}

impl<K: Eq + Hash + Clone> BlockCache<K> {
    pub fn new(capacity: u64) -> Self {
        BlockCache { map: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0, capacity }
    }

    /// The block, marking it as recently used.
    pub fn get(&mut self, key: &K) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (data, used) = self.map.get_mut(key)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, key.clone());
        Some(data.clone())
    }

    /// Whether the block is cached, without touching its recency.
    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    pub fn insert(&mut self, key: K, data: Bytes) {
        if data.len() as u64 > self.capacity {
            return;
        }
        self.tick += 1;
        let tick = self.tick;
        self.bytes += data.len() as u64;
        if let Some((old, used)) = self.map.insert(key.clone(), (data, tick)) {
            self.bytes -= old.len() as u64;
            self.order.remove(&used);
        }
        self.order.insert(tick, key);
        while self.bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some((old, _)) = self.map.remove(&oldest) {
                self.bytes -= old.len() as u64;
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_cache_expires_and_stays_bounded() {
        let now = Instant::now();
        let mut cache = TtlCache::new(16);
        cache.insert("a".to_string(), 1, Duration::from_secs(5), now);
        assert_eq!(cache.get(&"a".to_string(), now), Some(1));
        assert_eq!(cache.get(&"a".to_string(), now + Duration::from_secs(6)), None);
        for i in 0..100u64 {
            cache.insert(i.to_string(), i, Duration::from_secs(5 + i), now);
            assert!(cache.len() <= 16);
        }
        // The longest-lived entries survive.
        assert_eq!(cache.get(&"99".to_string(), now), Some(99));
    }

    #[test]
    fn block_cache_evicts_least_recently_used() {
        let mut cache = BlockCache::new(30);
        let block = |n: u8| Bytes::from(vec![n; 10]);
        cache.insert(1, block(1));
        cache.insert(2, block(2));
        cache.insert(3, block(3));
        assert_eq!(cache.bytes(), 30);
        // Using 1 makes 2 the least recently used.
        assert!(cache.get(&1).is_some());
        cache.insert(4, block(4));
        assert!(cache.contains(&1) && !cache.contains(&2) && cache.contains(&3) && cache.contains(&4));
        assert_eq!(cache.bytes(), 30);
        // Replacing a block keeps the byte count right.
        cache.insert(4, Bytes::from(vec![4; 5]));
        assert_eq!(cache.bytes(), 25);
        // A block larger than the whole cache is not kept.
        cache.insert(5, Bytes::from(vec![5; 31]));
        assert!(!cache.contains(&5));
    }
}
