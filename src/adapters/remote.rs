//! Downloads of adapter files, each streamed into a partial file of the disk cache and stopped at the
//! size bound: `https://` URLs through the webhooks' SSRF-guarded client (`webhooks::guard`: the
//! same policy, the same resolver, the same redirect checks), Hugging Face Hub files from the hub's
//! `resolve` endpoint (`HF_ENDPOINT`, `HF_TOKEN` or the cached token, as the model loader uses), S3
//! objects with the worker's S3 client. Each failure says whether trying again later could help.

use std::path::Path;

use tokio::io::AsyncWriteExt;

use super::FetchError;

/// A response body, read chunk by chunk.
pub(crate) enum Body {
    Http(reqwest::Response),
    S3(aws_sdk_s3::primitives::ByteStream),
}

impl Body {
    async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        match self {
            Self::Http(r) => r.chunk().await.map_err(|e| error_chain(&e)),
            Self::S3(s) => s.next().await.transpose().map_err(|e| e.to_string()),
        }
    }
}

/// Writes `body` to `part`, failing (and removing `part`) past `max_bytes`.
pub(crate) async fn save(
    mut body: Body,
    part: &Path,
    max_bytes: u64,
    what: &str,
) -> Result<(), FetchError> {
    let result =
        async {
            let mut file = tokio::fs::File::create(part).await.map_err(|e| {
                FetchError::Unavailable(format!("{what}: writing {}: {e}", part.display()))
            })?;
            let mut written = 0u64;
            while let Some(chunk) = body.next_chunk().await.map_err(|e| {
                FetchError::Unavailable(format!("{what}: download interrupted: {e}"))
            })? {
                written += chunk.len() as u64;
                if written > max_bytes {
                    return Err(FetchError::Invalid(format!(
                        "{what}: larger than the limit of {max_bytes} bytes (--lora-max-mb)"
                    )));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| FetchError::Unavailable(format!("{what}: writing: {e}")))?;
            }
            file.flush()
                .await
                .map_err(|e| FetchError::Unavailable(format!("{what}: writing: {e}")))?;
            Ok(())
        }
        .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(part).await;
    }
    result
}

/// The whole chain of an error's causes (reqwest's own message omits the resolver's refusal).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Classifies an HTTP answer that is not a success: gone for good or worth a retry.
pub(crate) fn status_error(status: reqwest::StatusCode, what: &str) -> FetchError {
    let code = status.as_u16();
    let message = format!("{what}: HTTP {status}");
    match code {
        404 | 410 => FetchError::NotFound(message),
        408 | 429 => FetchError::Unavailable(message),
        _ if status.is_server_error() => FetchError::Unavailable(message),
        _ => FetchError::Refused(message),
    }
}

/// A request's failure before any answer: refused by the SSRF guard (a name resolving to a refused
/// address, a redirect the guard refused) for good, else transient (a server down, a timeout).
pub(crate) fn send_error(e: &reqwest::Error, what: &str) -> FetchError {
    let chain = error_chain(e);
    if crate::webhooks::guard::is_refusal(e) {
        FetchError::Refused(format!("{what}: {chain}"))
    } else {
        FetchError::Unavailable(format!("{what}: {chain}"))
    }
}

/// Checks an answer's announced size against the bound before reading it.
pub(crate) fn check_length(len: Option<u64>, max_bytes: u64, what: &str) -> Result<(), FetchError> {
    match len {
        Some(n) if n > max_bytes => Err(FetchError::Invalid(format!(
            "{what}: {n} bytes, more than the limit of {max_bytes} (--lora-max-mb)"
        ))),
        _ => Ok(()),
    }
}

/// An S3 GetObject failure: a missing object or bucket, or a denial, is final; the rest transient.
pub(crate) fn s3_error<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    what: &str,
) -> FetchError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    let message = format!("{what}: {}", aws_sdk_s3::error::DisplayErrorContext(e));
    let (code, status) = match e {
        SdkError::ServiceError(s) => (
            s.err().code().map(str::to_string),
            Some(s.raw().status().as_u16()),
        ),
        _ => (None, None),
    };
    match (code.as_deref(), status) {
        (Some("NoSuchKey" | "NoSuchBucket" | "NotFound"), _) | (_, Some(404)) => {
            FetchError::NotFound(message)
        }
        (Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"), _)
        | (_, Some(401 | 403)) => FetchError::Refused(message),
        _ => FetchError::Unavailable(message),
    }
}
