//! ListSecrets page tokens: opaque, and authenticated with a key derived in the token, so
//! a token the service did not issue, or one issued to another caller or for another prefix,
//! is refused.

use zeroize::Zeroizing;

use super::State;
use crate::error::Error;
use crate::hsm::keys::{MacKey, derive_key};
use crate::secret::NamePrefix;
use crate::tls::Identity;

/// What the token's store MAC key signs to derive the page-token key. No other MAC under
/// that key starts with these bytes (policies and approvals have their own domains).
const PAGE_TOKEN_KEY_DOMAIN: &[u8] = b"strongroom/page-token-key/v1\0";
/// What every page-token MAC starts with.
const PAGE_TOKEN_DOMAIN: &[u8] = b"strongroom/page-token/v1\0";
/// The encoding of page tokens this build issues and accepts.
const PAGE_TOKEN_VERSION: u8 = 1;
/// HMAC-SHA256 tag length.
const PAGE_TOKEN_TAG_LEN: usize = 32;
/// The longest token text a valid token can be (version, a name at the ceiling, tag), so a
/// large token is refused before it is decoded.
const MAX_PAGE_TOKEN_CHARS: usize =
    (1 + crate::secret::MAX_NAME_BYTES_CEILING + PAGE_TOKEN_TAG_LEN).div_ceil(3) * 4;

/// The key that authenticates ListSecrets page tokens.
///
/// Derived from the token's store MAC key (HMAC-SHA256 of a fixed domain string), so every
/// replica on the same token computes the same key and tokens survive restarts; the token
/// is asked once, and the derived key lives in process. No `Debug`, no `Clone`; zeroized on
/// drop.
pub(crate) struct PageTokenKey(Zeroizing<[u8; 32]>);

impl PageTokenKey {
    /// Asks the token for the key: one MAC under the store key.
    pub(crate) async fn derive(state: &State) -> Result<Self, Error> {
        let key = derive_key(
            &state.hsm,
            MacKey::Store,
            PAGE_TOKEN_KEY_DOMAIN,
            state.hsm_timeout,
        )
        .await?;
        Ok(Self(key))
    }

    /// A token to resume a listing of `prefix` by `identity` after `resume`: base64url of
    /// `version || resume || HMAC(domain || version || identity || prefix || resume)`, each
    /// variable field but the last length-prefixed. Only this service can make one, and it
    /// is good only for this caller and this prefix.
    pub(crate) fn issue(&self, identity: &Identity, prefix: &NamePrefix, resume: &str) -> String {
        use base64::Engine as _;
        let tag = self.tag(PAGE_TOKEN_VERSION, identity, prefix, resume.as_bytes());
        let mut token = Vec::with_capacity(1 + resume.len() + PAGE_TOKEN_TAG_LEN);
        token.push(PAGE_TOKEN_VERSION);
        token.extend_from_slice(resume.as_bytes());
        // The tag is public by design: it is what the caller hands back.
        token.extend_from_slice(tag.as_ref());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    }

    /// The resume point of a token this service issued to `identity` for `prefix`; any other
    /// token is INVALID_ARGUMENT.
    pub(crate) fn open(
        &self,
        token: &str,
        identity: &Identity,
        prefix: &NamePrefix,
    ) -> Result<String, Error> {
        use base64::Engine as _;
        let refuse = || {
            Error::InvalidArgument(
                "page_token was not issued by this service for this caller and prefix; list again from the start"
                    .into(),
            )
        };
        if token.len() > MAX_PAGE_TOKEN_CHARS {
            return Err(refuse());
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| refuse())?;
        if bytes.len() < 1 + PAGE_TOKEN_TAG_LEN || bytes[0] != PAGE_TOKEN_VERSION {
            return Err(refuse());
        }
        let (body, tag) = bytes.split_at(bytes.len() - PAGE_TOKEN_TAG_LEN);
        let resume = &body[1..];
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.0.as_ref());
        let input = page_token_input(PAGE_TOKEN_VERSION, identity, prefix, resume);
        ring::hmac::verify(&key, &input, tag).map_err(|_| refuse())?;
        String::from_utf8(resume.to_vec()).map_err(|_| refuse())
    }

    fn tag(
        &self,
        version: u8,
        identity: &Identity,
        prefix: &NamePrefix,
        resume: &[u8],
    ) -> ring::hmac::Tag {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.0.as_ref());
        ring::hmac::sign(&key, &page_token_input(version, identity, prefix, resume))
    }
}

/// What a page token's MAC covers: domain, version, the caller's identity and the
/// requested prefix (each length-prefixed), then the resume key.
fn page_token_input(
    version: u8,
    identity: &Identity,
    prefix: &NamePrefix,
    resume: &[u8],
) -> Vec<u8> {
    let id = identity.as_str().as_bytes();
    let prefix = prefix.as_str().as_bytes();
    let mut input =
        Vec::with_capacity(PAGE_TOKEN_DOMAIN.len() + 9 + id.len() + prefix.len() + resume.len());
    input.extend_from_slice(PAGE_TOKEN_DOMAIN);
    input.push(version);
    for field in [id, prefix] {
        // Identities and prefixes are far below 4 GiB (certificate SANs, max_name_bytes).
        input.extend_from_slice(&(field.len() as u32).to_be_bytes());
        input.extend_from_slice(field);
    }
    input.extend_from_slice(resume);
    input
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bind_caller_and_prefix() {
        use base64::Engine as _;
        let key = PageTokenKey(Zeroizing::new([7; 32]));
        let alice = Identity::new("spiffe://t/alice");
        let bob = Identity::new("spiffe://t/bob");
        let prefix = |p: &str| NamePrefix::parse(p, 256).unwrap();
        let t = key.issue(&alice, &prefix("payments"), "payments/db");
        assert!(!t.contains("payments"), "{t}");
        assert_eq!(
            key.open(&t, &alice, &prefix("payments")).unwrap(),
            "payments/db"
        );
        // "payments/" is the same prefix as "payments".
        assert!(key.open(&t, &alice, &prefix("payments/")).is_ok());
        let refused = |token: &str, id: &Identity, p: &str| {
            let e = key.open(token, id, &prefix(p)).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.to_string().contains("not issued by this service"), "{e}");
        };
        refused(&t, &bob, "payments");
        refused(&t, &alice, "payments/db");
        refused(&t, &alice, "");
        // Another key (another token) did not issue it.
        let other = PageTokenKey(Zeroizing::new([8; 32]));
        assert!(other.open(&t, &alice, &prefix("payments")).is_err());
        // Every single-bit change anywhere in the token is refused.
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&t)
            .unwrap();
        for i in 0..raw.len() {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[i] ^= 1 << bit;
                let bad = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bad);
                refused(&bad, &alice, "payments");
            }
        }
        // Garbage, the old format (hex of a name), truncations and giants.
        for bad in [
            "zz".to_owned(),
            hex::encode("payments/db"),
            t[..t.len() - 2].to_owned(),
            String::new() + "A",
            "A".repeat(MAX_PAGE_TOKEN_CHARS + 4),
        ] {
            refused(&bad, &alice, "payments");
        }
        // The longest valid token fits the length bound.
        let longest = "n".repeat(crate::secret::MAX_NAME_BYTES_CEILING);
        let t = key.issue(&alice, &prefix(""), &longest);
        assert!(t.len() <= MAX_PAGE_TOKEN_CHARS);
        assert_eq!(key.open(&t, &alice, &prefix("")).unwrap(), longest);
    }
}
