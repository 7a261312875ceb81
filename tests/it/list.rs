//! ListSecrets under its bounds: decided from the caller's grants before the store is read,
//! scanning only the overlap of the prefix with the grants, at most `max_list_scan` keys a
//! call, with page tokens only this service can make. Work is measured through the admin
//! plane's count of keys examined (`StatusResponse.list_keys_examined`), never through time.

use base64::Engine as _;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{ADMIN, POLICY, Server, TestEnv};
use strongroom::proto::secret_service_client::SecretServiceClient;
use strongroom::proto::{HeadV1, ListSecretsRequest, PutSecretRequest, StatusRequest};

const REFUSAL: &str = "page_token was not issued by this service for this caller and prefix";

fn list(prefix: &str, page_size: u32, page_token: &str) -> ListSecretsRequest {
    ListSecretsRequest {
        prefix: prefix.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    }
}

fn put(name: &str) -> PutSecretRequest {
    PutSecretRequest {
        name: name.into(),
        value: b"v".to_vec(),
        expected_version: None,
        expires_at_unix: None,
        protection: 0,
        ..Default::default()
    }
}

/// Writes the bookkeeping of `names` (name, deleted) straight into a store that no service
/// has opened yet, in one batch: ~100k names in about a second, where PutSecret through the
/// service manages ~3k/s. Only heads are written (`h` + name → `HeadV1`, the layout of
/// src/store/sled_store/mod.rs), which is all a listing reads; these names cannot be read.
/// The token holds no epoch checkpoint for a store it has never seen, so the service accepts
/// it as it is (src/service/rollback.rs).
fn fill(env: &TestEnv, names: impl IntoIterator<Item = (String, bool)>) {
    let heads = names.into_iter().map(|(name, deleted)| {
        let head = HeadV1 {
            latest_version: 1,
            deleted,
            ..Default::default()
        };
        (name, head.encode_to_vec())
    });
    if let Some(etcd) = &env.etcd {
        // The etcd backend's head keys (src/store/etcd/keys.rs).
        etcd.put_all(heads.map(|(name, head)| (format!("strongroom/h/{name}").into_bytes(), head)));
        return;
    }
    let db = sled::Config::new().path(&env.store).open().unwrap();
    let mut batch = sled::Batch::default();
    for (name, head) in heads {
        let mut key = vec![b'h'];
        key.extend_from_slice(name.as_bytes());
        batch.insert(key, head);
    }
    db.apply_batch(batch).unwrap();
    db.flush().unwrap();
}

/// The service's count of keys ListSecrets has examined, from the admin plane.
async fn examined(server: &Server) -> u64 {
    server
        .admin("alice")
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .list_keys_examined
}

fn start(env: &TestEnv, policy: &str, limits: &str) -> Server {
    env.start_with(&env.config(&format!("{ADMIN}\n{policy}\n{limits}")), &[])
}

/// Lists `prefix` to the end; every page's names and the keys each call examined.
async fn list_all(
    server: &Server,
    c: &mut SecretServiceClient<Channel>,
    prefix: &str,
    page_size: u32,
) -> Vec<(Vec<String>, u64)> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let before = examined(server).await;
        let page = c
            .list_secrets(list(prefix, page_size, &token))
            .await
            .unwrap()
            .into_inner();
        pages.push((page.names, examined(server).await - before));
        token = page.next_page_token;
        if token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 10_000, "the listing does not end");
    }
}

#[tokio::test]
async fn forged_page_tokens_are_refused_and_issued_ones_survive_a_restart() {
    let env = TestEnv::new();
    let config = env.config(POLICY);
    let server = env.start_with(&config, &[]);
    let mut payments = server.client("payments").await;
    let mut ops = server.client("ops").await;
    for n in ["payments/x/1", "payments/x/2", "payments/x/3"] {
        payments.put_secret(put(n)).await.unwrap();
    }
    let first = payments
        .list_secrets(list("payments", 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.names, ["payments/x/1"]);
    let token = first.next_page_token;
    assert!(!token.is_empty());
    assert!(!token.contains("payments"), "the token is opaque: {token}");
    // A token ops was given for the same prefix.
    let ops_token = ops
        .list_secrets(list("payments", 1, ""))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!ops_token.is_empty());

    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&token)
        .expect("tokens are base64url");
    let mut random = vec![0u8; raw.len()];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).unwrap();
    let mut forged = vec![
        (
            "random bytes".to_owned(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&random),
        ),
        ("random text".to_owned(), "not-a-token-at-all".to_owned()),
        (
            "hex of a name (the old format)".to_owned(),
            hex::encode("payments/x/1"),
        ),
        ("a token issued to ops".to_owned(), ops_token.clone()),
        (
            "a character changed".to_owned(),
            format!(
                "{}{}{}",
                &token[..5],
                if &token[5..6] == "A" { "B" } else { "A" },
                &token[6..]
            ),
        ),
    ];
    for i in 0..raw.len() {
        let mut bad = raw.clone();
        bad[i] ^= 0x01;
        forged.push((
            format!("byte {i} flipped"),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bad),
        ));
    }
    for (what, forged) in &forged {
        let e = payments
            .list_secrets(list("payments", 1, forged))
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(REFUSAL), "{what}: {}", e.message());
    }
    // The genuine token for another prefix, or in another caller's hands.
    for (who, prefix) in [
        ("payments", "payments/x"),
        ("payments", ""),
        ("ops", "payments"),
    ] {
        let mut c = server.client(who).await;
        let e = c.list_secrets(list(prefix, 1, &token)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{who} {prefix}");
        assert!(e.message().contains(REFUSAL), "{}", e.message());
    }
    // ops' own token works for ops.
    let page = ops
        .list_secrets(list("payments", 1, &ops_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.names, ["payments/x/2"]);

    // The key comes from the token, not from process memory: a token survives a restart.
    server.stop();
    let server = env.start_with(&config, &[]);
    let mut payments = server.client("payments").await;
    let page = payments
        .list_secrets(list("payments/", 1, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.names, ["payments/x/2"]);
}

#[tokio::test]
async fn a_caller_without_list_rights_gets_its_answer_without_a_scan() {
    let env = TestEnv::new();
    fill(
        &env,
        (0..100_000).map(|i| (format!("bulk/{:02}/{i:06}", i % 97), false)),
    );
    let server = start(&env, POLICY, "");
    let stranger = server.client("stranger").await;
    let reader = server.client("reader").await;
    let payments = server.client("payments").await;
    let mut ops = server.client("ops").await;

    let before = examined(&server).await;
    for (who, c, prefix) in [
        // No rule at all.
        ("stranger", &stranger, ""),
        ("stranger", &stranger, "bulk"),
        // Read rights, no list rights.
        ("reader", &reader, "payments"),
        ("reader", &reader, ""),
        // List rights elsewhere: "payments" does not meet "bulk".
        ("payments", &payments, "bulk"),
        ("payments", &payments, "bulk/01"),
    ] {
        let mut c = c.clone();
        let page = c
            .list_secrets(list(prefix, 1000, ""))
            .await
            .unwrap()
            .into_inner();
        assert!(page.names.is_empty(), "{who} {prefix:?}: {:?}", page.names);
        assert!(page.next_page_token.is_empty(), "{who} {prefix:?}");
    }
    assert_eq!(
        examined(&server).await,
        before,
        "callers without a list rule on the prefix made the service read the store"
    );

    // The store is there and the counter moves: ops may list everything.
    let page = ops
        .list_secrets(list("bulk", 10, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.names.len(), 10);
    assert_eq!(page.names[0], "bulk/00/000000");
    assert!(!page.next_page_token.is_empty());
    let moved = examined(&server).await - before;
    assert!((10..=11).contains(&moved), "{moved}");
}

#[tokio::test]
async fn a_grant_on_part_of_the_prefix_examines_only_that_part() {
    let env = TestEnv::new();
    let mine: Vec<String> = (0..500).map(|i| format!("payments/p/{i:04}")).collect();
    fill(
        &env,
        (0..100_000)
            .map(|i| (format!("bulk/{i:06}"), false))
            // Names that share payments' bytes but not its segment.
            .chain((0..1000).map(|i| (format!("payments-eu/{i:04}"), false)))
            .chain((0..1000).map(|i| (format!("paymentsx{i:04}"), false)))
            .chain(mine.iter().map(|n| (n.clone(), false))),
    );
    let server = start(&env, POLICY, "");
    let mut payments = server.client("payments").await;

    // payments may list "payments" only: asked for everything, it examines its 500 names.
    let pages = list_all(&server, &mut payments, "", 1000).await;
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].0, mine);
    assert_eq!(pages[0].1, 500, "keys examined for a grant of 500 names");

    // Its part of a narrower prefix, in small pages.
    let pages = list_all(&server, &mut payments, "payments/p", 100).await;
    let names: Vec<String> = pages.iter().flat_map(|(n, _)| n.clone()).collect();
    assert_eq!(names, mine);
    let total: u64 = pages.iter().map(|(_, e)| e).sum();
    // Each full page looks at one name past itself to know whether another page exists.
    assert!((500..=505).contains(&total), "{total}");
}

#[tokio::test]
async fn pages_across_the_scan_cap_return_every_visible_name_once_in_order() {
    let env = TestEnv::new();
    // payments may list two parts of "payments"; ops everything.
    let policy = r#"
[[policy]]
identity = "spiffe://strongroom.test/payments"
prefix = "payments/a"
capabilities = ["list"]

[[policy]]
identity = "spiffe://strongroom.test/payments"
prefix = "payments/c"
capabilities = ["list", "read"]

[[policy]]
identity = "spiffe://strongroom.test/payments"
prefix = "payments/c/07"
capabilities = ["list"]

[[policy]]
identity = "spiffe://strongroom.test/ops"
prefix = ""
capabilities = ["list"]
"#;
    let mut names = vec![("payments/a".to_owned(), false)];
    for i in 0..300 {
        for part in ["a", "a-x", "b", "c"] {
            names.push((format!("payments/{part}/{i:03}"), false));
        }
        // Deleted secrets are examined but never listed.
        names.push((format!("payments/c/{i:03}-gone"), true));
    }
    let mut want: Vec<String> = names
        .iter()
        .filter(|(n, deleted)| {
            !deleted
                && (n == "payments/a"
                    || n.starts_with("payments/a/")
                    || n.starts_with("payments/c/"))
        })
        .map(|(n, _)| n.clone())
        .collect();
    want.sort();
    fill(&env, names);
    let server = start(&env, policy, "[limits]\nmax_list_scan = 40\n");
    let mut payments = server.client("payments").await;

    let pages = list_all(&server, &mut payments, "payments", 25).await;
    let got: Vec<String> = pages.iter().flat_map(|(n, _)| n.clone()).collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want, "every visible name once, in order");
    for (i, (names, examined)) in pages.iter().enumerate() {
        assert!(*examined <= 40, "call {i} examined {examined} keys");
        assert!(names.len() <= 25);
    }
    // The cap, not the page size, ended some pages (deleted names use up the budget).
    assert!(
        pages[..pages.len() - 1]
            .iter()
            .any(|(names, _)| names.len() < 25),
        "{:?}",
        pages.iter().map(|(n, e)| (n.len(), *e)).collect::<Vec<_>>()
    );
    // Only payments' ranges were read: 601 names under a and c, 300 deleted, plus one look
    // past each full page.
    let total: u64 = pages.iter().map(|(_, e)| e).sum();
    assert!((901..=901 + pages.len() as u64).contains(&total), "{total}");

    // With a page size above the cap, every call stops at the cap and the listing still ends.
    let mut ops = server.client("ops").await;
    let pages = list_all(&server, &mut ops, "", 1000).await;
    let got: Vec<String> = pages.iter().flat_map(|(n, _)| n.clone()).collect();
    assert_eq!(got.len(), 1 + 4 * 300);
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert!(pages.iter().all(|(_, e)| *e <= 40));
}
