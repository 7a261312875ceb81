//! Bad input through the real service, including what the typed client cannot express:
//! malformed protobuf, names that are not UTF-8, malformed gRPC frames, messages beyond the
//! transport cap, out-of-range pages and tokens, invalid names, and deadlines that have
//! already passed. Each gets a clear status and never a panic; after each one a valid write
//! and read still succeed, the process is still alive, and nothing stored before is lost.
//!
//! Raw requests go through the same mTLS channel as the typed client: `tonic::client::Grpc`
//! with a codec that sends bytes as they are (a correctly framed message with an arbitrary
//! body), or the channel as an HTTP/2 service with a hand-made body (arbitrary frames).

use std::pin::Pin;
use std::time::{Duration, Instant};

use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body as _, Service as _, http};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::{Server, TestEnv};
use crate::common::{get, put};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{DeleteSecretRequest, DescribeSecretRequest, ListSecretsRequest};

const PUT: &str = "/strongroom.v1.SecretService/PutSecret";
const GET: &str = "/strongroom.v1.SecretService/GetSecret";
const DESCRIBE: &str = "/strongroom.v1.SecretService/DescribeSecret";
const LIST: &str = "/strongroom.v1.SecretService/ListSecrets";
const DELETE: &str = "/strongroom.v1.SecretService/DeleteSecret";
const METHODS: [&str; 5] = [PUT, GET, DESCRIBE, LIST, DELETE];

/// Stored before any bad input; must be unchanged after all of it.
const CANARY: &str = "payments/badinput/canary";

/// The transport cap on a request message (`strongroom::service::TRANSPORT_MESSAGE_CAP`).
const CAP: usize = strongroom::service::TRANSPORT_MESSAGE_CAP;

/// Sends and receives message bodies as raw bytes, framed by tonic as usual.
#[derive(Clone, Copy, Default)]
pub(crate) struct RawCodec;
pub(crate) struct RawEncoder;
pub(crate) struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A field of protobuf wire format: tag, length, bytes.
pub(crate) fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![number << 3 | 2];
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// The service under test, a typed client and a channel for raw calls, all as `payments`.
/// (Fields drop in order: the server stops before its directory is removed.)
struct Probe {
    server: Server,
    client: SecretServiceClient<Channel>,
    channel: Channel,
    alive_checks: u32,
    env: TestEnv,
}

impl Probe {
    async fn start() -> Self {
        let env = TestEnv::new();
        let server = env.start();
        let channel = server
            .channel(&server.addr, Some("payments"))
            .await
            .expect("connect as payments");
        let mut client = SecretServiceClient::new(channel.clone());
        client
            .put_secret(put(CANARY, b"canary-v1"))
            .await
            .expect("store the canary");
        Self {
            server,
            client,
            channel,
            alive_checks: 0,
            env,
        }
    }

    /// A unary call with a raw message body and extra metadata.
    async fn raw(
        &self,
        path: &'static str,
        body: Vec<u8>,
        metadata: &[(&'static str, &str)],
    ) -> Result<Vec<u8>, Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let mut request = tonic::Request::new(body);
        for (k, v) in metadata {
            request.metadata_mut().insert(*k, v.parse().unwrap());
        }
        grpc.unary(
            request,
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// A request whose HTTP/2 body is exactly `body` (gRPC framing included, or not), with
    /// extra headers; the grpc-status it ends with. The body is a `String` because that is
    /// the one body type reachable here without another dependency: bytes below 0x80 only.
    async fn frames(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Status {
        let mut channel = self.channel.clone();
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .expect("channel ready");
        let mut request = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(tonic::body::Body::new(body.to_owned()))
            .unwrap();
        let response = match channel.call(request).await {
            Ok(r) => r,
            Err(e) => return Status::unavailable(format!("transport: {e}")),
        };
        // A trailers-only answer carries the status in its headers.
        if let Some(status) = Status::from_header_map(response.headers()) {
            return status;
        }
        let mut body = response.into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame {
                Ok(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Status::from_header_map(&trailers)
                            .unwrap_or_else(|| Status::unknown("trailers without grpc-status"));
                    }
                }
                Err(status) => return status,
            }
        }
        Status::unknown("the response ended without a grpc-status")
    }

    /// A valid write and read succeed, and the process is still alive.
    async fn assert_still_serving(&mut self, after: &str) {
        self.alive_checks += 1;
        if let Some(exit) = self.server.child.try_wait().unwrap() {
            panic!(
                "strongroomd exited ({exit}) after {after}:\n{}",
                self.server.log_text()
            );
        }
        let name = format!("payments/badinput/alive-{}", self.alive_checks);
        let value = format!("alive after {after}");
        self.client
            .put_secret(put(&name, value.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("a valid PutSecret failed after {after}: {e:?}"));
        let got = self
            .client
            .get_secret(get(&name))
            .await
            .unwrap_or_else(|e| panic!("a valid GetSecret failed after {after}: {e:?}"))
            .into_inner();
        assert_eq!(got.value, value.as_bytes(), "after {after}");
    }

    /// Whether the audit log holds a successful `operation` on `name`.
    fn audited(&self) -> impl Fn(&str, &str) -> bool + use<> {
        let audit = std::fs::File::open(self.env.audit_log()).expect("audit log");
        let entries: Vec<_> =
            strongroom::audit::read_entries(std::io::BufReader::new(audit)).collect();
        move |operation, name| {
            entries.iter().any(|e| {
                e.operation == operation && e.name.as_deref() == Some(name) && e.status == "Ok"
            })
        }
    }

    /// Nothing stored before the bad input was lost or changed; the service never logged a
    /// panic.
    async fn assert_nothing_lost(&mut self) {
        let got = self
            .client
            .get_secret(get(CANARY))
            .await
            .expect("the canary is still there")
            .into_inner();
        assert_eq!((got.value.as_slice(), got.version), (&b"canary-v1"[..], 1));
        assert!(self.server.child.try_wait().unwrap().is_none());
        let log = self.server.log_text();
        assert!(
            !log.contains("panicked"),
            "strongroomd logged a panic:\n{log}"
        );
    }
}

/// Checks each outcome against `want`, collecting every mismatch, so one run reports them all.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn check<T>(&mut self, case: &str, got: &Result<T, Status>, want: &[Code]) {
        match got {
            Ok(_) => self.push(format!("{case}: succeeded; want {want:?}")),
            Err(s) if !want.contains(&s.code()) => self.push(format!(
                "{case}: {:?} {:?}; want {want:?}",
                s.code(),
                s.message()
            )),
            Err(s) => eprintln!("{case}: {:?} {:?}", s.code(), s.message()),
        }
    }

    /// Like `check`, but OK is acceptable too.
    fn check_ok_or<T>(&mut self, case: &str, got: &Result<T, Status>, want: &[Code]) {
        if got.is_ok() {
            eprintln!("{case}: Ok");
        } else {
            self.check(case, got, want);
        }
    }

    fn push(&mut self, line: String) {
        eprintln!("MISMATCH {line}");
        self.0.push(line);
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "\n{}", self.0.join("\n"));
    }
}

/// Malformed protobuf is the caller's mistake: INVALID_ARGUMENT (tonic's default answer is
/// INTERNAL, "failed to decode Protobuf message", which blames the server).
#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    let mut p = Probe::start().await;
    let valid_then_cut = [&field(1, b"payments/x")[..], &[0xff]].concat();
    let bodies: &[(&str, &[u8])] = &[
        ("a tag cut off after a continuation byte", &[0xff]),
        ("wire type 7, which does not exist", &[0x0f]),
        ("wire type 6, which does not exist", &[0x0e]),
        ("field number 0", &[0x00]),
        ("a length beyond the end", &[0x0a, 0x05, b'a']),
        ("a varint cut off (field 3)", &[0x18, 0x80]),
        (
            "a varint longer than 10 bytes (field 3)",
            &[
                0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
        ("the string field 1 as fixed32", &[0x0d, 1, 2, 3, 4]),
        ("an unterminated group", &[0x0b]),
        ("an end group without a start", &[0x0c]),
        (
            "a length that overflows",
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        ("a valid field, then a cut-off tag", &valid_then_cut),
    ];
    let mut m = Mismatches::default();
    for path in METHODS {
        for (what, body) in bodies {
            let case = format!("{path} with {what}");
            let got = p.raw(path, body.to_vec(), &[]).await;
            m.check(&case, &got, &[Code::InvalidArgument]);
            p.assert_still_serving(&case).await;
        }
    }
    p.assert_nothing_lost().await;
    m.assert_none();
}

/// A string field must be UTF-8; a name (or prefix, or page token) that is not is bad input.
#[tokio::test]
async fn strings_that_are_not_utf8_are_invalid_argument() {
    let mut p = Probe::start().await;
    let not_utf8: &[(&str, &[u8])] = &[
        ("a lone continuation byte", b"payments/\x80"),
        ("a truncated sequence", b"payments/\xc3"),
        ("0xff", b"payments/\xff"),
        // The overlong encoding of '/' ("\xc0\xaf"): a classic path-traversal spelling.
        ("an overlong '/'", b"payments/..\xc0\xaf..\xc0\xafetc"),
        ("a UTF-16 surrogate", b"payments/\xed\xa0\x80"),
    ];
    let mut m = Mismatches::default();
    for (what, bytes) in not_utf8 {
        let requests = [
            (PUT, "name", [field(1, bytes), field(2, b"v")].concat()),
            (GET, "name", field(1, bytes)),
            (DESCRIBE, "name", field(1, bytes)),
            (DELETE, "name", field(1, bytes)),
            (LIST, "prefix", field(1, bytes)),
            (LIST, "page_token", field(3, bytes)),
        ];
        for (path, which, body) in requests {
            let case = format!("{path} with a {which} holding {what}");
            let got = p.raw(path, body, &[]).await;
            m.check(&case, &got, &[Code::InvalidArgument]);
            p.assert_still_serving(&case).await;
        }
    }
    // Nothing under those names was stored.
    let names = p
        .client
        .list_secrets(ListSecretsRequest {
            prefix: "payments".into(),
            page_size: 0,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .names;
    assert!(
        names
            .iter()
            .all(|n| n == CANARY || n.starts_with("payments/badinput/alive-")),
        "{names:?}"
    );
    p.assert_nothing_lost().await;
    m.assert_none();
}

/// Beyond the 4 MiB transport cap a request is refused by size (OUT_OF_RANGE or
/// RESOURCE_EXHAUSTED) without being read; below it, a request over its own decode limit is
/// OUT_OF_RANGE naming the limit, before it is decoded; below that, the service's limits
/// answer INVALID_ARGUMENT naming the limit.
#[tokio::test]
async fn oversized_messages_are_refused_by_size() {
    let mut p = Probe::start().await;
    let size = [Code::OutOfRange, Code::ResourceExhausted];
    let mut m = Mismatches::default();

    let body = put("payments/huge", &vec![7; CAP + 1]).encode_to_vec();
    let got = p.raw(PUT, body, &[]).await;
    m.check("PutSecret with a value of the cap + 1 byte", &got, &size);
    p.assert_still_serving("an oversized value").await;

    let got = p.raw(GET, field(1, &vec![b'a'; CAP + 1]), &[]).await;
    m.check("GetSecret with a name of the cap + 1 byte", &got, &size);
    p.assert_still_serving("an oversized name").await;

    // Frame headers that claim more than the cap, with almost nothing behind them: refused
    // on the header alone, at once, not after waiting for gigabytes that never come.
    for (what, frame) in [
        (
            "a frame header claiming 0x7f7f7f7f bytes",
            "\0\x7f\x7f\x7f\x7f\x0a\x01a",
        ),
        ("a frame header claiming the cap + 1", "\0\0\x40\0\x01"),
    ] {
        let started = Instant::now();
        let got: Result<(), Status> = Err(p.frames(GET, frame, &[]).await);
        m.check(&format!("GetSecret with {what}"), &got, &size);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: took {:?}",
            started.elapsed()
        );
        p.assert_still_serving(what).await;
    }

    // Under the cap, each request's decode limit: PutSecret's follows max_value_bytes
    // (64 KiB), the others' max_name_bytes (256: 4 × 256 + 4096 bytes).
    let got = p
        .client
        .put_secret(put("payments/big", &vec![7; CAP - 1024]))
        .await;
    m.check(
        "PutSecret with a value just under the cap",
        &got,
        &[Code::OutOfRange],
    );
    if let Err(e) = &got {
        assert!(e.message().contains("max_value_bytes (65536)"), "{e:?}");
    }
    let got = p.client.get_secret(get(&"a".repeat(1 << 20))).await;
    m.check("GetSecret with a 1 MiB name", &got, &[Code::OutOfRange]);
    if let Err(e) = &got {
        assert!(e.message().contains("limit of 5120 bytes"), "{e:?}");
        assert!(e.message().contains("max_name_bytes (256)"), "{e:?}");
    }
    // Under the decode limits, the handlers' limits.
    let got = p
        .client
        .put_secret(put("payments/big", &vec![7; 65537]))
        .await;
    m.check(
        "PutSecret with a value of max_value_bytes + 1",
        &got,
        &[Code::InvalidArgument],
    );
    if let Err(e) = &got {
        assert!(e.message().contains("max_value_bytes (65536)"), "{e:?}");
    }
    let got = p.client.get_secret(get(&"a".repeat(5000))).await;
    m.check(
        "GetSecret with a 5000-byte name",
        &got,
        &[Code::InvalidArgument],
    );
    if let Err(e) = &got {
        assert!(e.message().contains("max_name_bytes (256)"), "{e:?}");
    }
    p.assert_still_serving("values and names over the service's limits")
        .await;

    p.assert_nothing_lost().await;
    m.assert_none();
}

/// Page sizes beyond the limit, page tokens the service never issued, and names and
/// prefixes outside the grammar: INVALID_ARGUMENT for every operation.
#[tokio::test]
async fn pages_tokens_and_names_outside_the_grammar_are_invalid_argument() {
    let mut p = Probe::start().await;
    let mut m = Mismatches::default();
    let list = |prefix: &str, page_size: u32, page_token: &str| ListSecretsRequest {
        prefix: prefix.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    };

    for page_size in [1001, 1 << 20, u32::MAX] {
        let case = format!("ListSecrets with page_size {page_size}");
        let got = p.client.list_secrets(list("payments", page_size, "")).await;
        m.check(&case, &got, &[Code::InvalidArgument]);
        p.assert_still_serving(&case).await;
    }
    let long_token = hex::encode(format!("payments/{}", "x".repeat(2000)));
    for (what, token) in [
        ("not hex", "zz"),
        ("odd-length hex", "abc"),
        ("hex of bytes that are not UTF-8", "ff80"),
        ("hex of an invalid name", &hex::encode("payments//x")[..]),
        ("hex of a '..' name", &hex::encode("payments/../x")[..]),
        ("hex of a name past the limit", &long_token[..]),
        ("a megabyte of hex", &"61".repeat(1 << 19)[..]),
    ] {
        let case = format!("ListSecrets with a page token that is {what}");
        let got = p.client.list_secrets(list("payments", 10, token)).await;
        // A token that takes the request over its decode limit (a few KiB) is refused by
        // size, before it is decoded.
        let want: &[Code] = if token.len() > 5120 {
            &[Code::OutOfRange]
        } else {
            &[Code::InvalidArgument]
        };
        m.check(&case, &got, want);
        p.assert_still_serving(&case).await;
    }

    let segment = "s".repeat(129);
    let too_long = format!("payments/{}", "n".repeat(250));
    let bad_names = [
        "",
        "/payments/x",
        "payments/x/",
        "payments//x",
        "payments/../x",
        "payments/./x",
        "..",
        "payments/x y",
        "payments/x\ty",
        "payments/x\0y",
        "payments/x\ny",
        "payments/ünï",
        "payments\\x",
        "payments/*",
        &segment,
        &too_long,
    ];
    for name in bad_names {
        let calls = [
            (
                "PutSecret",
                p.client.put_secret(put(name, b"v")).await.map(|_| ()),
            ),
            (
                "GetSecret",
                p.client.get_secret(get(name)).await.map(|_| ()),
            ),
            (
                "DescribeSecret",
                p.client
                    .describe_secret(DescribeSecretRequest { name: name.into() })
                    .await
                    .map(|_| ()),
            ),
            (
                "DeleteSecret",
                p.client
                    .delete_secret(DeleteSecretRequest { name: name.into() })
                    .await
                    .map(|_| ()),
            ),
        ];
        for (op, got) in calls {
            m.check(&format!("{op} of {name:?}"), &got, &[Code::InvalidArgument]);
        }
        p.assert_still_serving(&format!("the name {name:?}")).await;
    }
    for prefix in [
        "payments//x",
        "../x",
        "**",
        "payments/*",
        "payments/x//",
        "//",
    ] {
        let got = p.client.list_secrets(list(prefix, 10, "")).await;
        m.check(
            &format!("ListSecrets of {prefix:?}"),
            &got,
            &[Code::InvalidArgument],
        );
        p.assert_still_serving(&format!("the prefix {prefix:?}"))
            .await;
    }
    // "/" is the empty prefix with its trailing '/': everything the caller may list.
    let got = p.client.list_secrets(list("/", 10, "")).await;
    assert!(got.is_ok(), "ListSecrets of \"/\": {got:?}");
    p.assert_nothing_lost().await;
    m.assert_none();
}

/// A request whose deadline has already passed (grpc-timeout of zero, or of a few
/// nanoseconds) is refused and takes no effect: an expired PutSecret stores nothing, an
/// expired DeleteSecret destroys nothing. The code is DEADLINE_EXCEEDED, or CANCELLED
/// "Timeout expired" where tonic 0.14's own grpc-timeout layer answers first (it sits outside
/// every layer a service can add, so the service cannot rename its answer).
#[tokio::test]
async fn expired_deadlines_are_deadline_exceeded_and_take_no_effect() {
    let mut p = Probe::start().await;
    let mut m = Mismatches::default();
    for timeout in ["0n", "0u", "0m", "0S", "0M", "0H", "1n", "1u"] {
        let late = format!("payments/badinput/late-{timeout}");
        let victim = format!("payments/badinput/victim-{timeout}");
        p.client.put_secret(put(&victim, b"victim")).await.unwrap();
        let requests = [
            (PUT, put(&late, b"late").encode_to_vec()),
            (GET, get(CANARY).encode_to_vec()),
            (LIST, field(1, b"payments")),
            (DELETE, field(1, victim.as_bytes())),
        ];
        for (path, body) in requests {
            let case = format!("{path} with grpc-timeout {timeout}");
            let got = p.raw(path, body, &[("grpc-timeout", timeout)]).await;
            m.check(&case, &got, &[Code::DeadlineExceeded, Code::Cancelled]);
            p.assert_still_serving(&case).await;
        }
        // Let a store call that outlived its request finish before looking.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stored = p.client.get_secret(get(&late)).await.is_ok();
        let destroyed = p.client.get_secret(get(&victim)).await.is_err();
        // Whatever took effect must at least be audited (invariant 7).
        let audited = p.audited();
        // The check itself can fail: the victim's own write is in the log.
        assert!(audited("PutSecret", &victim), "no audit entry for a write");
        let unaudited = |yes: bool| if yes { "" } else { ", without an audit entry" };
        if stored {
            m.push(format!(
                "PutSecret with grpc-timeout {timeout} stored the secret anyway{}",
                unaudited(audited("PutSecret", &late))
            ));
        }
        if destroyed {
            m.push(format!(
                "DeleteSecret with grpc-timeout {timeout} destroyed the secret anyway{}",
                unaudited(audited("DeleteSecret", &victim))
            ));
        }
    }
    p.assert_nothing_lost().await;

    // Headers that are not valid grpc-timeouts are ignored, as tonic does: never a panic.
    for timeout in ["", "S", "-1S", "1.5S", "1s", "123456789S", "99999999H", "x"] {
        let got = p
            .raw(
                GET,
                get(CANARY).encode_to_vec(),
                &[("grpc-timeout", timeout)],
            )
            .await;
        eprintln!(
            "grpc-timeout {timeout:?}: {:?}",
            got.as_ref().map(Vec::len).map_err(Status::code)
        );
        p.assert_still_serving(&format!("grpc-timeout {timeout:?}"))
            .await;
    }
    m.assert_none();
}

/// Deadlines of a few milliseconds, which expire while a write or delete is under way: the
/// answer is OK or DEADLINE_EXCEEDED; an OK write or delete took effect; and whatever took
/// effect, whatever the answer, has its audit entry (invariant 7), so an officer can see it.
#[tokio::test]
async fn short_deadlines_leave_nothing_unaudited() {
    let mut p = Probe::start().await;
    let mut m = Mismatches::default();
    for ms in [1, 2, 3, 5, 8] {
        for i in 0..5 {
            let timeout = format!("{ms}m");
            let victim = format!("payments/badinput/short-victim-{ms}-{i}");
            let late = format!("payments/badinput/short-write-{ms}-{i}");
            p.client.put_secret(put(&victim, b"victim")).await.unwrap();
            let wrote = p
                .raw(
                    PUT,
                    put(&late, b"late").encode_to_vec(),
                    &[("grpc-timeout", &timeout)],
                )
                .await;
            let deleted = p
                .raw(
                    DELETE,
                    field(1, victim.as_bytes()),
                    &[("grpc-timeout", &timeout)],
                )
                .await;
            // tonic 0.14's grpc-timeout layer answers CANCELLED "Timeout expired" when it
            // fires first; the service answers DEADLINE_EXCEEDED when it does.
            let want = [Code::DeadlineExceeded, Code::Cancelled];
            m.check_ok_or(
                &format!("PutSecret with grpc-timeout {timeout}"),
                &wrote,
                &want,
            );
            m.check_ok_or(
                &format!("DeleteSecret with grpc-timeout {timeout}"),
                &deleted,
                &want,
            );
            // Let a store call that outlived its request finish before looking.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stored = p.client.get_secret(get(&late)).await.is_ok();
            let destroyed = p.client.get_secret(get(&victim)).await.is_err();
            if wrote.is_ok() && !stored {
                m.push(format!(
                    "PutSecret {timeout} #{i} answered OK but stored nothing"
                ));
            }
            if deleted.is_ok() && !destroyed {
                m.push(format!(
                    "DeleteSecret {timeout} #{i} answered OK but destroyed nothing"
                ));
            }
            let audited = p.audited();
            if stored && !audited("PutSecret", &late) {
                m.push(format!(
                    "PutSecret {timeout} #{i} ({:?}) stored the secret without an audit entry",
                    wrote.as_ref().map(|_| ()).map_err(Status::code)
                ));
            }
            if destroyed && !audited("DeleteSecret", &victim) {
                m.push(format!(
                    "DeleteSecret {timeout} #{i} ({:?}) destroyed the secret without an audit entry",
                    deleted.as_ref().map(|_| ()).map_err(Status::code)
                ));
            }
        }
        p.assert_still_serving(&format!("{ms} ms deadlines")).await;
    }
    p.assert_nothing_lost().await;
    m.assert_none();
}

/// A hand-made request body and what it must get.
struct FrameCase<'a> {
    what: &'a str,
    body: &'a str,
    headers: &'a [(&'a str, &'a str)],
    want: &'a [Code],
}

impl<'a> FrameCase<'a> {
    fn new(
        what: &'a str,
        body: &'a str,
        headers: &'a [(&'a str, &'a str)],
        want: &'a [Code],
    ) -> Self {
        Self {
            what,
            body,
            headers,
            want,
        }
    }
}

/// Malformed gRPC framing (not protobuf): a clear status from the transport, never a panic,
/// never OK. tonic answers INTERNAL for framing errors (the gRPC compression spec requires
/// INTERNAL for a compressed flag without grpc-encoding) and UNIMPLEMENTED for an encoding it
/// does not support.
#[tokio::test]
async fn malformed_frames_get_a_status() {
    let mut p = Probe::start().await;
    let mut m = Mismatches::default();
    let framing = [Code::Internal, Code::InvalidArgument];
    let unsupported = [Code::Unimplemented];
    let gzip = [("grpc-encoding", "gzip")];
    let nonsense = [("grpc-encoding", "lz-nonsense")];
    let cases = [
        FrameCase::new("no message at all", "", &[], &framing),
        FrameCase::new(
            "a frame shorter than its header says",
            "\0\0\0\0\x10abc",
            &[],
            &framing,
        ),
        FrameCase::new("half a frame header", "\0\0\0", &[], &framing),
        FrameCase::new(
            "the compressed flag without grpc-encoding",
            "\x01\0\0\0\x02\x0a\0",
            &[],
            &framing,
        ),
        FrameCase::new(
            "an undefined flag (2)",
            "\x02\0\0\0\x02\x0a\0",
            &[],
            &framing,
        ),
        FrameCase::new(
            "a compressed frame in an encoding the service does not accept",
            "\x01\0\0\0\x02\x0a\0",
            &gzip,
            &unsupported,
        ),
        FrameCase::new(
            "an unknown grpc-encoding",
            "\0\0\0\0\x02\x0a\0",
            &nonsense,
            &unsupported,
        ),
    ];
    for c in &cases {
        for path in [PUT, GET, LIST] {
            let case = format!("{path} with {}", c.what);
            let got: Result<(), Status> = Err(p.frames(path, c.body, c.headers).await);
            m.check(&case, &got, c.want);
            p.assert_still_serving(&case).await;
        }
    }
    // Two messages in a unary request, and a method that does not exist.
    // Two well-formed messages in a unary request: tonic decodes the first and ignores the
    // rest (grpc-java answers INTERNAL "Too many requests"); either way the service must not
    // act twice.
    let frame = |name: &str| {
        let body = put(name, b"v").encode_to_vec();
        assert!(body.len() < 0x80 && body.iter().all(u8::is_ascii));
        format!(
            "\0\0\0\0{}{}",
            char::from(body.len() as u8),
            String::from_utf8(body).unwrap()
        )
    };
    let (first, second) = ("payments/badinput/two-a", "payments/badinput/two-b");
    let status = p
        .frames(PUT, &format!("{}{}", frame(first), frame(second)), &[])
        .await;
    eprintln!(
        "PutSecret with two messages: {:?} {:?}",
        status.code(),
        status.message()
    );
    let stored = [
        p.client.get_secret(get(first)).await.is_ok(),
        p.client.get_secret(get(second)).await.is_ok(),
    ];
    eprintln!("PutSecret with two messages stored (first, second): {stored:?}");
    assert!(!(stored[0] && stored[1]), "a unary PutSecret acted twice");
    p.assert_still_serving("two messages in a unary call").await;
    let got: Result<(), Status> = Err(p
        .frames(
            "/strongroom.v1.SecretService/StealSecret",
            "\0\0\0\0\0",
            &[],
        )
        .await);
    m.check("an unknown method", &got, &[Code::Unimplemented]);
    p.assert_still_serving("an unknown method").await;

    p.assert_nothing_lost().await;
    m.assert_none();
}
