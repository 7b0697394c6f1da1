//! Standard Webhooks signatures (https://www.standardwebhooks.com/, "Signature scheme"):
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`,
//! where the key is the base64 part of a `whsec_...` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A signing key parsed from its `whsec_<base64>` form.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)") // never logged
    }
}

impl Secret {
    pub fn parse(s: &str) -> Result<Self, String> {
        let b64 = s.strip_prefix("whsec_").unwrap_or(s);
        let key = STANDARD
            .decode(b64.trim())
            .map_err(|_| "webhook secret: expected whsec_<base64>".to_string())?;
        if key.len() < 16 {
            return Err(
                "webhook secret: the key must be at least 16 bytes (24+ base64 chars)".into(),
            );
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` header value.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specification_example() {
        // The example of the Standard Webhooks reference libraries' test suites.
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn rejects_bad_secrets() {
        assert!(Secret::parse("whsec_!!!").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err());
    }
}
