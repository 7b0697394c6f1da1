//! Which model a job asks for, as the fleet routes it (docs/architecture.md §2 "Topology"): a
//! [`ModelSlug`] is the stable, AMQP-safe name of a model, shared by the routing key a producer
//! publishes with, the queues a worker pool declares for the model it serves, and the check a worker
//! makes before rendering. One definition for all three, so a job the broker routes to a pool is a
//! job that pool's workers accept.
//!
//! The slug is the model's last path segment, lowercased: `segmind/SSD-1B`, `SSD-1B` and a local
//! diffusers folder `/models/SSD-1B` are all `ssd-1b`, as a job naming the repo id or the short name
//! has always been accepted by a worker loaded from either. Hub repo names are already made of
//! `[A-Za-z0-9._-]`; any other byte (a local folder's) becomes `_`. Two models whose names differ
//! only in case or in such bytes share a pool.

use super::Rejection;

/// Longest slug: the Hugging Face Hub's limit on a whole repo id (`huggingface_hub.utils.
/// validate_repo_id`: 1 to 96 characters), so every hub model fits, and queue names built from it
/// (`{prefix}.jobs.retry.interactive.{n}.{slug}`) stay well under AMQP's 255-byte short strings.
pub const MAX_SLUG_LEN: usize = 96;

/// A model's routing name: 1 to [`MAX_SLUG_LEN`] characters of `[a-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelSlug(String);

impl ModelSlug {
    /// The slug of a hub repo id, a short name or a folder path, as a job's `model` or a worker's
    /// `--model` gives it.
    pub fn of(model: &str) -> Result<Self, Rejection> {
        let last = model
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let slug: String = last
            .bytes()
            .map(|b| match b.to_ascii_lowercase() {
                c @ (b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-') => c as char,
                _ => '_',
            })
            .collect();
        // `.` and `..` name folders, never a model.
        if slug.is_empty() || slug.len() > MAX_SLUG_LEN || matches!(slug.as_str(), "." | "..") {
            let shown: String = model.chars().take(80).collect();
            return Err(Rejection::new(
                "model",
                format!("{shown:?}"),
                format!(
                    "must name a model: a hub repo id or a folder whose last segment has 1 to {MAX_SLUG_LEN} characters"
                ),
            ));
        }
        Ok(Self(slug))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ModelSlug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a job asking for `asked` may be rendered by a worker loaded from `served`: the same slug.
pub fn model_matches(asked: &str, served: &str) -> bool {
    matches!((ModelSlug::of(asked), ModelSlug::of(served)), (Ok(a), Ok(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(m: &str) -> String {
        ModelSlug::of(m).unwrap().to_string()
    }

    #[test]
    fn a_repo_id_its_short_name_and_a_folder_share_one_slug() {
        assert_eq!(slug("segmind/SSD-1B"), "ssd-1b");
        assert_eq!(slug("SSD-1B"), "ssd-1b");
        assert_eq!(slug("/models/SSD-1B/"), "ssd-1b");
        assert_eq!(
            slug("stabilityai/stable-diffusion-xl-base-1.0"),
            "stable-diffusion-xl-base-1.0"
        );
        assert!(model_matches("segmind/SSD-1B", "/models/ssd-1b"));
        assert!(!model_matches("segmind/Segmind-Vega", "segmind/SSD-1B"));
    }

    #[test]
    fn odd_bytes_become_underscores_and_empty_names_are_refused() {
        assert_eq!(slug("/data/my model (v2)"), "my_model__v2_");
        assert_eq!(slug("/data/modèle"), "mod__le");
        for bad in ["", "/", "a/..", ".", &"x".repeat(MAX_SLUG_LEN + 1)] {
            assert_eq!(ModelSlug::of(bad).unwrap_err().field, "model", "{bad:?}");
        }
        assert!(ModelSlug::of(&"x".repeat(MAX_SLUG_LEN)).is_ok());
        assert!(!model_matches("", ""), "no model is not a model");
    }
}
