//! The connection table of one listener: open connections in total and per source, and the
//! handshakes in progress, oldest first, so the cheapest connection to drop is known.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::FrontLimits;

/// Evictions asked for but not yet carried out (the evicted task has not run): while this
/// many are pending, the listener stops accepting until one completes (the kernel's backlog
/// holds newcomers meanwhile), so the descriptor count stays within the cap plus this margin.
pub(crate) const MAX_PENDING_EVICTIONS: usize = 16;

/// Counts of one listener's connections, under its caps.
pub struct Table {
    limits: FrontLimits,
    inner: Mutex<Inner>,
    /// Signalled when an evicted connection is gone.
    evicted_gone: Notify,
}

#[derive(Default)]
struct Inner {
    open: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Connections still in their TLS handshake, by admission order.
    handshaking: BTreeMap<u64, Arc<Notify>>,
    pending_evictions: usize,
    next_id: u64,
    refused: u64,
    evicted: u64,
}

/// Counters for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableStats {
    /// Connections open now.
    pub open: usize,
    /// Of which in their handshake.
    pub handshaking: usize,
    /// Connections closed at accept (per-source cap, or no room).
    pub refused: u64,
    /// Connections dropped in their handshake to make room.
    pub evicted: u64,
}

/// A connection's place in the table, given back when dropped.
pub struct Admission {
    table: Arc<Table>,
    source: IpAddr,
    id: u64,
    /// Notified when the connection is evicted during its handshake.
    evict: Arc<Notify>,
    handshaking: bool,
}

impl Table {
    /// An empty table with these caps.
    pub fn new(limits: FrontLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
            evicted_gone: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The counters stay consistent under a panic elsewhere: every update is one step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip`, or `None` when it must be closed at once: its
    /// source is at its cap, or the listener is full of established connections. When the
    /// listener is full (connections or handshakes), the oldest connection still in its
    /// handshake is evicted to make room: a peer that never finishes a handshake cannot
    /// hold a slot against one that does.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admission> {
        let source = source_key(ip);
        let mut t = self.lock();
        if t.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_connections_per_ip {
            t.refused += 1;
            return None;
        }
        let full = t.open >= self.limits.max_connections + t.pending_evictions
            || t.handshaking.len() >= self.limits.max_handshakes;
        if full {
            match t.handshaking.pop_first() {
                Some((_, evict)) => {
                    evict.notify_one();
                    t.pending_evictions += 1;
                    t.evicted += 1;
                }
                None => {
                    t.refused += 1;
                    return None;
                }
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        t.open += 1;
        *t.per_source.entry(source).or_insert(0) += 1;
        let evict = Arc::new(Notify::new());
        t.handshaking.insert(id, evict.clone());
        Some(Admission {
            table: self.clone(),
            source,
            id,
            evict,
            handshaking: true,
        })
    }

    /// Waits while too many evictions are pending: the caller should not accept until then.
    /// Returns at once otherwise.
    pub async fn room_for_evictions(&self) {
        loop {
            let gone = self.evicted_gone.notified();
            if self.lock().pending_evictions < MAX_PENDING_EVICTIONS {
                return;
            }
            // Bounded, in case a notification raced the check.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(20), gone).await;
        }
    }

    /// The counters now.
    pub fn stats(&self) -> TableStats {
        let t = self.lock();
        TableStats {
            open: t.open,
            handshaking: t.handshaking.len(),
            refused: t.refused,
            evicted: t.evicted,
        }
    }
}

impl Admission {
    /// Completes when the table evicts this connection during its handshake.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// The handshake finished: the connection can no longer be evicted. `false` when it
    /// was evicted just before (the connection must close).
    pub fn handshake_done(&mut self) -> bool {
        if !self.handshaking {
            return true;
        }
        self.handshaking = false;
        let mut t = self.table.lock();
        if t.handshaking.remove(&self.id).is_some() {
            return true;
        }
        t.pending_evictions = t.pending_evictions.saturating_sub(1);
        self.table.evicted_gone.notify_one();
        // Still counted as open until dropped, like any connection.
        false
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut t = self.table.lock();
        if self.handshaking && t.handshaking.remove(&self.id).is_none() {
            // Not in the list while still handshaking: it was evicted, and is now gone.
            t.pending_evictions = t.pending_evictions.saturating_sub(1);
            self.table.evicted_gone.notify_one();
        }
        t.open = t.open.saturating_sub(1);
        if let Some(n) = t.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                t.per_source.remove(&self.source);
            }
        }
    }
}

/// The unit a per-source cap counts: an IPv4 address, or an IPv6 /64 (one host usually
/// holds a whole /64, so counting single IPv6 addresses would cap nothing).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize, handshakes: usize) -> FrontLimits {
        FrontLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            max_handshakes: handshakes,
            ..FrontLimits::client()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_per_source_cap_refuses_and_frees_on_drop() {
        let t = Arc::new(Table::new(limits(100, 2, 100)));
        let a = t.admit(ip("10.0.0.1")).unwrap();
        let _b = t.admit(ip("10.0.0.1")).unwrap();
        assert!(t.admit(ip("10.0.0.1")).is_none());
        assert!(t.admit(ip("10.0.0.2")).is_some());
        drop(a);
        assert!(t.admit(ip("10.0.0.1")).is_some());
        assert_eq!(t.stats().refused, 1);
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_v4_as_v4() {
        let t = Arc::new(Table::new(limits(100, 1, 100)));
        let _a = t.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(t.admit(ip("2001:db8:1:2::ffff")).is_none());
        assert!(t.admit(ip("2001:db8:1:3::1")).is_some());
        let _v4 = t.admit(ip("192.0.2.7")).unwrap();
        assert!(t.admit(ip("::ffff:192.0.2.7")).is_none());
    }

    #[tokio::test]
    async fn a_full_table_evicts_the_oldest_handshake_not_an_established_connection() {
        let t = Arc::new(Table::new(limits(2, 10, 10)));
        let mut established = t.admit(ip("10.0.0.1")).unwrap();
        assert!(established.handshake_done());
        let stalled = t.admit(ip("10.0.0.2")).unwrap();
        // Full: the stalled handshake is evicted for the newcomer.
        let newcomer = t.admit(ip("10.0.0.3")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), stalled.evicted())
            .await
            .expect("the oldest handshake is told to go");
        drop(stalled);
        assert_eq!(t.stats().open, 2);
        assert_eq!(t.stats().evicted, 1);
        // Now the newcomer is the only handshake; established connections are never evicted.
        let mut newcomer = newcomer;
        assert!(newcomer.handshake_done());
        assert!(
            t.admit(ip("10.0.0.4")).is_none(),
            "no handshake left to evict"
        );
        drop(established);
        assert!(t.admit(ip("10.0.0.4")).is_some());
    }

    #[tokio::test]
    async fn accepting_waits_while_too_many_evictions_are_pending() {
        let t = Arc::new(Table::new(limits(1, 1000, 1000)));
        let mut held = vec![t.admit(ip("10.0.0.1")).unwrap()];
        for i in 0..MAX_PENDING_EVICTIONS {
            held.push(t.admit(ip(&format!("10.0.1.{i}"))).unwrap());
        }
        // Every admission past the cap evicted one handshake, none of them gone yet.
        let wait = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            t.room_for_evictions(),
        );
        assert!(
            wait.await.is_err(),
            "accept must wait for evicted connections to go"
        );
        // The oldest (evicted) one goes: there is room again.
        drop(held.remove(0));
        tokio::time::timeout(std::time::Duration::from_secs(5), t.room_for_evictions())
            .await
            .expect("room once an evicted connection is gone");
    }

    #[test]
    fn the_handshake_cap_evicts_the_oldest_handshake() {
        let t = Arc::new(Table::new(limits(100, 100, 2)));
        let _a = t.admit(ip("10.0.0.1")).unwrap();
        let _b = t.admit(ip("10.0.0.2")).unwrap();
        let _c = t.admit(ip("10.0.0.3")).unwrap();
        let s = t.stats();
        assert_eq!((s.handshaking, s.evicted), (2, 1));
    }
}
