//! Authorisation: pure decisions of what an identity may do with a name. Deny by default.
//!
//! A policy is a list of rules; a rule grants capabilities on the names under a prefix to
//! the identities its pattern matches. A request is allowed when any rule grants the
//! capability; nothing is ever denied explicitly, so rule order does not matter.

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
                identity,
                prefix,
                capabilities: r.capabilities.clone(),
            });
        }
        Ok(Self { rules: out })
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
    fn malformed_rules_are_refused() {
        use Capability::*;
        assert!(Policy::from_rules(&[rule("", "a", &[Read])], 256).is_err());
        assert!(Policy::from_rules(&[rule("a*b", "a", &[Read])], 256).is_err());
        assert!(Policy::from_rules(&[rule("x", "a//b", &[Read])], 256).is_err());
        assert!(Policy::from_rules(&[rule("x", "a", &[])], 256).is_err());
    }
}
