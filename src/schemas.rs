//! The published JSON Schemas of the message contract, generated from the Rust types so they cannot
//! drift (`t2i schemas --out schemas/`; a test compares the committed files with fresh output).

use std::path::Path;

use anyhow::Context;

/// (file name, schema) for every message type of the contract.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    let mut job =
        serde_json::to_value(schemars::schema_for!(crate::job::JobRequest)).unwrap_or_default();
    let mut event =
        serde_json::to_value(schemars::schema_for!(crate::events::CloudEvent)).unwrap_or_default();
    let job_id = crate::events::EVENT_SCHEMA_ID.replace("/event.schema.json", "/job.schema.json");
    for (schema, id) in [
        (&mut job, job_id.as_str()),
        (&mut event, crate::events::EVENT_SCHEMA_ID),
    ] {
        if let Some(o) = schema.as_object_mut() {
            o.insert("$id".into(), id.into());
        }
    }
    vec![("job.schema.json", job), ("event.schema.json", event)]
}

pub fn render(schema: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(schema).unwrap_or_default();
    s.push('\n');
    s
}

pub fn write(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, schema) in all() {
        let path = out.join(name);
        std::fs::write(&path, render(&schema))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_schemas_match_the_rust_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        for (name, schema) in all() {
            let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            assert!(
                committed == render(&schema),
                "schemas/{name} is stale: run `cargo run -- schemas --out schemas` and commit the result"
            );
        }
    }

    #[test]
    fn dataschema_names_the_event_data_definition_of_the_published_schema() {
        let (name, event) = &all()[1];
        assert_eq!(*name, "event.schema.json");
        let (base, pointer) = crate::events::DATA_SCHEMA.split_once('#').unwrap();
        assert_eq!(event["$id"], base);
        let data = event.pointer(pointer).expect("the pointer resolves");
        assert_eq!(data["description"], "The `data` of every event.");
        assert_eq!(event["properties"]["data"]["$ref"], format!("#{pointer}"));
        assert_eq!(
            all()[0].1["$id"],
            "https://t2i-worker.dev/schemas/v1/job.schema.json"
        );
    }

    #[test]
    fn the_job_schema_accepts_the_design_example_shape() {
        let (_, job) = &all()[0];
        let props = job["properties"].as_object().unwrap();
        for field in [
            "job_id", "prompt", "width", "output", "webhook", "batch", "deadline", "metadata",
        ] {
            assert!(props.contains_key(field), "{field}");
        }
        assert_eq!(job["additionalProperties"], serde_json::Value::Bool(false));
        assert_eq!(job["required"], serde_json::json!(["job_id", "prompt"]));
    }
}
