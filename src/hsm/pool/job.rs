//! The jobs on the pool's queue: what a caller asks of a worker ([`Op`]), what it answers
//! ([`Reply`]), and the job that carries both with the caller's deadline.

use std::time::Instant;

use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::envelope::DataKey;
use crate::hsm::HsmError;
use crate::hsm::keys::MacKey;
use crate::hsm::strict::StrictSealed;

use super::{RewrapItem, Rewrapped, WrappedDek};

pub(super) enum Op {
    NewDek {
        mk: u32,
        aad: Vec<u8>,
    },
    Unwrap {
        mk: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
    },
    /// Strict mode: seal a value in the token under a fresh AES-KW-wrapped data key.
    StrictSeal {
        mk: u32,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    },
    /// Strict mode: open a value in the token.
    StrictOpen {
        mk: u32,
        wrapped: Vec<u8>,
        nonce: Vec<u8>,
        aad: Vec<u8>,
        ciphertext: Vec<u8>,
    },
    /// Re-wrap: open each record under its master key and seal it again under `to`, in
    /// one job.
    Rewrap {
        to: u32,
        items: Vec<RewrapItem>,
    },
    /// A chain of MACs: m_0 = prev, m_i = HMAC(m_{i-1} || body_i).
    MacChain {
        kind: MacKey,
        prev: Vec<u8>,
        bodies: Vec<Vec<u8>>,
    },
    Verify {
        kind: MacKey,
        data: Vec<u8>,
        tag: Vec<u8>,
    },
}

impl Op {
    /// The operation's name in metrics (`strongroom_hsm_calls_total{operation}`).
    pub(super) fn name(&self) -> &'static str {
        match self {
            Op::NewDek { .. } => "new_data_key",
            Op::Unwrap { .. } => "unwrap_data_key",
            Op::StrictSeal { .. } => "strict_seal",
            Op::StrictOpen { .. } => "strict_open",
            Op::Rewrap { .. } => "rewrap",
            Op::MacChain { .. } => "mac_chain",
            Op::Verify { .. } => "mac_verify",
        }
    }
}

pub(super) enum Reply {
    NewDek(DataKey, WrappedDek),
    Dek(DataKey),
    StrictSealed(StrictSealed),
    Plaintext(Zeroizing<Vec<u8>>),
    Rewrapped(Vec<Result<Rewrapped, HsmError>>),
    Macs(Vec<Vec<u8>>),
    Verified(bool),
}

pub(super) type ReplyTx = oneshot::Sender<Result<Reply, HsmError>>;

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) reply: ReplyTx,
    /// When the caller stops waiting (`None`: too far ahead to represent). The caller's own
    /// timer enforces it; the worker only uses it to skip work nobody will read.
    pub(super) deadline: Option<Instant>,
}
