//! Standard Webhooks signatures (https://www.standardwebhooks.com/, "Signature scheme"):
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`,
//! where the key is the base64 part of a `whsec_...` secret.
//!
//! Rotation is the spec's: the header carries one space-separated `v1,` entry per active secret
//! ([`Secrets::sign`]), and a receiver accepts when any entry matches a secret it holds, so a new
//! secret can be added, handed to the receiver, and the old one removed without a gap.
//!
//! [`Secret::derive`] makes the per-URL secret of an ad-hoc receiver (a `webhook.url` no configured
//! receiver owns) from the relay's URL key; `t2i webhooks url-secret` prints it for the URL's owner.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Shortest key accepted. The Standard Webhooks spec asks for 24 to 64 bytes of randomness
/// ("Signature scheme"); 16 is the floor below which HMAC-SHA256's strength is the key's.
const MIN_KEY_BYTES: usize = 16;

/// Domain separation for derived per-URL secrets, so a derived key is never also an HMAC of some
/// other message under the URL key. The `v1` names the derivation: changing it changes every
/// derived secret.
const DERIVE_LABEL: &[u8] = b"t2i-webhooks url-secret v1\n";

/// A signing key parsed from its `whsec_<base64>` form.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)") // never logged
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Secret {
    pub fn parse(s: &str) -> Result<Self, String> {
        let b64 = s.strip_prefix("whsec_").unwrap_or(s);
        let key = STANDARD
            .decode(b64.trim())
            .map_err(|_| "webhook secret: expected whsec_<base64>".to_string())?;
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "webhook secret: the key must be at least {MIN_KEY_BYTES} bytes (24+ base64 chars)"
            ));
        }
        Ok(Self(key))
    }

    /// The per-URL secret of `url` (as `reqwest::Url` writes it) under this URL key:
    /// `HMAC-SHA256(url key, label ‖ url)`. Knowing the secrets of some URLs tells nothing about
    /// another's (HMAC is a pseudo-random function), so the owner of one URL cannot sign for another.
    pub fn derive(&self, url: &reqwest::Url) -> Secret {
        Secret(hmac(&self.0, &[DERIVE_LABEL, url.as_str().as_bytes()]).to_vec())
    }

    /// The `whsec_<base64>` form, for the operator to hand to a receiver.
    pub fn to_whsec(&self) -> String {
        format!("whsec_{}", STANDARD.encode(&self.0))
    }

    /// One `v1,<base64>` signature entry.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let ts = timestamp.to_string();
        let mac = hmac(&self.0, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        format!("v1,{}", STANDARD.encode(mac))
    }
}

/// The active secrets of one receiver: one or more, all signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets(Vec<Secret>);

impl Secrets {
    /// `None` for an empty list: a receiver with nothing to sign with is a configuration error.
    pub fn new(list: Vec<Secret>) -> Option<Self> {
        (!list.is_empty()).then_some(Self(list))
    }

    /// Whitespace- or comma-separated `whsec_` values (an environment variable's form).
    pub fn parse_list(s: &str) -> Result<Vec<Secret>, String> {
        s.split(|c: char| c.is_whitespace() || c == ',')
            .filter(|p| !p.is_empty())
            .map(Secret::parse)
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.0.iter()
    }

    /// The `webhook-signature` header value: one `v1,` entry per secret, space-separated.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let entries: Vec<String> = self.0.iter().map(|s| s.sign(id, timestamp, body)).collect();
        entries.join(" ")
    }
}

/// What a receiver holding `secret` does with a `webhook-signature` header: accept when any
/// `v1,` entry is its own signature (the spec's rule, which is what makes rotation work).
#[cfg(test)]
pub(crate) fn verify(header: &str, secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> bool {
    let expected = secret.sign(id, timestamp, body);
    header.split(' ').any(|entry| entry == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn matches_the_specification_example() {
        // The example of the Standard Webhooks reference libraries' test suites.
        let s = Secret::parse(SPEC_SECRET).unwrap();
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

    #[test]
    fn two_active_secrets_make_two_entries_and_either_verifies() {
        let old = Secret::parse(SPEC_SECRET).unwrap();
        let new = Secret::parse("whsec_bmV3LXNlY3JldC1mb3Itcm90YXRpb24tMzJieXRlcw==").unwrap();
        let other = Secret::parse("whsec_c29tZW9uZS1lbHNlcy1zZWNyZXQtMTZi").unwrap();
        let both = Secrets::new(vec![old.clone(), new.clone()]).unwrap();
        let header = both.sign("msg_1", 1_700_000_000, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.split(' ').all(|e| e.starts_with("v1,")));
        for s in [&old, &new] {
            assert!(verify(&header, s, "msg_1", 1_700_000_000, b"{}"));
        }
        assert!(!verify(&header, &other, "msg_1", 1_700_000_000, b"{}"));
        assert!(!verify(&header, &old, "msg_1", 1_700_000_001, b"{}"));
    }

    #[test]
    fn secret_lists_split_on_spaces_and_commas() {
        let list = Secrets::parse_list(&format!(" {SPEC_SECRET},{SPEC_SECRET}\n")).unwrap();
        assert_eq!(list.len(), 2);
        assert!(Secrets::new(Vec::new()).is_none());
        assert!(Secrets::parse_list("whsec_!!!").is_err());
    }

    #[test]
    fn derived_secrets_differ_per_url_and_per_key() {
        let key = Secret::parse(SPEC_SECRET).unwrap();
        let a = reqwest::Url::parse("https://a.example/hook").unwrap();
        let b = reqwest::Url::parse("https://b.example/hook").unwrap();
        assert_eq!(key.derive(&a), key.derive(&a));
        assert_ne!(key.derive(&a), key.derive(&b));
        let other_key = key.derive(&b);
        assert_ne!(other_key.derive(&a), key.derive(&a));
        // The printed form parses back to the same key, so the receiver verifies with it.
        assert_eq!(
            Secret::parse(&key.derive(&a).to_whsec()).unwrap(),
            key.derive(&a)
        );
    }
}
