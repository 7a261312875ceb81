//! The requests tests send most: PutSecret, GetSecret and ListSecrets with their defaults,
//! and the services a server's reflection lists.

use tonic::transport::Channel;

/// A PutSecret request: `value` under `name`, no check-and-set, no expiry.
pub fn put(name: &str, value: &[u8]) -> strongroom::proto::PutSecretRequest {
    strongroom::proto::PutSecretRequest {
        name: name.into(),
        value: value.to_vec(),
        expected_version: None,
        expires_at_unix: None,
        protection: 0,
        ..Default::default()
    }
}

/// A GetSecret request for the latest version of `name`.
pub fn get(name: &str) -> strongroom::proto::GetSecretRequest {
    get_at(name, 0)
}

/// A GetSecret request for `version` of `name` (0: the latest).
pub fn get_at(name: &str, version: u64) -> strongroom::proto::GetSecretRequest {
    strongroom::proto::GetSecretRequest {
        name: name.into(),
        version,
    }
}

/// A ListSecrets request for the first page under `prefix`, default page size.
pub fn list(prefix: &str) -> strongroom::proto::ListSecretsRequest {
    strongroom::proto::ListSecretsRequest {
        prefix: prefix.into(),
        page_size: 0,
        page_token: String::new(),
        ..Default::default()
    }
}

/// The services a channel's server reflection lists, sorted.
pub async fn reflected_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}
