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
}
