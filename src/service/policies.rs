//! Policies that officers manage, kept in the store and authenticated with the token's
//! store MAC key: whoever can write the store's files cannot grant themselves access.
//!
//! The policy in force is the union of every stored policy whose MAC verifies; a policy that
//! does not verify is refused (its rules grant nothing), logged and shown in status. A fresh
//! store is seeded once from the configuration file's `[[policy]]` rules. Whether it was
//! seeded is a store record covered by the store's state commitment (rollback.rs), and only
//! a store the token has never recorded is seeded: removing the marker cannot bring back
//! rules that officers deleted.

use prost::Message;

use super::{State, blocking};
use crate::error::Error;
use crate::hsm::keys::MacKey;
use crate::policy::{Policy, PolicyDocument, RuleConfig};
use crate::proto::{ApprovalV1, PolicyRecordV1};
use crate::secret::SecretName;
use crate::store::Aux;

const POLICY_DOMAIN: &[u8] = b"strongroom/policy/v1\0";
const APPROVAL_DOMAIN: &[u8] = b"strongroom/approval/v1\0";
const SEEDED: &str = "policy-seeded";
/// The name the configuration file's rules are stored under.
pub(crate) const CONFIG_POLICY: &str = "config";
/// The longest policy name.
pub(crate) const MAX_POLICY_NAME: usize = 128;

/// Checks a policy name (the secret-name grammar, at most 128 bytes).
pub(crate) fn parse_name(name: &str) -> Result<String, Error> {
    SecretName::parse(name, MAX_POLICY_NAME)
        .map(|n| n.as_str().to_owned())
        .map_err(|e| Error::InvalidArgument(format!("policy name: {e}")))
}

/// MAC of `domain || bytes` under the token's store key.
async fn mac(state: &State, domain: &[u8], bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
    let mut input = domain.to_vec();
    input.extend_from_slice(&bytes);
    let macs = state
        .hsm
        .mac_chain(MacKey::Store, Vec::new(), vec![input], state.hsm_timeout)
        .await?;
    macs.into_iter()
        .next()
        .ok_or_else(|| Error::Internal("the token returned no MAC".into()))
}

async fn authentic(
    state: &State,
    domain: &[u8],
    bytes: Vec<u8>,
    tag: Vec<u8>,
) -> Result<bool, Error> {
    if tag.is_empty() {
        return Ok(false);
    }
    let mut input = domain.to_vec();
    input.extend_from_slice(&bytes);
    Ok(state
        .hsm
        .mac_verify(MacKey::Store, input, tag, state.hsm_timeout)
        .await?)
}

/// Whether a stored policy record is what an officer stored under `key`.
pub(crate) async fn policy_authentic(
    state: &State,
    key: &str,
    rec: &PolicyRecordV1,
) -> Result<bool, Error> {
    if rec.name != key {
        return Ok(false);
    }
    let mut body = rec.clone();
    let tag = std::mem::take(&mut body.mac);
    authentic(state, POLICY_DOMAIN, body.encode_to_vec(), tag).await
}

/// Whether a stored approval is what the service stored under `key`.
pub(crate) async fn approval_authentic(
    state: &State,
    key: &str,
    rec: &ApprovalV1,
) -> Result<bool, Error> {
    if rec.id != key {
        return Ok(false);
    }
    let mut body = rec.clone();
    let tag = std::mem::take(&mut body.mac);
    authentic(state, APPROVAL_DOMAIN, body.encode_to_vec(), tag).await
}

/// MACs and stores an approval.
pub(crate) async fn store_approval(
    state: &State,
    mut rec: ApprovalV1,
) -> Result<ApprovalV1, Error> {
    rec.mac.clear();
    rec.mac = mac(state, APPROVAL_DOMAIN, rec.encode_to_vec()).await?;
    let bytes = rec.encode_to_vec();
    let id = rec.id.clone();
    blocking(state, move |s| s.aux_put(Aux::Approval, &id, &bytes)).await?;
    Ok(rec)
}

/// Loads an approval, refusing one whose MAC does not verify.
pub(crate) async fn load_approval(state: &State, id: &str) -> Result<ApprovalV1, Error> {
    let key = id.to_owned();
    let bytes = blocking(state, move |s| s.aux_get(Aux::Approval, &key))
        .await?
        .ok_or_else(|| {
            Error::Absent(format!(
                "approval {id} does not exist (finished ones are purged after a while): see `strongroom-admin approval list --all`"
            ))
        })?;
    let rec = ApprovalV1::decode(bytes.as_slice())
        .map_err(|e| Error::DataLoss(format!("approval {id} does not decode: {e}")))?;
    if !approval_authentic(state, id, &rec).await? {
        tracing::error!(
            approval = id,
            "approval record failed authentication: refused"
        );
        return Err(Error::DataLoss(format!(
            "approval {id} failed authentication: the store was edited"
        )));
    }
    Ok(rec)
}

/// Every approval that verifies (tampered ones are logged and left out).
pub(crate) async fn list_approvals(state: &State) -> Result<Vec<ApprovalV1>, Error> {
    let all = blocking(state, |s| s.aux_list(Aux::Approval)).await?;
    let mut out = Vec::new();
    for (key, bytes) in all {
        match ApprovalV1::decode(bytes.as_slice()) {
            Ok(rec) if approval_authentic(state, &key, &rec).await? => out.push(rec),
            _ => tracing::error!(
                approval = key,
                "approval record failed authentication: ignored"
            ),
        }
    }
    Ok(out)
}

/// Stores a policy (already approved); returns the stored record.
pub(crate) async fn put(
    state: &State,
    name: &str,
    document: &str,
    updated_by: &str,
    approval_id: &str,
) -> Result<PolicyRecordV1, Error> {
    let name = parse_name(name)?;
    PolicyDocument::parse(document, state.limits.max_name_bytes)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let key = name.clone();
    let previous = blocking(state, move |s| s.aux_get(Aux::Policy, &key)).await?;
    let revision = previous
        .and_then(|b| PolicyRecordV1::decode(b.as_slice()).ok())
        .map_or(1, |r| r.revision + 1);
    let mut rec = PolicyRecordV1 {
        name: name.clone(),
        document: document.to_owned(),
        revision,
        updated_by: updated_by.to_owned(),
        updated_at_unix: super::secrets::unix_now(),
        approval_id: approval_id.to_owned(),
        mac: Vec::new(),
    };
    rec.mac = mac(state, POLICY_DOMAIN, rec.encode_to_vec()).await?;
    let bytes = rec.encode_to_vec();
    blocking(state, move |s| s.aux_put(Aux::Policy, &name, &bytes)).await?;
    reload(state).await?;
    Ok(rec)
}

/// Deletes a policy (already approved); whether it existed.
pub(crate) async fn delete(state: &State, name: &str) -> Result<bool, Error> {
    let name = parse_name(name)?;
    let existed = blocking(state, move |s| s.aux_delete(Aux::Policy, &name)).await?;
    reload(state).await?;
    Ok(existed)
}

/// Every stored policy with whether it is authentic.
pub(crate) async fn list(state: &State) -> Result<Vec<(PolicyRecordV1, bool)>, Error> {
    let all = blocking(state, |s| s.aux_list(Aux::Policy)).await?;
    let mut out = Vec::with_capacity(all.len());
    for (key, bytes) in all {
        match PolicyRecordV1::decode(bytes.as_slice()) {
            Ok(rec) => {
                let ok = policy_authentic(state, &key, &rec).await?;
                out.push((rec, ok));
            }
            Err(_) => out.push((
                PolicyRecordV1 {
                    name: key,
                    ..Default::default()
                },
                false,
            )),
        }
    }
    Ok(out)
}

/// Rebuilds the policy in force from the store.
pub(crate) async fn reload(state: &State) -> Result<(), Error> {
    let stored = list(state).await?;
    let mut docs: Vec<(String, Vec<RuleConfig>)> = Vec::new();
    let mut tampered = Vec::new();
    for (rec, ok) in stored {
        if !ok {
            tracing::error!(policy = %rec.name, "stored policy failed authentication: refused (its rules grant nothing)");
            tampered.push(rec.name);
            continue;
        }
        match PolicyDocument::parse(&rec.document, state.limits.max_name_bytes) {
            Ok(doc) => docs.push((rec.name, doc.rule)),
            Err(e) => {
                tracing::error!(policy = %rec.name, error = %e, "stored policy does not parse: refused");
                tampered.push(rec.name);
            }
        }
    }
    let sources: Vec<(&str, &[RuleConfig])> = docs
        .iter()
        .map(|(n, r)| (n.as_str(), r.as_slice()))
        .collect();
    let policy = Policy::from_sources(&sources, state.limits.max_name_bytes)
        .map_err(|e| Error::Internal(e.to_string()))?;
    if let Ok(mut p) = state.policy.write() {
        *p = std::sync::Arc::new(policy);
    }
    if let Ok(mut t) = state.tampered_policies.write() {
        *t = tampered;
    }
    Ok(())
}

/// Seeds a fresh store with the configuration file's rules, once: only a store that passed
/// its rollback check and that the token has never recorded (the first start).
pub(crate) async fn seed(state: &State, rules: &[RuleConfig], empty: bool) -> Result<(), Error> {
    let seeded = blocking(state, |s| s.aux_get(Aux::Meta, SEEDED))
        .await?
        .is_some();
    if !seeded && super::rollback::ensure_trusted(state).is_err() {
        tracing::warn!(
            "the store failed its rollback check: the configuration file's [[policy]] rules are not seeded"
        );
        record_seeding(
            state,
            "not seeded: the store failed its rollback check".into(),
        )
        .await?;
        return Ok(());
    }
    if !seeded && super::rollback::token_recorded(state).await? {
        // Recorded before, yet no marker: a crash between seeding and its marker (the state
        // check passed, so nobody removed it), or officers accepted a store without it.
        // Seeding again could restore rules officers have deleted since.
        tracing::warn!(
            "the token has recorded this store but it has no seeded marker: the configuration file's [[policy]] rules are not seeded again"
        );
        record_seeding(
            state,
            "not seeded again: the token has recorded this store but it has no seeded marker"
                .into(),
        )
        .await?;
        blocking(state, |s| s.aux_put(Aux::Meta, SEEDED, b"1")).await?;
        return Ok(());
    }
    if seeded {
        if !empty {
            tracing::info!(
                "the store's policies are managed by officers; the configuration file's [[policy]] rules only seed a fresh store"
            );
        }
        return Ok(());
    }
    if !empty {
        let document = toml::to_string(&PolicyDocument {
            rule: rules.to_vec(),
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let digest = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            document.as_bytes(),
        ));
        // Recorded before the rules are written: a seeding is never in the store unaudited.
        record_seeding(
            state,
            format!(
                "seeding the configuration file's rules: rules={}; document_sha256={digest}",
                rules.len()
            ),
        )
        .await?;
        put(state, CONFIG_POLICY, &document, "configuration file", "").await?;
    } else {
        record_seeding(
            state,
            "seeded with no rules: the configuration file has none".into(),
        )
        .await?;
    }
    blocking(state, |s| s.aux_put(Aux::Meta, SEEDED, b"1")).await?;
    Ok(())
}

/// Records what seeding did (or why it did not) in the audit log, before it acts: the
/// policies a fresh store starts with come from the configuration file, not from an
/// officer, so the log must say so.
async fn record_seeding(state: &State, detail: String) -> Result<(), Error> {
    let event = crate::audit::AuditEvent {
        plane: "admin",
        identity: None,
        operation: "SeedPolicies",
        name: Some(crate::audit::RecordedName::new(
            CONFIG_POLICY,
            MAX_POLICY_NAME,
        )),
        version: None,
        status: tonic::Code::Ok,
        request_id: 0,
        detail: Some(detail),
        change: None,
    };
    state
        .audit
        .record(&event, None)
        .await
        .map_err(|e| Error::Audit(e.to_string()))
}
