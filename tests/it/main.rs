//! Integration tests: one binary, against real SoftHSM2 tokens (a fresh token directory per
//! test), real mutual TLS on 127.0.0.1:0 and real sled stores. Run with cargo-nextest, which
//! gives each test its own process (PKCS#11 initialises once per process).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod admin;
mod approvals;
mod audit;
mod auditlog;
mod auth;
mod badinput;
mod cli;
mod clihelp;
mod corruption;
mod crash;
mod etcdstore;
mod failover;
mod faults;
mod frontdoor;
mod ha;
mod invariants;
mod limits;
mod list;
mod memory;
mod migrate;
mod mtls;
mod overload;
mod oversize;
mod powercut;
mod refusals;
mod replicas;
mod restart;
mod rollback;
mod service;
mod strict;
mod watch;
mod writeahead;
mod wycheproof;
