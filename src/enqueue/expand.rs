//! Inputs of `t2i enqueue` → one job object per item, with its origin (file and line) for errors.
//!
//! Sources: `--prompt` flags, a JSONL file of job objects, a CSV file (one column per job field), a
//! plain prompt list, or a prompt template with value lists (cartesian product or zipped). Every item
//! then gets the command's defaults for the fields it does not set, `--images-per-prompt` copies, a
//! seed (always explicit, so it is recorded), a stable job id and its place in the batch.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::seeds::{SeedStrategy, Seeder};

/// One input item before the batch-wide fields are added.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// `file:line`, `--prompt #n` or `template #n`.
    pub origin: String,
    pub job: Map<String, Value>,
}

/// An input problem, reported before anything is published.
#[derive(Debug, Clone, PartialEq)]
pub struct InputError {
    pub origin: String,
    pub reason: String,
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.origin, self.reason)
    }
}

/// How an input file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Jsonl,
    Csv,
    Prompts,
}

impl InputFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "txt" | "prompts" | "text" => Some(Self::Prompts),
            _ => None,
        }
    }

    /// By extension; anything unknown is a prompt list.
    pub fn of_path(path: &Path) -> Self {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(|e| Self::parse(&e.to_ascii_lowercase()))
            .unwrap_or(Self::Prompts)
    }
}

/// Fields a CSV column may name, with how its text becomes JSON.
fn csv_value(field: &str, text: &str) -> Result<Value, String> {
    let int = || {
        text.parse::<u64>()
            .map(Value::from)
            .map_err(|_| format!("{field}: `{text}` is not a non-negative integer"))
    };
    match field {
        "job_id" | "prompt" | "negative_prompt" | "scheduler" | "model" | "deadline" => {
            Ok(Value::from(text))
        }
        "width" | "height" | "steps" | "num_images" | "seed" => int(),
        "guidance_scale" => text
            .parse::<f64>()
            .ok()
            .filter(|g| g.is_finite())
            .map(Value::from)
            .ok_or_else(|| format!("guidance_scale: `{text}` is not a number")),
        "metadata" => serde_json::from_str(text).map_err(|e| format!("metadata: not JSON: {e}")),
        other => Err(format!(
            "unknown column `{other}` (columns: job_id, prompt, negative_prompt, width, height, steps, \
             guidance_scale, scheduler, seed, num_images, model, deadline, metadata)"
        )),
    }
}

/// Reads an input file into items; every unreadable row is an error with its line (the readable
/// ones are still returned, so that all problems can be reported at once).
pub fn read_file(path: &Path, format: InputFormat) -> (Vec<Item>, Vec<InputError>) {
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let error = InputError {
                origin: name,
                reason: format!("cannot read: {e}"),
            };
            return (Vec::new(), vec![error]);
        }
    };
    let mut items = Vec::new();
    let mut errors = Vec::new();
    match format {
        InputFormat::Prompts => {
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut job = Map::new();
                job.insert("prompt".into(), Value::from(line));
                items.push(Item {
                    origin: format!("{name}:{}", i + 1),
                    job,
                });
            }
        }
        InputFormat::Jsonl => {
            for (i, line) in text.lines().enumerate() {
                let origin = format!("{name}:{}", i + 1);
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(line) {
                    Ok(Value::Object(job)) => items.push(Item { origin, job }),
                    Ok(_) => errors.push(InputError {
                        origin,
                        reason: "not a JSON object".into(),
                    }),
                    Err(e) => errors.push(InputError {
                        origin,
                        reason: format!("not JSON: {e}"),
                    }),
                }
            }
        }
        InputFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            let headers = match reader.headers() {
                Ok(h) => h.clone(),
                Err(e) => {
                    let error = InputError {
                        origin: format!("{name}:1"),
                        reason: format!("bad header row: {e}"),
                    };
                    return (Vec::new(), vec![error]);
                }
            };
            for (k, h) in headers.iter().enumerate() {
                if let Err(reason) = csv_value(h, "0")
                    && reason.starts_with("unknown column")
                {
                    errors.push(InputError {
                        origin: format!("{name}:1 column {}", k + 1),
                        reason,
                    });
                }
            }
            if !errors.is_empty() {
                return (Vec::new(), errors);
            }
            for row in reader.records() {
                let row = match row {
                    Ok(r) => r,
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line());
                        errors.push(InputError {
                            origin: format!("{name}:{line}"),
                            reason: format!("bad CSV row: {e}"),
                        });
                        continue;
                    }
                };
                let line = row.position().map_or(0, |p| p.line());
                let origin = format!("{name}:{line}");
                let mut job = Map::new();
                let mut bad = false;
                for (h, cell) in headers.iter().zip(row.iter()) {
                    if cell.is_empty() {
                        continue;
                    }
                    match csv_value(h, cell) {
                        Ok(v) => {
                            job.insert(h.to_string(), v);
                        }
                        Err(reason) => {
                            errors.push(InputError {
                                origin: origin.clone(),
                                reason,
                            });
                            bad = true;
                        }
                    }
                }
                if !bad {
                    items.push(Item { origin, job });
                }
            }
        }
    }
    (items, errors)
}

/// How template variables combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Every combination (first variable varies slowest).
    Cartesian,
    /// The i-th value of every variable together; all lists must be equally long.
    Zip,
}

/// `"a {animal} in {style}"` with `animal=cat,dog` and `style=oil,ink` → prompts.
pub fn expand_template(
    template: &str,
    vars: &[(String, Vec<String>)],
    combine: Combine,
) -> Result<Vec<Item>, InputError> {
    let err = |reason: String| InputError {
        origin: "--template".into(),
        reason,
    };
    // Placeholders named in the template must all have values, and every variable must be used.
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| err(format!("unclosed `{{` in {template:?}")))?;
        names.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    let values: BTreeMap<&str, &Vec<String>> = vars.iter().map(|(k, v)| (k.as_str(), v)).collect();
    for n in &names {
        if !values.contains_key(n.as_str()) {
            return Err(err(format!("no values for {{{n}}}: add --var {n}=a,b,...")));
        }
    }
    for (k, v) in vars {
        if !names.contains(k) {
            return Err(err(format!("--var {k} is not used by the template")));
        }
        if v.is_empty() {
            return Err(err(format!("--var {k} has no values")));
        }
    }
    let combos: Vec<Vec<(&str, &str)>> = match combine {
        Combine::Cartesian => {
            let mut combos: Vec<Vec<(&str, &str)>> = vec![Vec::new()];
            for (k, vs) in vars {
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        vs.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push((k.as_str(), v.as_str()));
                            c
                        })
                    })
                    .collect();
            }
            combos
        }
        Combine::Zip => {
            let n = vars.first().map_or(1, |(_, v)| v.len());
            if let Some((k, v)) = vars.iter().find(|(_, v)| v.len() != n) {
                return Err(err(format!(
                    "--zip needs equally long value lists: {k} has {}, {} has {n}",
                    v.len(),
                    vars[0].0
                )));
            }
            (0..n)
                .map(|i| {
                    vars.iter()
                        .map(|(k, v)| (k.as_str(), v[i].as_str()))
                        .collect()
                })
                .collect()
        }
    };
    Ok(combos
        .into_iter()
        .enumerate()
        .map(|(i, combo)| {
            let mut prompt = template.to_string();
            for (k, v) in &combo {
                prompt = prompt.replace(&format!("{{{k}}}"), v);
            }
            let mut job = Map::new();
            job.insert("prompt".into(), Value::from(prompt));
            let vars: Map<String, Value> = combo
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect();
            job.insert(
                "metadata".into(),
                serde_json::json!({ "template_vars": vars }),
            );
            Item {
                origin: format!("template #{}", i + 1),
                job,
            }
        })
        .collect())
}

/// `name=a,b,c` → (name, [a, b, c]).
pub fn parse_var(s: &str) -> Result<(String, Vec<String>), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("--var {s:?}: expected name=value1,value2,..."))?;
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "--var {s:?}: the name must be letters, digits or _"
        ));
    }
    Ok((
        k.to_string(),
        v.split(',').map(|x| x.trim().to_string()).collect(),
    ))
}

/// The batch-wide settings that turn items into jobs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Defaults for fields an item does not set (already JSON-typed).
    pub defaults: Map<String, Value>,
    pub images_per_prompt: u32,
    pub seeds: SeedStrategy,
    /// `None`: derived from the expanded jobs, so the same command gets the same id.
    pub batch_id: Option<String>,
    pub key_prefix: Option<String>,
}

/// Images a job renders: its `num_images`, or the workers' default of 1 (`Generation::parse`). An
/// invalid value is rejected later by the workers' parser; here it only has to stay in the range of
/// the parsed field (`u32`).
fn images_of(job: &Map<String, Value>) -> u64 {
    job.get("num_images")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, u32::MAX.into())
}

/// A job ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedJob {
    pub origin: String,
    pub job_id: String,
    pub body: Map<String, Value>,
}

/// Items → jobs: defaults, copies, seeds, batch id, job ids, `batch` and `output.key_prefix`.
pub fn plan(items: Vec<Item>, plan: &Plan) -> (String, Vec<PlannedJob>) {
    let mut jobs: Vec<(String, Map<String, Value>)> = Vec::new();
    for item in items {
        let mut job = item.job;
        for (k, v) in &plan.defaults {
            job.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for copy in 0..plan.images_per_prompt.max(1) {
            let origin = if plan.images_per_prompt > 1 {
                format!("{} (copy {})", item.origin, copy + 1)
            } else {
                item.origin.clone()
            };
            let mut job = job.clone();
            // Copies of a row that sets its seed continue after the images of the copy before.
            if let Some(seed) = job.get("seed").and_then(Value::as_u64) {
                let step = u64::from(copy) * images_of(&job);
                job.insert("seed".into(), Value::from(seed.wrapping_add(step)));
            }
            jobs.push((origin, job));
        }
    }
    // The batch id covers everything that defines the set (not the seeds of the random strategy,
    // which derive from it).
    let batch_id = plan.batch_id.clone().unwrap_or_else(|| {
        let mut h = Sha256::new();
        for (_, j) in &jobs {
            h.update(Value::Object(j.clone()).to_string().as_bytes());
            h.update(b"\n");
        }
        h.update(format!("{:?}", plan.seeds).as_bytes());
        format!("b{}", &hex::encode(h.finalize())[..15])
    });
    let total = jobs.len() as u64;
    let max_images = jobs.iter().map(|(_, j)| images_of(j)).max().unwrap_or(1);
    let mut seeder = Seeder::new(plan.seeds, &batch_id, max_images);
    let prefix = plan
        .key_prefix
        .clone()
        .unwrap_or_else(|| format!("datasets/{batch_id}/"));
    let planned = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (origin, mut body))| {
            let index = i as u64;
            let seed = seeder.seed(index, images_of(&body));
            body.entry("seed").or_insert_with(|| Value::from(seed));
            let job_id = match body.get("job_id").and_then(Value::as_str) {
                Some(id) => id.to_string(),
                None => format!("{batch_id}-{index:07}"),
            };
            body.insert("job_id".into(), Value::from(job_id.clone()));
            body.insert(
                "batch".into(),
                serde_json::json!({"id": batch_id, "index": index, "total": total}),
            );
            let output = body
                .entry("output")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(o) = output {
                o.entry("key_prefix")
                    .or_insert_with(|| Value::from(prefix.clone()));
            }
            PlannedJob {
                origin,
                job_id,
                body,
            }
        })
        .collect();
    (batch_id, planned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(items: &[Item]) -> Vec<&str> {
        items
            .iter()
            .map(|i| i.job["prompt"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn templates_expand_cartesian_and_zipped() {
        let vars = vec![
            parse_var("animal=cat,dog").unwrap(),
            parse_var("style=oil, ink").unwrap(),
        ];
        let c = expand_template("a {animal} in {style}", &vars, Combine::Cartesian).unwrap();
        assert_eq!(
            prompts(&c),
            [
                "a cat in oil",
                "a cat in ink",
                "a dog in oil",
                "a dog in ink"
            ]
        );
        assert_eq!(c[1].job["metadata"]["template_vars"]["style"], "ink");
        let z = expand_template("a {animal} in {style}", &vars, Combine::Zip).unwrap();
        assert_eq!(prompts(&z), ["a cat in oil", "a dog in ink"]);
        assert!(expand_template("a {animal}", &vars, Combine::Zip).is_err());
        assert!(expand_template("a {bird}", &vars[..1], Combine::Zip).is_err());
        let uneven = vec![vars[0].clone(), parse_var("style=oil").unwrap()];
        assert!(expand_template("{animal} {style}", &uneven, Combine::Zip).is_err());
    }

    #[test]
    fn plans_are_stable_and_seeds_recorded() {
        let items = expand_template(
            "a {x}",
            &[parse_var("x=1,2,3").unwrap()],
            Combine::Cartesian,
        )
        .unwrap();
        let p = Plan {
            defaults: serde_json::json!({"steps": 4}).as_object().unwrap().clone(),
            images_per_prompt: 2,
            seeds: SeedStrategy::Random { key: None },
            batch_id: None,
            key_prefix: None,
        };
        let (id1, a) = plan(items.clone(), &p);
        let (id2, b) = plan(items.clone(), &p);
        assert_eq!((id1.clone(), a.clone()), (id2, b));
        assert_eq!(a.len(), 6);
        assert_eq!(a[3].job_id, format!("{id1}-0000003"));
        assert_eq!(a[3].body["batch"]["total"], 6);
        assert_eq!(a[3].body["steps"], 4);
        assert_eq!(
            a[3].body["output"]["key_prefix"],
            format!("datasets/{id1}/")
        );
        let seeds: std::collections::HashSet<u64> =
            a.iter().map(|j| j.body["seed"].as_u64().unwrap()).collect();
        assert_eq!(seeds.len(), 6, "copies get their own seeds");
        let indexed = Plan {
            seeds: SeedStrategy::Index { base: Some(100) },
            ..p
        };
        let (id3, c) = plan(items, &indexed);
        assert_ne!(id3, id1, "the seed strategy is part of the batch identity");
        assert_eq!(c[5].body["seed"], 105);
    }

    #[test]
    fn csv_and_jsonl_rows_report_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("in.csv");
        std::fs::write(
            &csv,
            "prompt,width,guidance_scale\na cat,512,7\na dog,wide,7\n\"a, quoted\",,\n",
        )
        .unwrap();
        let (ok, errs) = read_file(&csv, InputFormat::Csv);
        assert_eq!((ok.len(), errs.len()), (2, 1));
        assert!(errs[0].origin.ends_with("in.csv:3"), "{}", errs[0]);
        assert!(errs[0].reason.contains("width"), "{}", errs[0]);
        std::fs::write(&csv, "prompt,widht\nx,1\n").unwrap();
        let (_, errs) = read_file(&csv, InputFormat::Csv);
        assert!(
            errs[0].reason.contains("unknown column `widht`"),
            "{}",
            errs[0]
        );
        std::fs::write(&csv, "prompt,width\n\"a, quoted\",\n").unwrap();
        let (ok, errs) = read_file(&csv, InputFormat::Csv);
        assert!(errs.is_empty());
        assert_eq!(ok[0].job["prompt"], "a, quoted");
        assert!(!ok[0].job.contains_key("width"));

        let jsonl = dir.path().join("in.jsonl");
        std::fs::write(&jsonl, "{\"prompt\": \"x\"}\n\n[1]\n{oops\n").unwrap();
        let (ok, errs) = read_file(&jsonl, InputFormat::Jsonl);
        assert_eq!(ok.len(), 1);
        let origins: Vec<_> = errs
            .iter()
            .map(|e| e.origin.rsplit(':').next().unwrap())
            .collect();
        assert_eq!(origins, ["3", "4"]);
    }
}
