//! The protobuf codec of strongroom's gRPC services: prost's, except that a request that does
//! not decode (malformed bytes, invalid UTF-8 in a string field) is the caller's mistake and
//! answers INVALID_ARGUMENT rather than tonic's INTERNAL, and that every request message has a
//! size limit of its own, checked before it is decoded.
//!
//! The per-request limits sit inside the transport cap (`max_decoding_message_size`, which
//! tonic checks on the frame header before it reads the message): a message under the cap but
//! over its request's limit is refused with OUT_OF_RANGE, the code tonic gives a message over
//! the cap, and a message that names the limit. Requests that carry only names, ids and
//! small fields get a few KiB derived from `limits.max_name_bytes`; `PutSecretRequest` gets
//! `limits.max_value_bytes` plus that; `PutPolicyRequest` gets [`MAX_POLICY_DOCUMENT_BYTES`]
//! plus that. Responses are not limited here (clients decode them with this codec too).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::config::Limits;
use crate::proto;

/// The largest policy document `PutPolicy` accepts, in bytes.
pub const MAX_POLICY_DOCUMENT_BYTES: usize = 256 * 1024;
/// Room in a small request beyond its names: field tags and lengths, integers, an identity
/// (`CheckPolicy`), a capability.
pub const SMALL_REQUEST_ROOM: usize = 4096;
/// How many names' worth of bytes a small request may carry: a name or prefix, plus a page
/// token that encodes a name.
pub const NAMES_PER_SMALL_REQUEST: usize = 4;

/// `limits.max_value_bytes` in force (set once at start by [`set_limits`]).
static MAX_VALUE_BYTES: AtomicUsize = AtomicUsize::new(64 * 1024);
/// `limits.max_name_bytes` in force (set once at start by [`set_limits`]).
static MAX_NAME_BYTES: AtomicUsize = AtomicUsize::new(256);

/// Sets the limits the request size limits derive from. The service calls this once at start,
/// before it serves; until then the defaults of [`Limits`] apply.
pub fn set_limits(limits: &Limits) {
    MAX_VALUE_BYTES.store(limits.max_value_bytes, Ordering::Relaxed);
    MAX_NAME_BYTES.store(limits.max_name_bytes, Ordering::Relaxed);
}

/// What a message's decode limit follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeLimit {
    /// No limit of its own (responses): only the transport cap applies.
    Unlimited,
    /// Names, ids and small fields: `4 × max_name_bytes + 4096`.
    Small,
    /// A secret value: `max_value_bytes` plus the small limit.
    Value,
    /// A policy document: [`MAX_POLICY_DOCUMENT_BYTES`] plus the small limit.
    PolicyDocument,
}

impl DecodeLimit {
    /// The limit in bytes under the limits in force, or `None` for no limit.
    pub fn bytes(self) -> Option<usize> {
        self.bytes_with(
            MAX_NAME_BYTES.load(Ordering::Relaxed),
            MAX_VALUE_BYTES.load(Ordering::Relaxed),
        )
    }

    fn bytes_with(self, max_name: usize, max_value: usize) -> Option<usize> {
        let small = max_name
            .saturating_mul(NAMES_PER_SMALL_REQUEST)
            .saturating_add(SMALL_REQUEST_ROOM);
        match self {
            DecodeLimit::Unlimited => None,
            DecodeLimit::Small => Some(small),
            DecodeLimit::Value => Some(max_value.saturating_add(small)),
            DecodeLimit::PolicyDocument => Some(MAX_POLICY_DOCUMENT_BYTES.saturating_add(small)),
        }
    }

    /// How the limit is made up, for the refusal's message.
    fn explain(self) -> String {
        let name = MAX_NAME_BYTES.load(Ordering::Relaxed);
        let small =
            format!("{NAMES_PER_SMALL_REQUEST} × max_name_bytes ({name}) + {SMALL_REQUEST_ROOM}");
        match self {
            DecodeLimit::Unlimited => "no limit".into(),
            DecodeLimit::Small => small,
            DecodeLimit::Value => format!(
                "max_value_bytes ({}) + {small} for the name and other fields",
                MAX_VALUE_BYTES.load(Ordering::Relaxed)
            ),
            DecodeLimit::PolicyDocument => format!(
                "the policy document limit ({MAX_POLICY_DOCUMENT_BYTES}) + {small} for the name"
            ),
        }
    }
}

/// A message type with a decode limit. Every message a [`StrictCodec`] decodes needs one, so
/// a new request type cannot be served until it is given its limit below.
pub trait Limited {
    /// The message's limit.
    const DECODE_LIMIT: DecodeLimit;
    /// The message's name, for the refusal.
    const NAME: &'static str;
}

macro_rules! limited {
    ($($limit:ident: $($ty:ident),+ $(,)?;)+) => {
        $($(
            impl Limited for proto::$ty {
                const DECODE_LIMIT: DecodeLimit = DecodeLimit::$limit;
                const NAME: &'static str = stringify!($ty);
            }
        )+)+
        /// Every message with a limit, by name (the tests check every RPC's request is here).
        pub const LIMITS: &[(&str, DecodeLimit)] = &[$($((stringify!($ty), DecodeLimit::$limit),)+)+];
    };
}

limited! {
    Value: PutSecretRequest;
    PolicyDocument: PutPolicyRequest;
    Small:
        // SecretService
        GetSecretRequest, DescribeSecretRequest, ListSecretsRequest, DeleteSecretRequest,
        WatchSecretsRequest,
        // AdminService
        StatusRequest, GetPolicyRequest, ListPoliciesRequest, DeletePolicyRequest,
        CheckPolicyRequest, DestroySecretRequest, RotateMasterKeyRequest,
        RotateAuditLogRequest, AcceptStoreStateRequest, ListApprovalsRequest, GetApprovalRequest, ApproveRequest,
        RejectRequest,
        ReportExpiringRequest,
        // AdminService: re-wrap and retirement
        RewrapRequest, WatchRewrapRequest, ListMasterKeysRequest, SetMasterKeyStateRequest;
    Unlimited:
        PutSecretResponse, GetSecretResponse, DescribeSecretResponse, ListSecretsResponse,
        DeleteSecretResponse, WatchEvent, StatusResponse, OperationResponse, PolicyInfo,
        ListPoliciesResponse, CheckPolicyResponse, ListApprovalsResponse, Approval,
        ReportExpiringResponse,
        RewrapResponse, RewrapProgress, ListMasterKeysResponse;
}

/// The decode limit of the request of the gRPC method at `path` (`/package.Service/Method`)
/// and the method's name, for the front door to check a message's frame header before it
/// reads the message. Every method not listed takes the small limit: health, reflection and
/// unknown methods (which answer UNIMPLEMENTED) carry only names and small fields.
pub fn limit_for_path(path: &str) -> (DecodeLimit, &str) {
    let method = path.rsplit('/').next().unwrap_or(path);
    let limit = match path {
        "/strongroom.v1.SecretService/PutSecret" => DecodeLimit::Value,
        "/strongroom.v1.AdminService/PutPolicy" => DecodeLimit::PolicyDocument,
        _ => DecodeLimit::Small,
    };
    (limit, method)
}

impl DecodeLimit {
    /// The refusal of a `name` message of `len` bytes, or `None` when it is within the limit.
    pub fn refuse(self, name: &str, len: usize) -> Option<Status> {
        match self.bytes() {
            Some(limit) if len > limit => Some(Status::out_of_range(format!(
                "the {name} message is {len} bytes, larger than its limit of {limit} bytes ({})",
                self.explain()
            ))),
            _ => None,
        }
    }
}

/// prost encoding, with decode failures reported as INVALID_ARGUMENT and each request held
/// to its decode limit.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Limited + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _pd: PhantomData }
    }
}

/// Decodes a prost message; over its limit is OUT_OF_RANGE, a failure is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct StrictDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default + Limited> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        check_size::<U>(prost::bytes::Buf::remaining(buf))?;
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("the message does not decode: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Refuses a message of `len` bytes over its type's limit.
fn check_size<U: Limited>(len: usize) -> Result<(), Status> {
    match U::DECODE_LIMIT.refuse(U::NAME, len) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC's request type in the two services' protos, by a plain reading of the files.
    fn request_types() -> Vec<String> {
        let mut out = Vec::new();
        for proto in [
            include_str!("../proto/strongroom/v1/secrets.proto"),
            include_str!("../proto/strongroom/v1/admin.proto"),
        ] {
            for line in proto.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("rpc ") {
                    let open = rest.find('(').expect("rpc line has a request type");
                    let close = rest.find(')').expect("rpc line has a request type");
                    out.push(rest[open + 1..close].trim().to_owned());
                }
            }
        }
        out
    }

    #[test]
    fn every_request_of_both_services_has_a_limit() {
        let requests = request_types();
        assert_eq!(requests.len(), 6 + 19, "{requests:?}");
        for r in &requests {
            let limit = LIMITS.iter().find(|(n, _)| n == r).map(|(_, l)| *l);
            assert!(
                matches!(limit, Some(l) if l != DecodeLimit::Unlimited),
                "{r} has no decode limit ({limit:?})"
            );
        }
        // And nothing else (responses) is limited.
        for (name, limit) in LIMITS {
            if !requests.iter().any(|r| r == name) {
                assert_eq!(*limit, DecodeLimit::Unlimited, "{name}");
            }
        }
    }

    #[test]
    fn limits_follow_the_configured_sizes() {
        assert_eq!(DecodeLimit::Small.bytes_with(256, 65536), Some(5120));
        assert_eq!(
            DecodeLimit::Value.bytes_with(256, 65536),
            Some(65536 + 5120)
        );
        assert_eq!(
            DecodeLimit::PolicyDocument.bytes_with(1024, 1),
            Some(256 * 1024 + 8192)
        );
        assert_eq!(DecodeLimit::Unlimited.bytes_with(256, 65536), None);
    }

    #[test]
    fn a_request_over_its_limit_is_out_of_range() {
        let limit = DecodeLimit::Small.bytes().unwrap();
        assert!(check_size::<proto::GetSecretRequest>(limit).is_ok());
        let e = check_size::<proto::GetSecretRequest>(limit + 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        for part in [
            "GetSecretRequest",
            &format!("{} bytes", limit + 1),
            &format!("limit of {limit} bytes"),
            "max_name_bytes (",
        ] {
            assert!(e.message().contains(part), "{part}: {}", e.message());
        }
        let e = check_size::<proto::PutSecretRequest>(10 << 20).unwrap_err();
        assert!(e.message().contains("max_value_bytes ("), "{}", e.message());
        // Responses are not limited.
        assert!(check_size::<proto::GetSecretResponse>(usize::MAX).is_ok());
    }
}
