//! The control message on `{prefix}.control` (fanout): which jobs and batches to cancel. One type,
//! written by `t2i cancel` and read by every worker, so the two cannot drift. Pure.

use serde::{Deserialize, Serialize};

use crate::job::JobId;

/// Ids per list at most: a batch of any size is canceled by its one batch id, so this bounds what a
/// worker remembers, not what can be canceled.
pub const MAX_IDS: usize = 10_000;
/// A message of [`MAX_IDS`] ids of the longest allowed (128 characters) in both lists, with JSON
/// quoting, fits in 2.7 MB; anything larger is refused before parsing.
pub const MAX_BODY_BYTES: usize = 2 * (MAX_IDS * (128 + 3)) + 64;

/// Why a control message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("not a control message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("control message of {0} bytes: at most {MAX_BODY_BYTES}")]
    TooLarge(usize),
    #[error("{0}: {1} ids, at most {MAX_IDS}")]
    TooMany(&'static str, usize),
    #[error(
        "{0}: {1:?} is not a job or batch id (1 to 128 characters of [A-Za-z0-9._:-], not ., .. or _index)"
    )]
    BadId(&'static str, String),
}

/// Cancel these job ids and every job whose `batch.id` is one of these batches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    #[serde(default)]
    pub cancel_jobs: Vec<String>,
    #[serde(default)]
    pub cancel_batches: Vec<String>,
}

impl ControlMessage {
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of two string lists always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a control message: every id must be a valid job or batch id (the
    /// contract's id rules, [`JobId::parse`]) and each list at most [`MAX_IDS`] long, because
    /// every worker keeps what it is told to cancel for its whole life.
    pub fn parse(body: &[u8]) -> Result<Self, ControlError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(ControlError::TooLarge(body.len()));
        }
        let m: Self = serde_json::from_slice(body)?;
        m.check()?;
        Ok(m)
    }

    /// The bounds [`ControlMessage::parse`] applies, for writers (`t2i cancel`, the gateway).
    pub fn check(&self) -> Result<(), ControlError> {
        for (field, ids) in [
            ("cancel_jobs", &self.cancel_jobs),
            ("cancel_batches", &self.cancel_batches),
        ] {
            if ids.len() > MAX_IDS {
                return Err(ControlError::TooMany(field, ids.len()));
            }
            if let Some(bad) = ids.iter().find(|id| JobId::parse(id).is_err()) {
                let shown: String = bad.chars().take(80).collect();
                return Err(ControlError::BadId(field, shown));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.cancel_jobs.is_empty() && self.cancel_batches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_message_reads_back_what_was_written() {
        let m = ControlMessage {
            cancel_jobs: vec!["a".into(), "b".into()],
            cancel_batches: vec!["wolves".into()],
        };
        assert_eq!(ControlMessage::parse(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn ids_and_list_lengths_are_bounded() {
        assert!(ControlMessage::parse(br#"{"cancel_jobs": ["a b"]}"#).is_err());
        assert!(ControlMessage::parse(br#"{"cancel_batches": [".."]}"#).is_err());
        assert!(ControlMessage::parse(br#"{"cancel_jobs": [""]}"#).is_err());
        let many = ControlMessage {
            cancel_jobs: (0..=MAX_IDS).map(|i| format!("j{i}")).collect(),
            cancel_batches: vec![],
        };
        let err = ControlMessage::parse(&many.to_json()).unwrap_err();
        assert!(err.to_string().contains("cancel_jobs"), "{err}");
        let most = ControlMessage {
            cancel_jobs: (0..MAX_IDS).map(|i| format!("{i:0>128}")).collect(),
            cancel_batches: (0..MAX_IDS).map(|i| format!("{i:0>128}")).collect(),
        };
        assert!(most.to_json().len() <= MAX_BODY_BYTES);
        assert_eq!(ControlMessage::parse(&most.to_json()).unwrap(), most);
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            ControlMessage::parse(&huge),
            Err(ControlError::TooLarge(_))
        ));
    }

    #[test]
    fn missing_lists_read_as_empty() {
        let m = ControlMessage::parse(br#"{"cancel_batches": ["x"]}"#).unwrap();
        assert!(m.cancel_jobs.is_empty());
        assert_eq!(m.cancel_batches, vec!["x".to_string()]);
        assert!(ControlMessage::parse(br#""cancel everything""#).is_err());
    }

    /// Bad input, measured (as `job::message::fuzz` does for jobs): arbitrary bytes and
    /// near-valid messages never panic, and either parse to a message that reads back the same
    /// or fail with a reason.
    #[test]
    fn any_control_body_reads_back_the_same_or_says_why() {
        use crate::job::message::fuzz;
        use proptest::prelude::*;
        // Mostly ids of the contract's alphabet (so that many messages are valid), some anything.
        let id = prop_oneof![
            3 => "[A-Za-z0-9._:-]{1,12}",
            1 => any::<String>(),
        ];
        let ids = proptest::collection::vec(id, 0..4)
            .prop_map(|ids| serde_json::Value::from(ids).to_string())
            .boxed();
        let near_valid = fuzz::with_extras(vec![
            ("cancel_jobs", fuzz::member(ids.clone())),
            ("cancel_batches", fuzz::member(ids)),
        ])
        .prop_map(String::into_bytes);
        let bodies = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            near_valid,
            fuzz::raw_json().prop_map(String::into_bytes),
        ];
        let (ok, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let tried = fuzz::run(bodies, |body| {
            match ControlMessage::parse(&body) {
                Ok(m) => {
                    prop_assert_eq!(ControlMessage::parse(&m.to_json()).ok(), Some(m));
                    ok.set(ok.get() + 1);
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        });
        eprintln!(
            "control: {tried} inputs, {} messages, {} refused",
            ok.get(),
            refused.get()
        );
        assert!(ok.get() > tried / 10, "too few valid messages");
    }
}
