//! Integration tests: one binary, against real PKCS#11 tokens (SoftHSM2, or Kryoptic with
//! `STRONGROOM_TEST_TOKEN=kryoptic`; a fresh token per test), real mutual TLS on 127.0.0.1:0
//! and real sled stores. Run with cargo-nextest, which gives each test its own process
//! (PKCS#11 initialises once per process).

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
mod lifecycle;
mod limits;
mod list;
mod memory;
mod metrics;
mod migrate;
mod mtls;
mod operating;
mod overload;
mod oversize;
mod powercut;
mod python_client;
mod refusals;
mod replicas;
mod restart;
mod rewrap;
mod rollback;
mod service;
mod strict;
mod tokens;
mod watch;
mod writeahead;
mod wycheproof;
