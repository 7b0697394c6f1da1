//! Inputs of `t2i enqueue` → one job object per item, with its origin (file and line) for errors
//! (`plan.rs` then turns items into jobs).
//!
//! Sources: `--prompt` flags, a JSONL file of job objects, a CSV file (one column per job field), a
//! plain prompt list, or a prompt template with value lists (cartesian product or zipped; its items
//! made on demand, [`Template`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

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

/// A prompt template and its value lists: items made on demand, so a template of a million
/// combinations costs its lists, not a million items.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    template: String,
    vars: Vec<(String, Vec<String>)>,
    combine: Combine,
    len: usize,
}

impl Template {
    /// Checks that every placeholder has values and every variable is used.
    pub fn new(
        template: &str,
        vars: &[(String, Vec<String>)],
        combine: Combine,
    ) -> Result<Self, InputError> {
        let err = |reason: String| InputError {
            origin: "--template".into(),
            reason,
        };
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
        let values: BTreeMap<&str, &Vec<String>> =
            vars.iter().map(|(k, v)| (k.as_str(), v)).collect();
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
        let len = match combine {
            Combine::Cartesian => vars
                .iter()
                .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len())),
            Combine::Zip => {
                let n = vars.first().map_or(1, |(_, v)| v.len());
                if let Some((k, v)) = vars.iter().find(|(_, v)| v.len() != n) {
                    return Err(err(format!(
                        "--zip needs equally long value lists: {k} has {}, {} has {n}",
                        v.len(),
                        vars[0].0
                    )));
                }
                Some(n)
            }
        }
        .ok_or_else(|| err("more combinations than this machine can count".into()))?;
        Ok(Self {
            template: template.to_string(),
            vars: vars.to_vec(),
            combine,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Item `i`: in cartesian order the first variable varies slowest (mixed-radix digits of `i`,
    /// the last variable's lowest).
    pub fn item(&self, i: usize) -> Item {
        let mut combo: Vec<(&str, &str)> = Vec::with_capacity(self.vars.len());
        match self.combine {
            Combine::Cartesian => {
                let mut rest = i;
                for (k, vs) in self.vars.iter().rev() {
                    combo.push((k.as_str(), vs[rest % vs.len()].as_str()));
                    rest /= vs.len();
                }
                combo.reverse();
            }
            Combine::Zip => {
                combo.extend(self.vars.iter().map(|(k, v)| (k.as_str(), v[i].as_str())))
            }
        }
        let mut prompt = self.template.clone();
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
    }
}

/// `"a {animal} in {style}"` with `animal=cat,dog` and `style=oil,ink` → prompts.
pub fn expand_template(
    template: &str,
    vars: &[(String, Vec<String>)],
    combine: Combine,
) -> Result<Vec<Item>, InputError> {
    let t = Template::new(template, vars, combine)?;
    Ok((0..t.len()).map(|i| t.item(i)).collect())
}

/// The items of a batch: read (flags, files) or made on demand (a template).
#[derive(Debug, Clone, PartialEq)]
pub enum Items {
    List(Vec<Item>),
    Template(Template),
}

impl Items {
    pub fn len(&self) -> usize {
        match self {
            Self::List(v) => v.len(),
            Self::Template(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn item(&self, i: usize) -> std::borrow::Cow<'_, Item> {
        match self {
            Self::List(v) => std::borrow::Cow::Borrowed(&v[i]),
            Self::Template(t) => std::borrow::Cow::Owned(t.item(i)),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::super::plan::{Plan, Planner, plan};
    use super::super::seeds::SeedStrategy;
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
    fn a_template_planned_on_demand_is_the_expanded_list_planned_at_once() {
        let vars = vec![
            parse_var("a=1,2,3").unwrap(),
            parse_var("b=x,y").unwrap(),
            parse_var("c=p,q,r,s").unwrap(),
        ];
        let p = Plan {
            defaults: Map::new(),
            images_per_prompt: 2,
            seeds: SeedStrategy::Index { base: None },
            batch_id: None,
            key_prefix: None,
        };
        let t = Template::new("{a} {b} {c}", &vars, Combine::Cartesian).unwrap();
        assert_eq!(t.len(), 24);
        let lazy = Planner::new(Items::Template(t.clone()), &p);
        let (id, eager) = plan(
            expand_template("{a} {b} {c}", &vars, Combine::Cartesian).unwrap(),
            &p,
        );
        assert_eq!(
            lazy.batch_id(),
            id,
            "the same batch id: resumable across versions"
        );
        assert_eq!(lazy.len(), 48);
        assert_eq!(lazy.jobs().collect::<Vec<_>>(), eager);
        // Asked twice, the same jobs (each pass makes them again).
        assert!(lazy.jobs().eq(lazy.jobs()));
        assert_eq!(t.item(23).job["prompt"], "3 y s");
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
