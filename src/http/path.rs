//! `BatchPath`: the `{id}` of a `/v1/batches/{id}/…` route, read and checked once for every
//! handler.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest};

use super::error::ApiError;
use crate::store::{BatchRecord, Store};

/// A batch id from the path, as a UUID in canonical form. Anything else cannot name a batch: 404.
#[derive(Debug, Clone)]
pub struct BatchPath(pub String);

impl FromRequest for BatchPath {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let raw = req.match_info().get("id").unwrap_or_default();
        ready(
            uuid::Uuid::parse_str(raw)
                .map(|id| BatchPath(id.to_string()))
                .map_err(|_| ApiError::NotFound(format!("no batch {raw}"))),
        )
    }
}

impl BatchPath {
    /// The batch's id.
    pub fn id(&self) -> &str {
        &self.0
    }

    /// The batch with its partitions, or 404.
    pub async fn find(&self, store: &Store) -> Result<BatchRecord, ApiError> {
        store
            .find_batch(&self.0)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no batch {}", self.0)))
    }
}
