//! The control message on `{prefix}.control` (fanout): which jobs and batches to cancel. One type,
//! written by `t2i cancel` and read by every worker, so the two cannot drift. Pure.

use serde::{Deserialize, Serialize};

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

    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
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
        let ids = proptest::collection::vec(any::<String>(), 0..4)
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
