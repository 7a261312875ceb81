//! `PolicyDocument::parse` on arbitrary text (JSON when it starts with `{`, TOML otherwise).
//!
//! A document that parses must yield a policy (`Policy::from_sources`), must survive a
//! JSON and a TOML round trip unchanged, and its decisions on a few identities and names
//! must agree with an independent reading of the rules: allowed exactly when some rule grants
//! the capability to a matching identity on a matching name, by the first such rule.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strongroom::policy::{Capability, Decision, Policy, PolicyDocument, RuleConfig};
use strongroom::secret::{NamePrefix, SecretName};
use strongroom::tls::Identity;

const CAPABILITIES: [Capability; 4] = [
    Capability::Read,
    Capability::Write,
    Capability::List,
    Capability::Delete,
];

fn grants(
    rule: &RuleConfig,
    identity: &str,
    capability: Capability,
    name: &str,
    max: usize,
) -> bool {
    let identity_matches = match rule.identity.strip_suffix('*') {
        Some(p) => identity.starts_with(p),
        None => rule.identity == identity,
    };
    let prefix =
        NamePrefix::parse(&rule.prefix, max).expect("a parsed document has valid prefixes");
    rule.capabilities.contains(&capability) && identity_matches && prefix.matches(name)
}

fn check(doc: &PolicyDocument, max: usize) {
    let policy = Policy::from_sources(&[("fuzz", &doc.rule[..])], max)
        .expect("a document that parses yields a policy");
    assert_eq!(policy.len(), doc.rule.len());

    // Round trips through both formats the service accepts.
    let json = serde_json::to_string(doc).expect("to JSON");
    let back = PolicyDocument::parse(&json, max).expect("the JSON form parses");
    assert_eq!(&back, doc, "JSON round trip changed the document: {json}");
    if let Ok(toml_text) = toml::to_string(doc) {
        let back = PolicyDocument::parse(&toml_text, max).expect("the TOML form parses");
        assert_eq!(
            &back, doc,
            "TOML round trip changed the document: {toml_text}"
        );
    }

    let mut identities = vec![
        String::new(),
        "spiffe://bank/payments".to_owned(),
        "svc.bank.internal".to_owned(),
    ];
    let mut names = vec![
        "payments/db/password".to_owned(),
        "a".to_owned(),
        "x/y/z".to_owned(),
    ];
    for rule in doc.rule.iter().take(8) {
        match rule.identity.strip_suffix('*') {
            Some(p) => {
                identities.push(p.to_owned());
                identities.push(format!("{p}x"));
            }
            None => identities.push(rule.identity.clone()),
        }
        let p = rule.prefix.strip_suffix('/').unwrap_or(&rule.prefix);
        names.push(p.to_owned());
        names.push(format!("{p}/leaf"));
        names.push(format!("{p}x"));
    }
    for name in names.iter().filter_map(|n| SecretName::parse(n, max).ok()) {
        for identity in &identities {
            let id = Identity::new(identity.as_str());
            for capability in CAPABILITIES {
                let first = doc
                    .rule
                    .iter()
                    .position(|r| grants(r, identity, capability, name.as_str(), max));
                let decision = policy.decide(&id, capability, &name);
                match first {
                    Some(i) => assert_eq!(decision, Decision::Allow(i)),
                    None => assert_eq!(decision, Decision::Deny),
                }
                assert_eq!(policy.allows(&id, capability, &name), first.is_some());
                if let Decision::Allow(i) = decision {
                    assert!(policy.rule_label(i).contains("policy 'fuzz' rule"));
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for max in [256, 16] {
        if let Ok(doc) = PolicyDocument::parse(text, max) {
            check(&doc, max);
        }
    }
});
