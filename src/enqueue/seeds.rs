//! Seeds of `t2i enqueue`: every image a batch renders gets its own seed.
//!
//! A job with seed `s` and `n` images renders seeds `s .. s + n` (`Generation::image_seed`), so job
//! seeds are handed out as disjoint ranges, never as one seed per job index (which made copy 0 image 1
//! and copy 1 image 0 the same image):
//! - `index`: job `j` starts where job `j - 1`'s images end, from a base that is `--seed` when given
//!   (pinned: the same seeds in every batch) and otherwise a hash of the batch id (so two batch ids
//!   draw their ranges from different places of the 2⁶⁴ seeds);
//! - `random`: job `j` gets slot `P(key + j)` of width `W` (a power of two ≥ the largest `num_images`
//!   of the batch), where `P` is a bijection, so slots never repeat within a batch; the key is
//!   `--seed` when given, otherwise a hash of the batch id.
//!
//! Both depend only on the command (batch id, items, flags), so a rerun gets the same job bodies and
//! resume recognises them.

use sha2::{Digest, Sha256};

/// How seeds are chosen for items that do not set one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedStrategy {
    /// Consecutive ranges from `base` (`None`: derived from the batch id).
    Index { base: Option<u64> },
    /// Scattered slots keyed by `key` (`None`: derived from the batch id).
    Random { key: Option<u64> },
}

/// 64 bits of the batch id's SHA-256: a fixed hash, so a batch id means the same seeds on every
/// machine and release (unlike `std`'s `DefaultHasher`, which promises neither).
fn batch_key(batch_id: &str) -> u64 {
    let d = Sha256::digest(batch_id.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// SplitMix64's increment (the golden ratio × 2⁶⁴, Steele et al. 2014), odd so that `j ↦ j·G` is a
/// bijection modulo any power of two.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser (Stafford's "Mix13" constants) restricted to `bits` bits: xor with a right
/// shift and multiplication by an odd constant are each invertible modulo 2^bits, so this is a
/// bijection of `0 .. 2^bits` that looks random.
fn permute(x: u64, bits: u32) -> u64 {
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    let mut z = x & mask;
    z = ((z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9)) & mask;
    z = ((z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB)) & mask;
    z ^ (z >> 31)
}

/// Hands out job seeds in batch order.
pub struct Seeder {
    strategy: SeedStrategy,
    key: u64,
    /// `random`: log2 of the slot width.
    slot_bits: u32,
    /// `index`: images handed out so far.
    next: u64,
}

impl Seeder {
    /// `max_images`: the largest `num_images` of any job of the batch.
    pub fn new(strategy: SeedStrategy, batch_id: &str, max_images: u64) -> Self {
        let key = match strategy {
            SeedStrategy::Index { base: Some(k) } | SeedStrategy::Random { key: Some(k) } => k,
            _ => batch_key(batch_id),
        };
        Self {
            strategy,
            key,
            slot_bits: max_images.max(1).next_power_of_two().trailing_zeros(),
            next: 0,
        }
    }

    /// The seed of job `index` (batch order), which renders `images` images. Call it for every job,
    /// also those whose seed the input sets, so that the others do not depend on which rows set one.
    pub fn seed(&mut self, index: u64, images: u64) -> u64 {
        match self.strategy {
            SeedStrategy::Index { .. } => {
                let s = self.key.wrapping_add(self.next);
                self.next = self.next.wrapping_add(images.max(1));
                s
            }
            SeedStrategy::Random { .. } => {
                let bits = 64 - self.slot_bits;
                let slot = permute(self.key.wrapping_add(index.wrapping_mul(GOLDEN)), bits);
                slot << self.slot_bits
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use serde_json::{Map, Value};

    use super::super::expand::{Combine, Item, expand_template, parse_var};
    use super::super::plan::{Plan, plan};
    use super::*;
    use crate::job::{Limits, ModelDefaults, parse_job_body};

    #[test]
    fn permute_is_a_bijection() {
        for bits in [1, 3, 8, 12] {
            let all: HashSet<u64> = (0..1u64 << bits).map(|x| permute(x, bits)).collect();
            assert_eq!(all.len(), 1 << bits, "{bits} bits");
            assert!(all.iter().all(|&x| x < 1 << bits));
        }
    }

    /// The seeds each job actually renders, with the job's prompt and parameters (everything of the
    /// parsed job but the seed, the ids and the output place).
    fn rendered(jobs: &[super::super::plan::PlannedJob]) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for j in jobs {
            let body = Value::Object(j.body.clone()).to_string();
            let job = parse_job_body(
                body.as_bytes(),
                &Limits::default(),
                &ModelDefaults::default(),
            )
            .unwrap_or_else(|e| panic!("{body}: {:?}", e.rejection));
            let g = &job.generation;
            let params = format!(
                "{:?}|{:?}|{}x{}|{}|{}|{:?}",
                g.prompt,
                g.negative_prompt,
                g.width,
                g.height,
                g.steps,
                g.guidance_scale,
                g.scheduler
            );
            out.extend((0..g.num_images).map(|k| (params.clone(), g.image_seed(k))));
        }
        out
    }

    const PINNED: u64 = 5_000_000_000;

    fn templates() -> Vec<Vec<Item>> {
        let one = expand_template("a fox", &[], Combine::Cartesian).unwrap();
        let many = expand_template(
            "a {animal} in {style}",
            &[
                parse_var("animal=cat,dog,cat").unwrap(),
                parse_var("style=oil,ink").unwrap(),
            ],
            Combine::Cartesian,
        )
        .unwrap();
        // One row pins its seed (far from the generated ones: seeds set in the input are the user's
        // choice) and another its image count: the rest must still not collide.
        let mut mixed = many.clone();
        mixed[1].job.insert("seed".into(), Value::from(PINNED));
        mixed[2].job.insert("num_images".into(), Value::from(3));
        vec![one, many, mixed]
    }

    #[test]
    fn rendered_seeds_never_repeat_and_batches_differ() {
        let strategies = |seed: Option<u64>| {
            [
                SeedStrategy::Index { base: seed },
                SeedStrategy::Random { key: seed },
            ]
        };
        for items in templates() {
            for copies in [1, 2, 3] {
                for images in [None, Some(1), Some(2), Some(4)] {
                    for seed in [None, Some(0), Some(u64::MAX - 1)] {
                        for strategy in strategies(seed) {
                            let mut defaults = Map::new();
                            if let Some(n) = images {
                                defaults.insert("num_images".into(), Value::from(n));
                            }
                            let mut by_batch = Vec::new();
                            for batch in ["b-one", "b-two"] {
                                let p = Plan {
                                    defaults: defaults.clone(),
                                    images_per_prompt: copies,
                                    seeds: strategy,
                                    batch_id: Some(batch.into()),
                                    key_prefix: None,
                                };
                                let (_, jobs) = plan(items.clone(), &p);
                                let (_, again) = plan(items.clone(), &p);
                                assert_eq!(jobs, again, "a rerun gets the same bodies");
                                let r = rendered(&jobs);
                                let mut seen = HashMap::new();
                                for (i, x) in r.iter().enumerate() {
                                    if let Some(first) = seen.insert(x.clone(), i) {
                                        panic!(
                                            "{strategy:?} copies {copies} images {images:?} \
                                             {batch}: image {i} repeats image {first}: {x:?}"
                                        );
                                    }
                                }
                                by_batch.push(r.into_iter().collect::<HashSet<_>>());
                            }
                            let shared = by_batch[0].intersection(&by_batch[1]).count();
                            if seed.is_none() {
                                // Only the row that pins its own seed may render the same images.
                                let pinned = by_batch[0]
                                    .iter()
                                    .filter(|(p, s)| {
                                        p.contains("cat in ink")
                                            && (PINNED..PINNED + 12).contains(s)
                                    })
                                    .count();
                                assert!(
                                    shared <= pinned,
                                    "{strategy:?} copies {copies} images {images:?}: \
                                     {shared} images in both batches"
                                );
                            } else {
                                assert_eq!(shared, by_batch[0].len(), "a pinned seed is pinned");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn index_seeds_are_consecutive_ranges() {
        let items =
            expand_template("a {x}", &[parse_var("x=1,2").unwrap()], Combine::Cartesian).unwrap();
        let p = Plan {
            defaults: serde_json::json!({"num_images": 3})
                .as_object()
                .unwrap()
                .clone(),
            images_per_prompt: 2,
            seeds: SeedStrategy::Index { base: Some(100) },
            batch_id: None,
            key_prefix: None,
        };
        let (_, jobs) = plan(items, &p);
        let seeds: Vec<_> = jobs
            .iter()
            .map(|j| j.body["seed"].as_u64().unwrap())
            .collect();
        assert_eq!(seeds, [100, 103, 106, 109]);
    }
}
