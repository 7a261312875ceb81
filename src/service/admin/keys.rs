//! Master keys: rotation (guarded), re-wrapping the records under a newer key (guarded, with
//! a dry run and a progress watch), listing the versions and moving one through its lifecycle.

use tonic::{Request, Response, Status};

use super::approval::detail_of;
use super::{AdminApi, AdminApiInner, Officer, REWRAP, ROTATE_MASTER_KEY, SET_MASTER_KEY_STATE};
use crate::error::Error;
use crate::proto::admin_service_server::AdminService;
use crate::proto::{
    ListMasterKeysResponse, OperationResponse, RewrapRequest, RewrapResponse,
    SetMasterKeyStateRequest, WatchRewrapRequest,
};
use crate::service;

pub(super) async fn rotate_master_key(
    this: &AdminApiInner,
    officer: &Officer,
) -> Result<OperationResponse, Error> {
    this.request_guarded(officer, ROTATE_MASTER_KEY, Vec::new())
        .await
}

pub(super) async fn rewrap(
    this: &AdminApiInner,
    officer: &Officer,
    req: &RewrapRequest,
) -> Result<RewrapResponse, Error> {
    if req.dry_run {
        let p = service::rewrap::dry_run(&this.state, req.from_version).await?;
        return Ok(RewrapResponse {
            operation: None,
            dry_run: Some(p.to_proto()),
        });
    }
    service::rewrap::check_request(&this.state, req.from_version).await?;
    let op = this
        .request_guarded(
            officer,
            REWRAP,
            vec![
                ("from_version", req.from_version.to_string()),
                ("rate", req.rate.to_string()),
            ],
        )
        .await?;
    Ok(RewrapResponse {
        operation: Some(op),
        dry_run: None,
    })
}

/// The audit detail of a re-wrap: the approval it asked for, or that it was a dry run.
pub(super) fn rewrap_detail(
    req: &RewrapRequest,
    result: &Result<RewrapResponse, Error>,
) -> Option<String> {
    result
        .as_ref()
        .ok()
        .and_then(|r| r.operation.as_ref())
        .and_then(|o| o.approval.as_ref().map(detail_of))
        .or(req.dry_run.then(|| "dry run".to_owned()))
}

/// Opens the progress watch. Not on [`AdminApi::serve`]'s skeleton: it answers with a stream
/// (so outside `complete`'s task and deadline) and audits its opening, its first state's load.
pub(super) async fn watch_rewrap(
    api: &AdminApi,
    request: Request<WatchRewrapRequest>,
) -> Result<Response<<AdminApi as AdminService>::WatchRewrapStream>, Status> {
    let this = api.0.clone();
    let officer = this.begin(&request, "WatchRewrap").await?;
    let first = service::rewrap::load(&this.state).await;
    let first = this
        .finish(&officer, "WatchRewrap", None, first, None)
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let state = this.state.clone();
    // Now, then every change, until the job is no longer running (or the officer goes
    // away).
    tokio::spawn(service::rewrap::watch(state, first, tx));
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

pub(super) async fn list_master_keys(
    this: &AdminApiInner,
) -> Result<ListMasterKeysResponse, Error> {
    let keys = service::rewrap::list_keys(&this.state).await?;
    Ok(ListMasterKeysResponse { keys })
}

pub(super) async fn set_master_key_state(
    this: &AdminApiInner,
    officer: &Officer,
    req: &SetMasterKeyStateRequest,
) -> Result<OperationResponse, Error> {
    // Refused before any approval when the step is not allowed now.
    service::rewrap::check_step(&this.state, req.version, &req.state).await?;
    this.request_guarded(
        officer,
        SET_MASTER_KEY_STATE,
        vec![
            ("version", req.version.to_string()),
            ("state", req.state.clone()),
        ],
    )
    .await
}
