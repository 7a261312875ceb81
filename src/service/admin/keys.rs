//! Master keys: rotation (guarded), re-wrapping the records under a newer key (guarded, with
//! a dry run and a progress watch), listing the versions and moving one through its lifecycle.

use tonic::{Request, Response, Status};

use super::approval::{approval_detail, detail_of};
use super::{AdminApi, REWRAP, ROTATE_MASTER_KEY, SET_MASTER_KEY_STATE};
use crate::proto::admin_service_server::AdminService;
use crate::proto::{
    ListMasterKeysRequest, ListMasterKeysResponse, OperationResponse, RewrapRequest,
    RewrapResponse, RotateMasterKeyRequest, SetMasterKeyStateRequest, WatchRewrapRequest,
};
use crate::service;

pub(super) async fn rotate_master_key(
    api: &AdminApi,
    request: Request<RotateMasterKeyRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, ROTATE_MASTER_KEY).await?;
        let result = this
            .request_guarded(&officer, ROTATE_MASTER_KEY, Vec::new())
            .await;
        let detail = approval_detail(&result);
        this.finish(&officer, ROTATE_MASTER_KEY, None, result, detail)
            .await
    })
    .await
}

pub(super) async fn rewrap(
    api: &AdminApi,
    request: Request<RewrapRequest>,
) -> Result<Response<RewrapResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, REWRAP).await?;
        let req = request.into_inner();
        let result = async {
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
                    &officer,
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
        .await;
        let detail = result
            .as_ref()
            .ok()
            .and_then(|r| r.operation.as_ref())
            .and_then(|o| o.approval.as_ref().map(detail_of))
            .or(req.dry_run.then(|| "dry run".to_owned()));
        this.finish(&officer, REWRAP, None, result, detail).await
    })
    .await
}

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
    api: &AdminApi,
    request: Request<ListMasterKeysRequest>,
) -> Result<Response<ListMasterKeysResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, "ListMasterKeys").await?;
        let result = service::rewrap::list_keys(&this.state)
            .await
            .map(|keys| ListMasterKeysResponse { keys });
        this.finish(&officer, "ListMasterKeys", None, result, None)
            .await
    })
    .await
}

pub(super) async fn set_master_key_state(
    api: &AdminApi,
    request: Request<SetMasterKeyStateRequest>,
) -> Result<Response<OperationResponse>, Status> {
    let this = api.0.clone();
    let deadline = service::call_deadline(request.metadata());
    service::complete(deadline, async move {
        let officer = this.begin(&request, SET_MASTER_KEY_STATE).await?;
        let req = request.into_inner();
        let result = async {
            // Refused before any approval when the step is not allowed now.
            service::rewrap::check_step(&this.state, req.version, &req.state).await?;
            this.request_guarded(
                &officer,
                SET_MASTER_KEY_STATE,
                vec![
                    ("version", req.version.to_string()),
                    ("state", req.state.clone()),
                ],
            )
            .await
        }
        .await;
        let detail = approval_detail(&result);
        this.finish(
            &officer,
            SET_MASTER_KEY_STATE,
            Some(&format!("master key version {}", req.version)),
            result,
            detail,
        )
        .await
    })
    .await
}
