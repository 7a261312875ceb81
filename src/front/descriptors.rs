//! File descriptors: the process's limit is raised to its hard limit at start, and the
//! listeners' connection caps are fitted under it, so accept never runs out while the
//! store, the token and the audit log still need descriptors of their own.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::config::FrontLimits;

/// Descriptors kept for everything but connections: the store's files, the token's files
/// (SoftHSM2 opens them on every operation on a token object), the audit log, the runtime
/// and logs. Each listener also keeps room for connections evicted but not yet closed.
const MIN_RESERVE: u64 = 96;

/// The soft RLIMIT_NOFILE after trying to raise it to the hard limit, and the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorLimit {
    /// The limit in force now.
    pub soft: u64,
    /// What it may be raised to.
    pub hard: Option<u64>,
    /// Whether this call raised it.
    pub raised: bool,
}

/// Raises the soft descriptor limit to the hard limit (or to the kernel's `nr_open` when the
/// hard limit is unlimited).
pub fn raise_limit() -> DescriptorLimit {
    let now = getrlimit(Resource::Nofile);
    let target = now.maximum.or_else(nr_open);
    let soft = now.current.unwrap_or(u64::MAX);
    match target {
        Some(target) if target > soft => {
            let raised = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(target),
                    maximum: now.maximum,
                },
            )
            .is_ok();
            DescriptorLimit {
                soft: if raised { target } else { soft },
                hard: now.maximum,
                raised,
            }
        }
        _ => DescriptorLimit {
            soft,
            hard: now.maximum,
            raised: false,
        },
    }
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Lowers the listeners' connection caps, when needed, so that together they fit in
/// `soft` descriptors minus a reserve. The admin plane keeps at least a quarter of what is
/// left (up to its own cap), so a flood on the client listener cannot starve the officers.
/// Returns the fitted caps and whether anything was lowered.
pub fn fit(
    soft: u64,
    client: FrontLimits,
    admin: Option<FrontLimits>,
) -> (FrontLimits, Option<FrontLimits>, bool) {
    let listeners = if admin.is_some() { 2 } else { 1 };
    let reserve =
        MIN_RESERVE.max(soft / 8) + listeners * super::table::MAX_PENDING_EVICTIONS as u64;
    let available = usize::try_from(soft.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .max(2);
    let admin_wants = admin.map_or(0, |a| a.max_connections);
    if client.max_connections.saturating_add(admin_wants) <= available {
        return (client, admin, false);
    }
    let admin = admin.map(|a| {
        let cap = a.max_connections.min((available / 4).max(1));
        FrontLimits {
            max_connections: cap,
            max_handshakes: a.max_handshakes.min(cap),
            max_connections_per_ip: a.max_connections_per_ip.min(cap),
            ..a
        }
    });
    let left = available
        .saturating_sub(admin.map_or(0, |a| a.max_connections))
        .max(1);
    let cap = client.max_connections.min(left);
    let client = FrontLimits {
        max_connections: cap,
        max_handshakes: client.max_handshakes.min(cap),
        max_connections_per_ip: client.max_connections_per_ip.min(cap),
        ..client
    };
    (client, admin, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_are_kept() {
        let (c, a, lowered) = fit(65536, FrontLimits::client(), Some(FrontLimits::admin()));
        assert!(!lowered);
        assert_eq!(c, FrontLimits::client());
        assert_eq!(a, Some(FrontLimits::admin()));
    }

    #[test]
    fn a_small_limit_lowers_both_and_keeps_room_for_the_admin_plane() {
        let (c, a, lowered) = fit(256, FrontLimits::client(), Some(FrontLimits::admin()));
        let a = a.unwrap();
        assert!(lowered);
        let pending = 2 * crate::front::table::MAX_PENDING_EVICTIONS;
        assert!(c.max_connections + a.max_connections + pending <= 256 - MIN_RESERVE as usize);
        assert!(a.max_connections >= 16, "{a:?}");
        assert!(c.max_handshakes <= c.max_connections);
        assert!(c.max_connections_per_ip <= c.max_connections);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let before = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let after = raise_limit();
        assert!(after.soft >= before);
    }
}
