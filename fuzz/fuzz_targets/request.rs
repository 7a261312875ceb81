//! Arbitrary bytes as the service's request messages, then the parsing the service does
//! before it touches policy or the store (src/service/secrets.rs): the name under the
//! default limits, the list prefix, the page size and the page token.
//!
//! Also checks that the redacting `Debug` of messages that carry a value depends on the
//! value's length only, and that page tokens round-trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strongroom::config::Limits;
use strongroom::proto::{
    DeleteSecretRequest, DescribeSecretRequest, GetSecretRequest, GetSecretResponse,
    ListSecretsRequest, PutSecretRequest,
};
use strongroom::secret::{NamePrefix, SecretName};

/// `decode_page_token` of src/service/secrets.rs (private there): hex of a valid name.
fn decode_page_token(token: &str, max_name: usize) -> Option<SecretName> {
    let bytes = hex::decode(token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    SecretName::parse(&text, max_name).ok()
}

fn parse_name(name: &str, limits: &Limits) -> Option<SecretName> {
    let parsed = SecretName::parse(name, limits.max_name_bytes).ok()?;
    assert_eq!(parsed.as_str(), name);
    assert!(name.len() <= limits.max_name_bytes);
    Some(parsed)
}

fn check_put(req: &PutSecretRequest, limits: &Limits) {
    let _ = parse_name(&req.name, limits);
    let _too_big = req.value.len() > limits.max_value_bytes;
    // The value never shows in Debug output: only its length does.
    let mut blank = req.clone();
    blank.value = vec![0; req.value.len()];
    assert_eq!(
        format!("{req:?}"),
        format!("{blank:?}"),
        "Debug shows the value"
    );
    let resp = GetSecretResponse {
        name: req.name.clone(),
        version: 1,
        value: req.value.clone(),
        created_at_unix: 0,
        expires_at_unix: req.expires_at_unix,
        not_before_unix: req.not_before_unix,
    };
    let blank = GetSecretResponse {
        value: vec![0; req.value.len()],
        ..resp.clone()
    };
    assert_eq!(
        format!("{resp:?}"),
        format!("{blank:?}"),
        "Debug shows the value"
    );
}

fn check_list(req: &ListSecretsRequest, limits: &Limits) {
    let Ok(prefix) = NamePrefix::parse(&req.prefix, limits.max_name_bytes) else {
        return;
    };
    let _page_size = match req.page_size as usize {
        0 => 100.min(limits.max_page_size),
        n if n > limits.max_page_size => return,
        n => n,
    };
    if req.page_token.is_empty() {
        return;
    }
    if let Some(after) = decode_page_token(&req.page_token, limits.max_name_bytes) {
        // The service issues tokens as lowercase hex; it accepts uppercase too.
        assert_eq!(
            hex::encode(after.as_str()),
            req.page_token.to_ascii_lowercase()
        );
        let _ = after.is_under(&prefix);
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(req) = PutSecretRequest::decode(data) {
        check_put(&req, &limits);
    }
    if let Ok(req) = GetSecretRequest::decode(data) {
        let _ = parse_name(&req.name, &limits);
    }
    if let Ok(req) = DescribeSecretRequest::decode(data) {
        let _ = parse_name(&req.name, &limits);
    }
    if let Ok(req) = DeleteSecretRequest::decode(data) {
        let _ = parse_name(&req.name, &limits);
    }
    if let Ok(req) = ListSecretsRequest::decode(data) {
        check_list(&req, &limits);
    }
    // Any name the service accepts makes a page token it accepts back.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(name) = SecretName::parse(text, limits.max_name_bytes)
    {
        let token = hex::encode(name.as_str());
        assert_eq!(
            decode_page_token(&token, limits.max_name_bytes).as_ref(),
            Some(&name)
        );
    }
});
