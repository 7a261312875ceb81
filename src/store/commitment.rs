//! The store's state commitment: a keyed incremental multiset hash over every record that
//! drives a decision, so that one record put back, lost or added outside the service shows.
//!
//! Each key/value pair contributes an element `HMAC-SHA256(k, 0x01 ‖ len(key) ‖ key ‖ value)`;
//! the commitment is the sum of the elements modulo 2^256. A write changes it by
//! `h(new) − h(old)` in the same atomic batch as the write, so it never needs a full scan;
//! a scan recomputes it from scratch to check the stored value. Without `k` (derived from the
//! token's store MAC key, never stored) nobody can compute an element, so nobody can make
//! the sum match a state the service did not write (a keyed additive multiset hash).
//!
//! Elements are defined over one key layout for every backend, sled's (see
//! [`SledStore`](super::SledStore)): `h` + name, `r` + name + `\0` + version (8 bytes
//! big-endian), `w` + master key version (4 bytes big-endian), `p`/`a`/`m` + key. Other
//! backends map their keys to it, so the same records give the same commitment on any
//! backend. A version record contributes its key and its metadata (every field but its
//! wrapped key, nonce and ciphertext, whatever its format: a v2 record's AAD binds the
//! metadata too, and the commitment still shows one put back), not its sealed bytes
//! ([`StateKey::element`]). A head contributes its whole value (latest version, deleted
//! flag, oldest kept version, max versions), so where an incarnation starts and how many
//! versions it keeps are committed like the rest.
//!
//! The store also keeps a tag `HMAC(k, 0x02 ‖ domain ‖ store id ‖ epoch ‖ commitment)` beside
//! the commitment, so neither the epoch nor the commitment can be edited on their own.

use prost::Message;
use ring::hmac;
use zeroize::Zeroizing;

use crate::secret::SealedRecord;

/// Domain of the frame tag.
const FRAME_DOMAIN: &[u8] = b"strongroom/store-state/v1\0";

/// The first byte of a version record's key in the common layout.
pub(crate) const RECORD_KIND: u8 = b'r';
/// The first byte of bookkeeping keys (the frame's among them) in the common layout.
pub(crate) const META_KIND: u8 = b'm';
/// Meta keys of the frame: the store's random identity, its write counter, and its
/// commitment with the tag. The only keys the commitment does not cover.
pub(crate) const STORE_ID: &str = "store-id";
/// See [`STORE_ID`].
pub(crate) const EPOCH: &str = "epoch";
/// See [`STORE_ID`].
pub(crate) const STATE: &str = "state";

/// Whether `key` (common layout) is part of the frame.
pub(crate) fn is_frame_key(key: &[u8]) -> bool {
    key.first() == Some(&META_KIND)
        && [STORE_ID, EPOCH, STATE]
            .iter()
            .any(|f| &key[1..] == f.as_bytes())
}

/// The stored form of the commitment and its tag: 32 bytes each.
pub(crate) fn frame_value(c: &Commitment, tag: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&c.0);
    v.extend_from_slice(tag);
    v
}

/// What the token's store MAC key signs to give the [`StateKey`] (the service at start, and
/// the officers' offline tools that open the store).
pub const STATE_KEY_DOMAIN: &[u8] = b"strongroom/state-commitment-key/v1\0";

/// The key the store hashes its records under. No `Debug`, no `Clone`; the bytes it was made
/// from are zeroized when the caller drops them (ring keeps its own copy).
pub struct StateKey(hmac::Key);

impl StateKey {
    /// A key from 32 secret bytes (the service derives them from the token's store MAC key).
    pub fn new(bytes: &Zeroizing<[u8; 32]>) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref()))
    }

    /// The element of one committed pair, `key` in the common layout. A version record
    /// contributes its key and its metadata (creation time and creator, validity window,
    /// mechanism, master key version, format), not its wrapped key, nonce and ciphertext:
    /// damage there is the AAD's to catch, and costs that one record (DATA_LOSS), not the
    /// whole store. A record that no longer decodes contributes its raw bytes, so it shows
    /// as a changed state.
    pub(crate) fn element(&self, key: &[u8], value: &[u8]) -> Commitment {
        if key.first() == Some(&RECORD_KIND)
            && let Ok(r) = SealedRecord::decode(value)
        {
            let committed = SealedRecord {
                wrapped_dek: Vec::new(),
                nonce: Vec::new(),
                ciphertext: Vec::new(),
                ..r
            };
            return self.pair_element(key, &committed.encode_to_vec());
        }
        self.pair_element(key, value)
    }

    /// The element of one key/value pair as bytes.
    fn pair_element(&self, key: &[u8], value: &[u8]) -> Commitment {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(&[1]);
        // Keys are at most a few KiB (names are bounded), so the length fits.
        ctx.update(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
        ctx.update(key);
        ctx.update(value);
        Commitment::from_tag(ctx.sign().as_ref())
    }

    /// The tag that binds the store's identity, epoch and commitment together.
    pub(crate) fn frame_tag(&self, store_id: &str, epoch: u64, c: &Commitment) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&hmac::sign(&self.0, &frame_input(store_id, epoch, c)).as_ref()[..32]);
        out
    }

    /// Whether `tag` is the frame tag of these values (compared in constant time).
    pub(crate) fn frame_tag_ok(
        &self,
        store_id: &str,
        epoch: u64,
        c: &Commitment,
        tag: &[u8],
    ) -> bool {
        hmac::verify(&self.0, &frame_input(store_id, epoch, c), tag).is_ok()
    }
}

/// The commitment and its status from the stored frame value (absent: `Missing`), checked
/// against the identity and epoch stored beside it.
pub(crate) fn parse_frame(
    key: &StateKey,
    store_id: &str,
    epoch: u64,
    stored: Option<&[u8]>,
) -> (Commitment, super::FrameStatus) {
    use super::FrameStatus;
    match stored {
        None => (Commitment::EMPTY, FrameStatus::Missing),
        Some(v) if v.len() == 64 => {
            let mut c = [0u8; 32];
            c.copy_from_slice(&v[..32]);
            let c = Commitment(c);
            let status = if key.frame_tag_ok(store_id, epoch, &c, &v[32..]) {
                FrameStatus::Valid
            } else {
                FrameStatus::Forged
            };
            (c, status)
        }
        Some(_) => (Commitment::EMPTY, FrameStatus::Forged),
    }
}

fn frame_input(store_id: &str, epoch: u64, c: &Commitment) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + FRAME_DOMAIN.len() + 4 + store_id.len() + 8 + 32);
    m.push(2);
    m.extend_from_slice(FRAME_DOMAIN);
    m.extend_from_slice(
        &u32::try_from(store_id.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    m.extend_from_slice(store_id.as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&c.0);
    m
}

/// A commitment: a 256-bit number, little-endian, added to and subtracted from modulo 2^256.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Commitment(pub [u8; 32]);

impl Commitment {
    /// The commitment of an empty store.
    pub const EMPTY: Commitment = Commitment([0; 32]);

    fn from_tag(tag: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag[..32]);
        Self(out)
    }

    fn limbs(&self) -> [u64; 4] {
        let mut l = [0u64; 4];
        for (i, limb) in l.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.0[i * 8..i * 8 + 8]);
            *limb = u64::from_le_bytes(b);
        }
        l
    }

    fn from_limbs(l: [u64; 4]) -> Self {
        let mut out = [0u8; 32];
        for (i, limb) in l.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        Self(out)
    }

    /// `self + other` modulo 2^256.
    pub fn add(&self, other: &Commitment) -> Commitment {
        let (a, b) = (self.limbs(), other.limbs());
        let mut out = [0u64; 4];
        let mut carry = false;
        for i in 0..4 {
            let (s, c1) = a[i].overflowing_add(b[i]);
            let (s, c2) = s.overflowing_add(u64::from(carry));
            out[i] = s;
            carry = c1 || c2;
        }
        Self::from_limbs(out)
    }

    /// `self − other` modulo 2^256.
    pub fn sub(&self, other: &Commitment) -> Commitment {
        let (a, b) = (self.limbs(), other.limbs());
        let mut out = [0u64; 4];
        let mut borrow = false;
        for i in 0..4 {
            let (d, b1) = a[i].overflowing_sub(b[i]);
            let (d, b2) = d.overflowing_sub(u64::from(borrow));
            out[i] = d;
            borrow = b1 || b2;
        }
        Self::from_limbs(out)
    }

    /// Lowercase hex, as the token's checkpoint keeps it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`to_hex`](Self::to_hex)'s output.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(<[u8; 32]>::try_from(bytes.as_slice()).ok()?))
    }
}

impl std::fmt::Debug for Commitment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Public: it reveals nothing without the key.
        write!(f, "Commitment({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> StateKey {
        StateKey::new(&Zeroizing::new([b; 32]))
    }

    fn record(ciphertext: u8) -> SealedRecord {
        SealedRecord {
            name: "a".into(),
            version: 1,
            master_key_version: 1,
            mechanism: 1,
            wrapped_dek: vec![ciphertext; 60],
            nonce: vec![ciphertext; 12],
            ciphertext: vec![ciphertext; 20],
            created_at_unix: 5,
            created_by: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_contributes_what_its_aad_does_not_bind() {
        let k = key(7);
        let rk = b"ra\0\0\0\0\0\0\0\0\x01";
        let (r1, r2) = (record(1).encode_to_vec(), record(2).encode_to_vec());
        // Wrapped key, nonce and ciphertext are the AAD's to check.
        assert_eq!(k.element(rk, &r1), k.element(rk, &r2));
        // Fields the AAD does not bind are committed.
        let later = SealedRecord {
            created_at_unix: 6,
            ..record(1)
        };
        assert_ne!(k.element(rk, &r1), k.element(rk, &later.encode_to_vec()));
        // Outside records the value is committed whole; a record that does not decode too.
        assert_ne!(k.element(b"pa", &r1), k.element(b"pa", &r2));
        assert_ne!(k.element(rk, b"\xff\xff"), k.element(rk, b"\xff\xfe"));
        assert!(is_frame_key(b"mepoch") && is_frame_key(b"mstate") && is_frame_key(b"mstore-id"));
        assert!(!is_frame_key(b"mpolicy-seeded") && !is_frame_key(b"pepoch"));
    }

    #[test]
    fn sums_are_order_independent_and_subtraction_undoes_addition() {
        let k = key(7);
        let (a, b, c) = (
            k.pair_element(b"ha", b"1"),
            k.pair_element(b"hb", b"2"),
            k.pair_element(b"hc", b"3"),
        );
        let x = Commitment::EMPTY.add(&a).add(&b).add(&c);
        let y = Commitment::EMPTY.add(&c).add(&a).add(&b);
        assert_eq!(x, y);
        assert_eq!(x.sub(&b).sub(&a).sub(&c), Commitment::EMPTY);
        // Wrapping at 2^256 both ways.
        let max = Commitment([0xff; 32]);
        let one = Commitment::from_limbs([1, 0, 0, 0]);
        assert_eq!(max.add(&one), Commitment::EMPTY);
        assert_eq!(Commitment::EMPTY.sub(&one), max);
        assert_eq!(Commitment::from_hex(&x.to_hex()), Some(x));
    }

    #[test]
    fn elements_bind_key_value_and_secret_key() {
        let k = key(7);
        assert_ne!(k.element(b"ha", b"1"), k.element(b"ha", b"2"));
        assert_ne!(k.element(b"ha", b"1"), k.element(b"hb", b"1"));
        // The length prefix: moving a byte between key and value changes the element.
        assert_ne!(k.element(b"hab", b"c"), k.element(b"ha", b"bc"));
        assert_ne!(k.element(b"ha", b"1"), key(8).element(b"ha", b"1"));
        let c = Commitment::EMPTY.add(&k.element(b"ha", b"1"));
        let tag = k.frame_tag("id", 3, &c);
        assert!(k.frame_tag_ok("id", 3, &c, &tag));
        assert!(!k.frame_tag_ok("id", 4, &c, &tag));
        assert!(!k.frame_tag_ok("other", 3, &c, &tag));
        assert!(!key(8).frame_tag_ok("id", 3, &c, &tag));
    }
}
