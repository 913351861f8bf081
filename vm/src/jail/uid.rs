//! Per-guest uids/gids from a range the seller reserves in its config: no two live
//! guests share one, so a VMM that escapes cannot signal or ptrace its neighbours.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// A reserved id range, `base .. base + count`; uid and gid are the same number.
#[derive(Debug)]
pub struct UidPool {
    base: u32,
    count: u32,
    used: Mutex<BTreeSet<u32>>,
}

/// One guest's id, given back to the pool on drop.
#[derive(Debug)]
pub struct UidLease {
    pool: Arc<UidPool>,
    id: u32,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.id
    }
    pub fn gid(&self) -> u32 {
        self.id
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool
            .used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl UidPool {
    /// A pool of `count` ids from `base`. Id 0 (root) is never handed out.
    pub fn new(base: u32, count: u32) -> Arc<UidPool> {
        Arc::new(UidPool {
            base: base.max(1),
            count: count.min(u32::MAX - base.max(1)),
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// The lowest free id, or `None` when every id is taken.
    pub fn take(self: &Arc<Self>) -> Option<UidLease> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let id = (self.base..self.base + self.count).find(|id| !used.contains(id))?;
        used.insert(id);
        Some(UidLease {
            pool: self.clone(),
            id,
        })
    }

    /// Whether `uid` lies in the reserved range (the crash sweep kills only those).
    pub fn contains(&self, uid: u32) -> bool {
        (self.base..self.base + self.count).contains(&uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_reused_and_bounded() {
        let p = UidPool::new(0, 2);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_eq!((a.uid(), b.uid()), (1, 2), "root is never handed out");
        assert!(p.take().is_none());
        drop(a);
        assert_eq!(p.take().unwrap().uid(), 1);
        assert!(p.contains(2) && !p.contains(3));
    }
}
