//! The chain: how entries are MAC'd, the log's header, and the line format.

use zeroize::Zeroizing;

use super::*;

/// How a log's MACs are keyed; its first entry says which (`chain=` in its detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainFormat {
    /// Every MAC computed in the token with the audit key: one token operation per entry.
    /// Logs whose first entry names no chain format.
    Token,
    /// `chain=hmac-sha256-segment-v2`: the entries `seq` with `seq / len == s` are MAC'd in
    /// process under a segment key the token derives with the audit key (see [`Chain`]).
    Segment {
        /// Entries per segment (`segment=` in the first entry).
        len: u64,
    },
}

impl ChainFormat {
    /// What new logs use.
    pub const CURRENT: ChainFormat = ChainFormat::Segment { len: SEGMENT_LEN };
}

/// Entries per segment key in new logs.
pub const SEGMENT_LEN: u64 = 4096;

pub(super) const SEGMENT_FORMAT: &str = "hmac-sha256-segment-v2";
pub(super) const SEGMENT_KEY_DOMAIN: &[u8] = b"strongroom audit segment key v2\0";

/// What a log's first entry says about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The log's random id.
    pub log_id: String,
    /// How its MACs are keyed.
    pub format: ChainFormat,
}

impl Header {
    /// Reads the detail of a log's first entry (`log_id=…; chain=…; segment=…; …`).
    pub fn parse(detail: &str) -> Option<Header> {
        let mut log_id = None;
        let mut chain = None;
        let mut segment = None;
        for field in detail.split("; ") {
            match field.split_once('=') {
                Some(("log_id", v)) => log_id = Some(v.to_owned()),
                Some(("chain", v)) => chain = Some(v),
                Some(("segment", v)) => segment = v.parse::<u64>().ok(),
                _ => {}
            }
        }
        let format = match chain {
            None => ChainFormat::Token,
            Some(SEGMENT_FORMAT) => ChainFormat::Segment {
                len: segment.filter(|&n| n > 0)?,
            },
            Some(_) => return None,
        };
        Some(Header {
            log_id: log_id?,
            format,
        })
    }

    pub(super) fn to_detail(&self) -> String {
        match self.format {
            ChainFormat::Token => format!("log_id={}", self.log_id),
            ChainFormat::Segment { len } => format!(
                "log_id={}; chain={SEGMENT_FORMAT}; segment={len}",
                self.log_id
            ),
        }
    }
}

/// Computes a log's chain: `m_i = HMAC-SHA256(k, m_{i-1} ‖ body_i)`, `m_{-1}` = 32 zero bytes.
///
/// In the segment format, `k` for entry `i` is the key of its segment `s = i / len`:
/// `k_s = HMAC-SHA256(audit key, domain ‖ log_id ‖ 0 ‖ len ‖ s)`, computed in the token with
/// the audit key, which never leaves it. Forging, editing or re-chaining any entry needs a
/// segment key, so needs the token (or the memory of the running service, which holds only
/// the key of the segment it is writing). One token operation per `len` entries instead of
/// one per entry. In the token format, `k` is the audit key itself and every MAC is a token
/// operation.
pub struct Chain {
    pub(super) log_id: String,
    format: ChainFormat,
    /// The current segment and its key (ring's key schedule; the derived bytes themselves
    /// are zeroized as soon as it is built).
    key: Option<(u64, ring::hmac::Key)>,
}

impl Chain {
    /// The chain of log `log_id` in `format`.
    pub fn new(log_id: String, format: ChainFormat) -> Self {
        Self {
            log_id,
            format,
            key: None,
        }
    }

    /// The MAC of entry `seq` with body `body` after `prev`. `token_mac(data)` is
    /// HMAC-SHA256 of `data` with the audit key, in the token.
    pub fn mac<E>(
        &mut self,
        seq: u64,
        prev: &[u8],
        body: &[u8],
        token_mac: &mut impl FnMut(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let len = match self.format {
            ChainFormat::Token => {
                let mut input = Vec::with_capacity(prev.len() + body.len());
                input.extend_from_slice(prev);
                input.extend_from_slice(body);
                return token_mac(&input);
            }
            ChainFormat::Segment { len } => len,
        };
        let segment = seq / len;
        let key = match &self.key {
            Some((s, k)) if *s == segment => k,
            _ => {
                let mut input = SEGMENT_KEY_DOMAIN.to_vec();
                input.extend_from_slice(self.log_id.as_bytes());
                input.push(0);
                input.extend_from_slice(&len.to_be_bytes());
                input.extend_from_slice(&segment.to_be_bytes());
                let bytes = Zeroizing::new(token_mac(&input)?);
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
                &self.key.insert((segment, k)).1
            }
        };
        let mut ctx = ring::hmac::Context::with_key(key);
        ctx.update(prev);
        ctx.update(body);
        Ok(ctx.sign().as_ref().to_vec())
    }
}

pub(super) fn new_log_id() -> Result<String, AuditError> {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| AuditError::Io {
            path: String::new(),
            source: std::io::Error::other("the system random generator failed"),
        })?;
    Ok(hex::encode(id))
}

/// The line for an entry body (`{...}`) and its MAC: `{...,"mac":"<hex>"}\n`.
pub(super) fn line_with_mac(body: &[u8], mac: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(body.len() + 80);
    // serde_json always ends an object with '}'.
    line.extend_from_slice(&body[..body.len().saturating_sub(1)]);
    line.extend_from_slice(b",\"mac\":\"");
    line.extend_from_slice(hex::encode(mac).as_bytes());
    line.extend_from_slice(b"\"}\n");
    line
}

/// Splits a line into its body (what the MAC covers) and its MAC.
pub fn split_line(line: &str) -> Option<(String, Vec<u8>)> {
    const MARK: &str = ",\"mac\":\"";
    let at = line.rfind(MARK)?;
    let rest = &line[at + MARK.len()..];
    let mac_hex = rest.strip_suffix("\"}")?;
    let mac = hex::decode(mac_hex).ok()?;
    let mut body = line[..at].to_owned();
    body.push('}');
    Some((body, mac))
}
