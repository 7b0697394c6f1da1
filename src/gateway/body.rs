//! A client's request body → the job message the gateway publishes. Pure: no broker, no HTTP.
//!
//! The body limit applies to what the client sent: at most [`MAX_BODY_BYTES`], checked before
//! anything is added. The gateway then adds at most [`ADDED_BYTES`] (an assigned `job_id`,
//! `text` renamed `prompt`) and keeps every member's value as the client wrote it, byte for byte,
//! so the message stays within the workers' [`MAX_MESSAGE_BYTES`]. Re-serialising the values
//! instead would not: `1e9` comes back as `1000000000.0`. This module does not check the job
//! itself; that is the workers' own [`crate::job::parse_job_body`], which the caller runs on
//! the message.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::job::message::{MAX_BODY_BYTES, MAX_MESSAGE_BYTES};

/// The most the gateway adds to a client's body: `,"job_id":"<36-character UUID>"` (48 bytes)
/// and two bytes for `text` → `prompt`.
pub(super) const ADDED_BYTES: usize = 50;
const _: () = assert!(MAX_BODY_BYTES + ADDED_BYTES <= MAX_MESSAGE_BYTES);

/// Why a body could not become a message, each answered by its own status.
#[derive(Debug, PartialEq)]
pub(super) enum BodyError {
    /// Over [`MAX_BODY_BYTES`] as sent (413).
    TooLarge,
    /// Not JSON, or JSON but not an object (400).
    NotJson(String),
    /// A member the gateway itself reads is wrong: (field, reason, value) (422).
    Invalid(&'static str, &'static str, String),
}

/// The top-level members of the body, each value verbatim. A repeated name keeps its last value,
/// as every JSON object reader here does.
type Members = BTreeMap<String, Box<RawValue>>;

/// `body` → the message to publish: `job_id` assigned (`new_id`) when the client gave none, and
/// with `text_field` (`POST /generate-image`) `text` renamed `prompt`.
pub(super) fn into_message(
    body: &[u8],
    text_field: bool,
    new_id: impl FnOnce() -> String,
) -> Result<Vec<u8>, BodyError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge);
    }
    let mut members: Members = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            BodyError::NotJson("expected a JSON object".to_string())
        }
        _ => BodyError::NotJson(format!("not JSON: {e}")),
    })?;
    if text_field {
        match members.remove("text") {
            Some(t) if t.get().starts_with('"') => {
                if members.contains_key("prompt") {
                    let why = "give `text` or `prompt`, not both";
                    return Err(BodyError::Invalid("prompt", why, String::new()));
                }
                members.insert("prompt".into(), t);
            }
            Some(other) => {
                let value: String = other.get().chars().take(80).collect();
                return Err(BodyError::Invalid("text", "must be a string", value));
            }
            None if !members.contains_key("prompt") => {
                return Err(BodyError::Invalid("text", "is required", String::new()));
            }
            None => {}
        }
    }
    if !members.contains_key("job_id") {
        // A string always serialises.
        let id = serde_json::value::to_raw_value(&new_id()).expect("a string serialises");
        members.insert("job_id".into(), id);
    }
    // String keys and raw JSON values always serialise.
    Ok(serde_json::to_vec(&members).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const ID: &str = "0190f6c2-7d3e-7a41-9c55-3b1f0e2a9d10";

    fn message(body: &[u8], text_field: bool) -> Result<Value, BodyError> {
        into_message(body, text_field, || ID.to_string())
            .map(|m| serde_json::from_slice(&m).unwrap())
    }

    #[test]
    fn a_job_id_is_assigned_only_when_absent() {
        let m = message(br#"{"prompt": "x"}"#, false).unwrap();
        assert_eq!(m, json!({"prompt": "x", "job_id": ID}));
        let m = message(br#"{"prompt": "x", "job_id": "mine"}"#, false).unwrap();
        assert_eq!(m["job_id"], "mine");
    }

    #[test]
    fn a_body_at_the_limit_fits_the_message_limit_with_its_assigned_id() {
        // The regression: a body just under 64 KiB was refused once the id was added.
        let pad = MAX_BODY_BYTES - br#"{"text": "", "metadata": ""}"#.len();
        let body = format!(r#"{{"text": "", "metadata": "{}"}}"#, "m".repeat(pad));
        assert_eq!(body.len(), MAX_BODY_BYTES);
        let m = into_message(body.as_bytes(), true, || ID.to_string()).unwrap();
        assert!(m.len() <= MAX_MESSAGE_BYTES, "{}", m.len());
        let over = format!("{body} ");
        assert_eq!(
            into_message(over.as_bytes(), true, || ID.to_string()),
            Err(BodyError::TooLarge)
        );
    }

    #[test]
    fn values_are_kept_as_written() {
        let body = br#"{"prompt": "x", "metadata": [1e9, 1E2, 0.10, "\u00e9"]}"#;
        let m = into_message(body, false, || ID.to_string()).unwrap();
        let text = String::from_utf8(m).unwrap();
        assert!(text.contains(r#"[1e9, 1E2, 0.10, "\u00e9"]"#), "{text}");
    }

    #[test]
    fn text_becomes_prompt_and_must_be_a_lone_string() {
        let m = message(br#"{"text": "a cat"}"#, true).unwrap();
        assert_eq!(m["prompt"], "a cat");
        assert!(m.get("text").is_none());
        assert!(message(br#"{"prompt": "a cat"}"#, true).is_ok());
        for (body, field) in [
            (&br#"{"text": "a", "prompt": "b"}"#[..], "prompt"),
            (br#"{"text": 3}"#, "text"),
            (br#"{"width": 64}"#, "text"),
        ] {
            match message(body, true) {
                Err(BodyError::Invalid(f, _, _)) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_told_apart() {
        let not_json = message(b"not json", false).unwrap_err();
        assert!(matches!(not_json, BodyError::NotJson(m) if m.starts_with("not JSON")));
        for body in [&b"[1]"[..], b"\"x\"", b"null"] {
            assert_eq!(
                message(body, false).unwrap_err(),
                BodyError::NotJson("expected a JSON object".into())
            );
        }
    }
}
