//! `[server.connections]` / `[admin.connections]`: each listener's caps and deadlines, as
//! written in the file and as resolved over the listener's defaults.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[server.connections]` / `[admin.connections]`: what one listener's connections may
/// hold. Unset values take the listener's defaults ([`FrontLimits::client`],
/// [`FrontLimits::admin`]), which are meant to be safe on the internet.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// How long a client has to complete the TLS handshake, in milliseconds.
    pub handshake_timeout_ms: Option<u64>,
    /// Handshakes in progress at once; beyond it the oldest handshake is dropped.
    pub max_handshakes: Option<usize>,
    /// Open connections; beyond it the oldest connection still in its handshake is dropped,
    /// else the new one. Lowered at start to fit the process's descriptor limit.
    pub max_connections: Option<usize>,
    /// Open connections from one source address; beyond it new ones are closed at once.
    pub max_connections_per_ip: Option<usize>,
    /// A connection with no request in flight for this long is closed, in seconds.
    pub idle_timeout_secs: Option<u64>,
    /// HTTP/2 keepalive: a PING after this many seconds of silence...
    pub keepalive_interval_secs: Option<u64>,
    /// ...and the connection is closed if its answer takes longer than this.
    pub keepalive_timeout_secs: Option<u64>,
    /// HTTP/2 streams (requests) in flight on one connection.
    pub max_concurrent_streams: Option<u32>,
    /// Largest HTTP/2 header list a client may send, in bytes.
    pub max_header_list_bytes: Option<u32>,
}

impl ConnectionLimits {
    /// These settings over `defaults`.
    pub fn resolve(&self, defaults: FrontLimits) -> FrontLimits {
        use std::time::Duration;
        let d = defaults;
        FrontLimits {
            handshake_timeout: self
                .handshake_timeout_ms
                .map_or(d.handshake_timeout, Duration::from_millis),
            max_handshakes: self.max_handshakes.unwrap_or(d.max_handshakes),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            idle_timeout: self
                .idle_timeout_secs
                .map_or(d.idle_timeout, Duration::from_secs),
            keepalive_interval: self
                .keepalive_interval_secs
                .map_or(d.keepalive_interval, Duration::from_secs),
            keepalive_timeout: self
                .keepalive_timeout_secs
                .map_or(d.keepalive_timeout, Duration::from_secs),
            max_concurrent_streams: self
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            max_header_list_bytes: self
                .max_header_list_bytes
                .unwrap_or(d.max_header_list_bytes),
        }
    }

    pub(super) fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let bad = |what: &str, range: &str| {
            Err(ConfigError::Invalid(format!(
                "{section}.connections.{what} must be {range}"
            )))
        };
        if self
            .handshake_timeout_ms
            .is_some_and(|v| !(1..=600_000).contains(&v))
        {
            return bad("handshake_timeout_ms", "1..=600000");
        }
        if self
            .max_handshakes
            .is_some_and(|v| !(1..=1_000_000).contains(&v))
        {
            return bad("max_handshakes", "1..=1000000");
        }
        if self
            .max_connections
            .is_some_and(|v| !(1..=1_000_000).contains(&v))
        {
            return bad("max_connections", "1..=1000000");
        }
        if self
            .max_connections_per_ip
            .is_some_and(|v| !(1..=1_000_000).contains(&v))
        {
            return bad("max_connections_per_ip", "1..=1000000");
        }
        if self
            .idle_timeout_secs
            .is_some_and(|v| !(1..=86_400).contains(&v))
        {
            return bad("idle_timeout_secs", "1..=86400");
        }
        if self
            .keepalive_interval_secs
            .is_some_and(|v| !(1..=86_400).contains(&v))
        {
            return bad("keepalive_interval_secs", "1..=86400");
        }
        if self
            .keepalive_timeout_secs
            .is_some_and(|v| !(1..=3_600).contains(&v))
        {
            return bad("keepalive_timeout_secs", "1..=3600");
        }
        if self
            .max_concurrent_streams
            .is_some_and(|v| !(1..=10_000).contains(&v))
        {
            return bad("max_concurrent_streams", "1..=10000");
        }
        if self
            .max_header_list_bytes
            .is_some_and(|v| !(1024..=1 << 20).contains(&v))
        {
            return bad("max_header_list_bytes", "1024..=1048576");
        }
        Ok(())
    }
}

/// The resolved caps and deadlines of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontLimits {
    /// TLS handshake deadline.
    pub handshake_timeout: std::time::Duration,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Open connections.
    pub max_connections: usize,
    /// Open connections per source address.
    pub max_connections_per_ip: usize,
    /// Idle connections are closed after this.
    pub idle_timeout: std::time::Duration,
    /// HTTP/2 keepalive PING interval.
    pub keepalive_interval: std::time::Duration,
    /// HTTP/2 keepalive PING answer deadline.
    pub keepalive_timeout: std::time::Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 header list size.
    pub max_header_list_bytes: u32,
}

impl FrontLimits {
    /// Defaults of the client listener.
    pub const fn client() -> Self {
        use std::time::Duration;
        Self {
            handshake_timeout: Duration::from_secs(10),
            // Room for a thousand connections that never speak to wait out their deadline:
            // below the cap they cost a few KiB each and nothing else, while a full listener
            // evicts, and a peer that reconnects at once turns each eviction into a new accept.
            max_handshakes: 1024,
            max_connections: 4096,
            max_connections_per_ip: 256,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 * 1024,
        }
    }

    /// Defaults of the admin listener: a handful of officers.
    pub const fn admin() -> Self {
        let c = Self::client();
        Self {
            max_handshakes: 64,
            max_connections: 128,
            max_connections_per_ip: 32,
            ..c
        }
    }
}
