//! Presigned URLs: public links to one port of a sandbox.

use super::*;

impl Core {
    /// Issues a presigned URL for one port of a sandbox; the token is returned this once.
    pub fn create_presigned(
        &self,
        org: &str,
        id: &str,
        req: &cove_api::presigned::PresignedUrlCreateRequest,
    ) -> Result<cove_api::presigned::PresignedUrlResponse, ApiError> {
        let rec = self.get(org, id)?;
        let token = hex::encode(rand::random::<[u8; 16]>());
        // Whole seconds, so that expires_at is exactly created_at + expires_in.
        let now = chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now);
        let expires_in = req.expires_in.unwrap_or(cove_api::presigned::DEFAULT_EXPIRES_IN_SECS);
        let p = cove_store::PresignedRecord {
            id: format!("psu-{}", hex::encode(rand::random::<[u8; 8]>())),
            org_id: org.to_string(),
            sandbox_id: rec.id.clone(),
            port: u16::try_from(req.port)
                .map_err(|_| ApiError::field("port", "must be between 1 and 65535"))?,
            expires_at: now.timestamp() + expires_in,
            created_at: now,
        };
        self.store.insert_presigned(&p, &token)?;
        tracing::info!(sandbox_id = %id, presigned_id = %p.id, port = p.port, expires_in, "presigned URL issued");
        Ok(cove_api::presigned::PresignedUrlResponse {
            url: format!("{}://{token}.{}", self.cfg.public_scheme, self.cfg.sandbox_domain),
            token,
            id: p.id,
            sandbox_id: p.sandbox_id,
            port: p.port,
            expires_at: chrono::DateTime::from_timestamp(p.expires_at, 0).unwrap_or(now),
            created_at: p.created_at,
        })
    }

    pub fn delete_presigned(&self, org: &str, id: &str, presigned_id: &str) -> Result<(), ApiError> {
        self.get(org, id)?;
        self.store.delete_presigned(org, id, presigned_id).map_err(|e| match e {
            StoreError::NotFound => {
                ApiError::NotFound(format!("presigned URL {presigned_id} of sandbox {id} not found"))
            }
            e => e.into(),
        })
    }
}
