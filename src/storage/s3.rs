//! S3-compatible storage with `aws-sdk-s3`: credentials, region and endpoint from the standard AWS
//! chain (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles),
//! path-style addressing for custom endpoints (Garage, MinIO), `Content-Type` and `x-amz-meta-*` on
//! every object, presigned GET URLs (for a public endpoint where clients reach the store elsewhere,
//! [`S3Options::public_endpoint`]), and multipart uploads above [`MULTIPART_THRESHOLD`].

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use time::OffsetDateTime;

use super::{ImageStore, LIST_PAGE, S3Options, StorageError, StoredObject};

/// Objects larger than this are uploaded in parts (S3's minimum part size is 5 MiB).
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
const PART_SIZE: usize = 8 * 1024 * 1024;

pub struct S3Store {
    client: aws_sdk_s3::Client,
    /// Signs presigned URLs: `client` itself, or the same configuration with the public endpoint.
    presigner: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    multipart_threshold: usize,
    part_size: usize,
}

/// The environment's AWS configuration and an S3 client from it: path-style addressing when an
/// endpoint is set (`AWS_ENDPOINT_URL[_S3]`: Garage, MinIO) unless `opts` says otherwise. The
/// worker's store and its LoRA downloads (`crate::adapters`) use the same.
pub async fn sdk_client(opts: &S3Options) -> (aws_config::SdkConfig, aws_sdk_s3::Client) {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let custom_endpoint = std::env::var_os("AWS_ENDPOINT_URL").is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(opts.force_path_style.unwrap_or(custom_endpoint))
        .build();
    (sdk, aws_sdk_s3::Client::from_conf(conf))
}

impl S3Store {
    /// A client from the environment's AWS configuration, and one for presigning: the same
    /// credentials and region with `opts.public_endpoint` (path-style, unless told otherwise: a
    /// public host such as `127.0.0.1:9000` has no per-bucket names).
    pub async fn from_env(
        bucket: &str,
        prefix: &str,
        opts: &S3Options,
    ) -> Result<Self, StorageError> {
        opts.check()?;
        let (sdk, client) = sdk_client(opts).await;
        let presigner = match &opts.public_endpoint {
            Some(endpoint) => aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&sdk)
                    .endpoint_url(endpoint)
                    .force_path_style(opts.force_path_style.unwrap_or(true))
                    .build(),
            ),
            None => client.clone(),
        };
        Ok(Self {
            client,
            presigner,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            multipart_threshold: MULTIPART_THRESHOLD,
            part_size: PART_SIZE,
        })
    }

    /// The store's own key prefix (`s3://bucket/<prefix>`), which every full key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Lowers the multipart threshold and part size (tests exercise multipart with small objects).
    pub fn with_multipart(mut self, threshold: usize, part_size: usize) -> Self {
        self.multipart_threshold = threshold;
        self.part_size = part_size.max(5 * 1024 * 1024);
        self
    }

    /// A presigned GET for a full key (store prefix included). Signing does no I/O.
    async fn presign_full(&self, key: &str, ttl: Duration) -> Result<String, StorageError> {
        let presign = PresigningConfig::expires_in(ttl).map_err(|e| StorageError::S3 {
            op: "presign",
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: e.to_string(),
        })?;
        Ok(self
            .presigner
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(presign)
            .await
            .map_err(|e| self.err("presign GetObject", key, e))?
            .uri()
            .to_string())
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn err<E: std::error::Error + 'static, R: std::fmt::Debug>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, R>,
    ) -> StorageError {
        StorageError::S3 {
            op,
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: DisplayErrorContext(&e).to_string(),
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: HashMap<String, String>,
    ) -> Result<(), StorageError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_metadata(Some(metadata))
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = async {
            let mut parts = Vec::new();
            for (i, chunk) in body.chunks(self.part_size).enumerate() {
                let n = i as i32 + 1;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(ByteStream::from(chunk.to_vec()))
                    .send()
                    .await
                    .map_err(|e| self.err("UploadPart", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .part_number(n)
                        .build(),
                );
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.err("CompleteMultipartUpload", key, e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Best effort: do not leave billed, invisible parts behind.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

impl ImageStore for S3Store {
    async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(String, String)],
        url_ttl: Option<Duration>,
    ) -> Result<StoredObject, StorageError> {
        let key = self.full_key(key);
        let metadata: HashMap<String, String> = metadata.iter().cloned().collect();
        if body.len() > self.multipart_threshold {
            self.put_multipart(&key, body, content_type, metadata)
                .await?;
        } else {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_type(content_type)
                .set_metadata(Some(metadata))
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| self.err("PutObject", &key, e))?;
        }
        let (url, url_expires_at) = match url_ttl {
            Some(ttl) => (
                Some(self.presign_full(&key, ttl).await?),
                Some(OffsetDateTime::now_utc() + ttl),
            ),
            None => (None, None),
        };
        Ok(StoredObject {
            bucket: Some(self.bucket.clone()),
            key,
            url,
            url_expires_at,
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let key = self.full_key(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.err("DeleteObject", &key, e))?;
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<String>, StorageError> {
        let full = self.full_key(prefix);
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        // A page may come back short while more remain (the API allows it): fill it up, so a short
        // page means the end, as the trait promises.
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .max_keys((LIST_PAGE - keys.len()) as i32);
            req = match (&token, start_after) {
                (Some(t), _) => req.continuation_token(t),
                (None, Some(a)) => req.start_after(self.full_key(a)),
                (None, None) => req,
            };
            let out = req
                .send()
                .await
                .map_err(|e| self.err("ListObjectsV2", &full, e))?;
            keys.extend(out.contents().iter().filter_map(|o| {
                o.key()
                    .and_then(|k| k.strip_prefix(&self.prefix))
                    .map(str::to_string)
            }));
            token = out.next_continuation_token().map(str::to_string);
            if keys.len() >= LIST_PAGE || !out.is_truncated().unwrap_or(false) || token.is_none() {
                return Ok(keys);
            }
        }
    }

    async fn presign(
        &self,
        stored_key: &str,
        ttl: Duration,
    ) -> Result<Option<(String, Option<OffsetDateTime>)>, StorageError> {
        let url = self.presign_full(stored_key, ttl).await?;
        Ok(Some((url, Some(OffsetDateTime::now_utc() + ttl))))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let key = self.full_key(key);
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => {
                let bytes = out.body.collect().await.map_err(|e| StorageError::S3 {
                    op: "GetObject body",
                    bucket: self.bucket.clone(),
                    key: key.clone(),
                    message: e.to_string(),
                })?;
                Ok(Some(bytes.into_bytes().to_vec()))
            }
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
            Err(e) => Err(self.err("GetObject", &key, e)),
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}
