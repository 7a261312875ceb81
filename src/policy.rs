//! Authorisation: pure decisions of what an identity may do with a name. Deny by default.
//!
//! A policy is a list of rules; a rule grants capabilities on the names under a prefix to
//! the identities its pattern matches. A request is allowed when any rule grants the
//! capability; nothing is ever denied explicitly, so rule order does not matter. Listing is
//! decided from the rules before any name is read ([`Policy::list_scope`]).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::secret::{NameError, NamePrefix, SecretName};
use crate::tls::Identity;

/// What a rule may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// GetSecret and DescribeSecret.
    Read,
    /// PutSecret.
    Write,
    /// ListSecrets.
    List,
    /// DeleteSecret.
    Delete,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Capability::Read => "read",
            Capability::Write => "write",
            Capability::List => "list",
            Capability::Delete => "delete",
        })
    }
}

/// A rule as written in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The identity (e.g. `spiffe://bank/payments`), or a prefix of identities ending in `*`.
    pub identity: String,
    /// Names the rule covers: `""`/`*` for all, else a name prefix (segment-aware).
    pub prefix: String,
    /// Capabilities granted.
    pub capabilities: BTreeSet<Capability>,
}

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A rule's name prefix is not valid.
    #[error("policy rule {index}: prefix {prefix:?}: {source}")]
    Prefix {
        /// Which rule (0-based).
        index: usize,
        /// The prefix.
        prefix: String,
        /// The reason.
        #[source]
        source: NameError,
    },
    /// A rule's identity pattern is not valid.
    #[error(
        "policy rule {index}: identity pattern {pattern:?} must be non-empty and may only end in '*'"
    )]
    Identity {
        /// Which rule (0-based).
        index: usize,
        /// The pattern.
        pattern: String,
    },
    /// A rule grants nothing.
    #[error("policy rule {0} grants no capabilities")]
    Empty(usize),
    /// The document does not parse.
    #[error("policy document: {0}")]
    Document(String),
}

/// A policy document as officers write it, in TOML (`[[rule]]` tables) or JSON
/// (`{"rule": [...]}`; `rules` is accepted too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// The rules.
    #[serde(alias = "rules", default)]
    pub rule: Vec<RuleConfig>,
}

impl PolicyDocument {
    /// Parses a document: JSON when it starts with `{`, TOML otherwise. The rules are checked
    /// too, so a stored document always yields a policy.
    pub fn parse(text: &str, max_name_bytes: usize) -> Result<Self, PolicyError> {
        let doc: PolicyDocument = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| PolicyError::Document(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| PolicyError::Document(e.to_string()))?
        };
        Policy::parse_rules("document", &doc.rule, max_name_bytes)?;
        Ok(doc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum IdentityPattern {
    Exact(String),
    Prefix(String),
}

impl IdentityPattern {
    fn matches(&self, id: &str) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == id,
            IdentityPattern::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    /// The policy the rule came from, and its position there.
    source: (String, usize),
    identity: IdentityPattern,
    prefix: NamePrefix,
    capabilities: BTreeSet<Capability>,
}

/// A parsed policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// The outcome of a decision, with the rule that allowed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by rule `n` (0-based).
    Allow(usize),
    /// No rule allows it.
    Deny,
}

impl Policy {
    /// Parses configured rules, refusing any that is malformed.
    pub fn from_rules(rules: &[RuleConfig], max_name_bytes: usize) -> Result<Self, PolicyError> {
        Self::from_sources(&[("config", rules)], max_name_bytes)
    }

    /// Joins the rules of several named policies into one.
    pub fn from_sources(
        sources: &[(&str, &[RuleConfig])],
        max_name_bytes: usize,
    ) -> Result<Self, PolicyError> {
        let mut out = Vec::new();
        for (source, rules) in sources {
            out.extend(Self::parse_rules(source, rules, max_name_bytes)?);
        }
        Ok(Self { rules: out })
    }

    /// Which rule `index` is, for people: `policy 'name' rule N` (1-based).
    pub fn rule_label(&self, index: usize) -> String {
        match self.rules.get(index) {
            Some(r) => format!("policy '{}' rule {}", r.source.0, r.source.1 + 1),
            None => format!("rule {index}"),
        }
    }

    /// How many rules the policy has.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules (and so denies everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn parse_rules(
        source: &str,
        rules: &[RuleConfig],
        max_name_bytes: usize,
    ) -> Result<Vec<Rule>, PolicyError> {
        let mut out = Vec::with_capacity(rules.len());
        for (index, r) in rules.iter().enumerate() {
            let identity = match r.identity.strip_suffix('*') {
                Some(p) if !p.contains('*') => IdentityPattern::Prefix(p.to_owned()),
                None if !r.identity.is_empty() && !r.identity.contains('*') => {
                    IdentityPattern::Exact(r.identity.clone())
                }
                _ => {
                    return Err(PolicyError::Identity {
                        index,
                        pattern: r.identity.clone(),
                    });
                }
            };
            let prefix = NamePrefix::parse(&r.prefix, max_name_bytes).map_err(|source| {
                PolicyError::Prefix {
                    index,
                    prefix: r.prefix.clone(),
                    source,
                }
            })?;
            if r.capabilities.is_empty() {
                return Err(PolicyError::Empty(index));
            }
            out.push(Rule {
                source: (source.to_owned(), index),
                identity,
                prefix,
                capabilities: r.capabilities.clone(),
            });
        }
        Ok(out)
    }

    /// Decides whether `identity` may use `capability` on `name`.
    pub fn decide(
        &self,
        identity: &Identity,
        capability: Capability,
        name: &SecretName,
    ) -> Decision {
        self.rules
            .iter()
            .position(|r| {
                r.capabilities.contains(&capability)
                    && r.identity.matches(identity.as_str())
                    && r.prefix.matches(name.as_str())
            })
            .map_or(Decision::Deny, Decision::Allow)
    }

    /// Whether `identity` may use `capability` on `name`.
    pub fn allows(&self, identity: &Identity, capability: Capability, name: &SecretName) -> bool {
        matches!(self.decide(identity, capability, name), Decision::Allow(_))
    }

    /// The parts of `requested` that `identity` may list, decided from the rules alone: for
    /// every rule granting [`Capability::List`] to the identity, the overlap of its prefix
    /// with `requested`. The result is sorted and minimal (no prefix lies under another), so
    /// the prefixes are disjoint; empty when nothing may be listed there.
    ///
    /// A name under `requested` is under one of the prefixes exactly when
    /// [`allows`](Self::allows) grants List on it: prefixes are segment sets, so two of them
    /// either nest or do not meet, and their overlap is the narrower one.
    pub fn list_scope(&self, identity: &Identity, requested: &NamePrefix) -> Vec<NamePrefix> {
        self.scope(identity, Capability::List, requested)
    }

    /// The parts of `requested` where `identity` holds `capability`, as
    /// [`list_scope`](Self::list_scope) computes them for List (WatchSecrets asks for Read).
    pub fn scope(
        &self,
        identity: &Identity,
        capability: Capability,
        requested: &NamePrefix,
    ) -> Vec<NamePrefix> {
        let mut scope: Vec<NamePrefix> = self
            .rules
            .iter()
            .filter(|r| {
                r.capabilities.contains(&capability) && r.identity.matches(identity.as_str())
            })
            .filter_map(|r| overlap(&r.prefix, requested))
            .collect();
        scope.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        scope.dedup();
        // Drop every prefix that lies under another one: a prefix's wider prefixes are its
        // ancestors by segment (and "" above all), each looked up once.
        let kept: BTreeSet<String> = scope.iter().map(|p| p.as_str().to_owned()).collect();
        if kept.contains("") {
            return vec![NamePrefix::all()];
        }
        scope.retain(|p| {
            let p = p.as_str();
            !p.match_indices('/').any(|(i, _)| kept.contains(&p[..i]))
        });
        scope
    }
}

/// The names under both prefixes, as a prefix: the narrower one when they nest, none when
/// they do not meet.
fn overlap(a: &NamePrefix, b: &NamePrefix) -> Option<NamePrefix> {
    if a.matches(b.as_str()) {
        Some(b.clone())
    } else if b.matches(a.as_str()) {
        Some(a.clone())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(identity: &str, prefix: &str, caps: &[Capability]) -> RuleConfig {
        RuleConfig {
            identity: identity.into(),
            prefix: prefix.into(),
            capabilities: caps.iter().copied().collect(),
        }
    }

    #[test]
    fn deny_by_default_and_grants_are_scoped() {
        use Capability::*;
        let policy = Policy::from_rules(
            &[
                rule("spiffe://bank/payments", "payments", &[Read, Write, List]),
                rule("spiffe://bank/ops/*", "", &[List]),
            ],
            256,
        )
        .unwrap();
        let pay = Identity::new("spiffe://bank/payments");
        let ops = Identity::new("spiffe://bank/ops/alice");
        let other = Identity::new("spiffe://bank/paymentsx");
        let n = SecretName::parse("payments/db", 256).unwrap();
        let m = SecretName::parse("hr/db", 256).unwrap();
        assert_eq!(policy.decide(&pay, Read, &n), Decision::Allow(0));
        assert_eq!(policy.decide(&pay, Delete, &n), Decision::Deny);
        assert_eq!(policy.decide(&pay, Read, &m), Decision::Deny);
        assert_eq!(policy.decide(&other, Read, &n), Decision::Deny);
        assert_eq!(policy.decide(&ops, List, &m), Decision::Allow(1));
        assert_eq!(policy.decide(&ops, Read, &m), Decision::Deny);
        assert!(!Policy::default().allows(&pay, Read, &n));
    }

    #[test]
    fn documents_parse_from_toml_and_json_and_name_their_rules() {
        let toml = "[[rule]]\nidentity = \"a\"\nprefix = \"x\"\ncapabilities = [\"read\"]\n";
        let json = r#"{"rules":[{"identity":"b*","prefix":"","capabilities":["list"]}]}"#;
        let t = PolicyDocument::parse(toml, 256).unwrap();
        let j = PolicyDocument::parse(json, 256).unwrap();
        let policy =
            Policy::from_sources(&[("one", &t.rule[..]), ("two", &j.rule[..])], 256).unwrap();
        let name = SecretName::parse("x/y", 256).unwrap();
        let d = policy.decide(&Identity::new("bob"), Capability::List, &name);
        assert_eq!(d, Decision::Allow(1));
        assert_eq!(policy.rule_label(1), "policy 'two' rule 1");
        assert!(PolicyDocument::parse("not = [valid", 256).is_err());
        assert!(
            PolicyDocument::parse(
                r#"{"rule":[{"identity":"","prefix":"","capabilities":["read"]}]}"#,
                256
            )
            .is_err()
        );
    }

    #[test]
    fn list_scope_is_the_overlap_of_grants_and_prefix() {
        use Capability::*;
        let policy = Policy::from_rules(
            &[
                rule("a", "pay", &[List]),
                rule("a", "payments/db", &[List, Read]),
                rule("a", "payments/db/x", &[List]),
                rule("a", "hr", &[Read]),
                rule("a*", "ops/logs", &[List]),
                rule("b", "", &[List]),
            ],
            256,
        )
        .unwrap();
        let scope = |id: &str, prefix: &str| -> Vec<String> {
            policy
                .list_scope(&Identity::new(id), &NamePrefix::parse(prefix, 256).unwrap())
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect()
        };
        // Segment-aware: "pay" does not reach "payments".
        assert_eq!(scope("a", "payments"), vec!["payments/db"]);
        assert_eq!(scope("a", ""), vec!["ops/logs", "pay", "payments/db"]);
        assert_eq!(scope("a", "payments/db/x/y"), vec!["payments/db/x/y"]);
        assert_eq!(scope("a", "hr"), Vec::<String>::new());
        assert_eq!(scope("ab", "ops"), vec!["ops/logs"]);
        assert_eq!(scope("b", "payments/"), vec!["payments"]);
        assert_eq!(scope("b", ""), vec![""]);
        assert_eq!(scope("c", ""), Vec::<String>::new());
        assert!(
            Policy::default()
                .list_scope(&Identity::new("a"), &NamePrefix::all())
                .is_empty()
        );
    }

    /// The scope decides exactly as `allows` does, name by name.
    #[test]
    fn list_scope_agrees_with_allows() {
        use Capability::*;
        let policy = Policy::from_rules(
            &[
                rule("a", "p", &[List]),
                rule("a", "p-x/q", &[List]),
                rule("a", "p.y", &[Read]),
                rule("a*", "r/s", &[List]),
                rule("z", "", &[List]),
            ],
            256,
        )
        .unwrap();
        let names = [
            "p", "p/a", "p/a/b", "p-x", "p-x/q", "p-x/q/r", "p-x/qq", "p.y", "p.y/z", "pa", "q",
            "r", "r/s", "r/s/t", "r/st", "s",
        ];
        let prefixes = ["", "p", "p/a", "p-x", "p-x/q/r", "r", "r/s/t", "q", "pa"];
        for id in ["a", "ab", "z", "y"] {
            let id = Identity::new(id);
            for prefix in prefixes {
                let prefix = NamePrefix::parse(prefix, 256).unwrap();
                let scope = policy.list_scope(&id, &prefix);
                for n in names {
                    let name = SecretName::parse(n, 256).unwrap();
                    let by_rules = prefix.matches(n) && policy.allows(&id, List, &name);
                    let by_scope = scope.iter().any(|p| p.matches(n));
                    assert_eq!(by_rules, by_scope, "{id:?} {prefix:?} {n}");
                }
            }
        }
    }

    #[test]
    fn malformed_rules_are_refused() {
        use Capability::*;
        assert!(Policy::from_rules(&[rule("", "a", &[Read])], 256).is_err());
        assert!(Policy::from_rules(&[rule("a*b", "a", &[Read])], 256).is_err());
        assert!(Policy::from_rules(&[rule("x", "a//b", &[Read])], 256).is_err());
        assert!(Policy::from_rules(&[rule("x", "a", &[])], 256).is_err());
    }
}
