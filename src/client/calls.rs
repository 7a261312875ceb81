//! The typed calls: one method per SecretService call, each with its retry rule, and the
//! pages of a listing.

use zeroize::Zeroizing;

use crate::proto::{
    DeleteSecretRequest, DeleteSecretResponse, DescribeSecretRequest, DescribeSecretResponse,
    GetSecretRequest, ListSecretsRequest, ListSecretsResponse, PutSecretRequest, PutSecretResponse,
};
use crate::secret::SecretValue;

use super::failover::request;
use super::{Client, ClientError, PutOptions, Retry, Secret};

impl Client {
    /// Reads `version` of `name` (0: the latest). Retried on another endpoint.
    pub async fn get(&self, name: &str, version: u64) -> Result<Secret, ClientError> {
        let resp = self
            .call(Retry::Idempotent, |mut c, timeout| {
                let r = request(
                    timeout,
                    GetSecretRequest {
                        name: name.to_owned(),
                        version,
                    },
                );
                async move { c.get_secret(r).await }
            })
            .await?;
        let value = Zeroizing::new(resp.value);
        Ok(Secret {
            name: resp.name,
            version: resp.version,
            value: SecretValue::new(value),
            created_at_unix: resp.created_at_unix,
            expires_at_unix: resp.expires_at_unix,
        })
    }

    /// Writes a new version of `name`. Moved to another endpoint only when the attempt was
    /// not sent, unless `options.expected_version` is set.
    pub async fn put(
        &self,
        name: &str,
        value: &SecretValue,
        options: PutOptions,
    ) -> Result<PutSecretResponse, ClientError> {
        self.put_protected(name, value, options, None).await
    }

    /// [`Client::put`] with a protection for the new version (`None`: the store's default).
    pub async fn put_protected(
        &self,
        name: &str,
        value: &SecretValue,
        options: PutOptions,
        protection: Option<crate::secret::Protection>,
    ) -> Result<PutSecretResponse, ClientError> {
        let protection = protection.map_or(0, crate::secret::Protection::to_request);
        let retry = if options.expected_version.is_some() {
            Retry::CheckAndSet
        } else {
            Retry::Never
        };
        self.call(retry, |mut c, timeout| {
            // The request's copy is encoded and dropped by tonic, unzeroized: the same
            // exposure as any gRPC client that sends the value.
            let r = request(
                timeout,
                PutSecretRequest {
                    name: name.to_owned(),
                    value: value.expose().to_vec(),
                    expected_version: options.expected_version,
                    expires_at_unix: options.expires_at_unix,
                    protection,
                    not_before_unix: options.not_before_unix,
                    max_versions: options.max_versions,
                },
            );
            async move { c.put_secret(r).await }
        })
        .await
    }

    /// Versions and metadata of `name`, never values. Retried on another endpoint.
    pub async fn describe(&self, name: &str) -> Result<DescribeSecretResponse, ClientError> {
        self.call(Retry::Idempotent, |mut c, timeout| {
            let r = request(
                timeout,
                DescribeSecretRequest {
                    name: name.to_owned(),
                },
            );
            async move { c.describe_secret(r).await }
        })
        .await
    }

    /// One page of the names under `prefix` (`page_size` 0: the service's default),
    /// continuing from `page_token` (empty: the first page). Page tokens are accepted by
    /// every replica of the same token. Retried on another endpoint.
    pub async fn list(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListSecretsResponse, ClientError> {
        self.list_expiring(prefix, page_size, page_token, None)
            .await
    }

    /// [`list`](Self::list), keeping only the names whose latest version expires within
    /// `expiring_within` seconds from now (`None`: every name); their expiry is in the
    /// response's `expiring`. A filtered page may be short or empty while more follow.
    pub async fn list_expiring(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
        expiring_within: Option<u64>,
    ) -> Result<ListSecretsResponse, ClientError> {
        self.call(Retry::Idempotent, |mut c, timeout| {
            let r = request(
                timeout,
                ListSecretsRequest {
                    prefix: prefix.to_owned(),
                    page_size,
                    page_token: page_token.to_owned(),
                    expiring_within_seconds: expiring_within,
                },
            );
            async move { c.list_secrets(r).await }
        })
        .await
    }

    /// Every page of the names under `prefix`, one call per page, each with the whole
    /// deadline and failover.
    pub fn pages<'a>(&'a self, prefix: &str, page_size: u32) -> Pages<'a> {
        Pages {
            client: self,
            prefix: prefix.to_owned(),
            page_size,
            token: String::new(),
            done: false,
        }
    }

    /// Destroys every version of `name`. Moved to another endpoint only when the attempt
    /// was not sent.
    pub async fn delete(&self, name: &str) -> Result<DeleteSecretResponse, ClientError> {
        self.call(Retry::Never, |mut c, timeout| {
            let r = request(
                timeout,
                DeleteSecretRequest {
                    name: name.to_owned(),
                },
            );
            async move { c.delete_secret(r).await }
        })
        .await
    }
}

/// The pages of a listing, fetched one call at a time ([`Client::pages`]).
pub struct Pages<'a> {
    client: &'a Client,
    prefix: String,
    page_size: u32,
    token: String,
    done: bool,
}

impl Pages<'_> {
    /// The next page's names; `None` after the last page. After an error, the same page
    /// is asked for again on the next call.
    pub async fn next(&mut self) -> Option<Result<Vec<String>, ClientError>> {
        if self.done {
            return None;
        }
        match self
            .client
            .list(&self.prefix, self.page_size, &self.token)
            .await
        {
            Ok(page) => {
                self.token = page.next_page_token;
                self.done = self.token.is_empty();
                Some(Ok(page.names))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Every remaining name, all pages collected.
    pub async fn collect(mut self) -> Result<Vec<String>, ClientError> {
        let mut names = Vec::new();
        while let Some(page) = self.next().await {
            names.extend(page?);
        }
        Ok(names)
    }

    /// The token of the next page; empty once the last page has been read.
    pub fn next_page_token(&self) -> &str {
        &self.token
    }
}
