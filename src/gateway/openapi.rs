//! `GET /openapi.json`: the gateway's OpenAPI 3.1 document, built for this gateway (its limits,
//! its model, whether it asks for a bearer token), so that it is true to what it accepts.
//!
//! Every `$ref` resolves within the document: the `$defs` of the contract's schemas
//! (`schemas/job.schema.json`, `schemas/event.schema.json`) move into `components/schemas` and
//! their refs are rewritten to `#/components/schemas/...`. Their `$id`s are dropped, since a `$ref`
//! under an `$id` resolves against that `$id`, not against this document. Every status and content
//! type the gateway can answer is listed; `tests/it/api.rs` runs schemathesis against it. Bounds
//! that JSON Schema cannot say (the pixel budget, `model` spellings) are in descriptions.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::App;
use crate::job::Limits;
use crate::queue::Lane;

pub(super) async fn openapi(State(app): State<Arc<App>>) -> Response {
    Json(document(&app.limits, &app.model, app.token.is_some())).into_response()
}

/// The contract schema `text`, its `$defs` moved into `components`, its refs rewritten.
fn hoist(text: &str, components: &mut Map<String, Value>) -> Value {
    // A committed file, checked against the Rust types by `schemas::tests`.
    let mut schema: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    rewrite_refs(&mut schema);
    let Some(root) = schema.as_object_mut() else {
        return Value::Null;
    };
    if let Some(Value::Object(defs)) = root.remove("$defs") {
        components.extend(defs);
    }
    root.remove("$id");
    root.remove("$schema");
    schema
}

fn rewrite_refs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/$defs/")
            {
                *r = format!("#/components/schemas/{name}");
            }
            m.values_mut().for_each(rewrite_refs);
        }
        Value::Array(a) => a.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// The job schema as the gateway takes it: `job_id` optional (it assigns one), this gateway's
/// bounds on sizes, steps, guidance, images and prompts.
fn submission(mut job: Value, limits: &Limits, model: &str) -> Value {
    let set = |job: &mut Value, field: &str, key: &str, v: Value| {
        job["properties"][field][key] = v;
    };
    for side in ["width", "height"] {
        set(&mut job, side, "minimum", limits.min_side.into());
        set(&mut job, side, "maximum", limits.max_side.into());
    }
    set(&mut job, "steps", "maximum", limits.max_steps.into());
    set(
        &mut job,
        "guidance_scale",
        "maximum",
        limits.max_guidance.into(),
    );
    set(&mut job, "num_images", "maximum", limits.max_images.into());
    set(&mut job, "seed", "maximum", u64::MAX.into());
    for prompt in ["prompt", "negative_prompt"] {
        set(
            &mut job,
            prompt,
            "maxLength",
            limits.max_prompt_chars.into(),
        );
    }
    set(
        &mut job,
        "width",
        "description",
        format!(
            "Pixels, a multiple of 8; width × height at most {} [default: the model's]",
            limits.max_pixels
        )
        .into(),
    );
    set(
        &mut job,
        "model",
        "description",
        format!(
            "The model the job is for, routed to that model's worker pool; without it, the default \
             pool ({model:?}) renders it. A model no pool serves: 422 `model_not_served`."
        )
        .into(),
    );
    job["required"] = json!(["prompt"]);
    job["title"] = "t2i job (job_id optional)".into();
    job
}

/// `POST /generate-image`: the job with `text` for `prompt` (either one, not both).
fn generate_request(mut job: Value) -> Value {
    let prompt = job["properties"]["prompt"].clone();
    job["properties"]["text"] = prompt;
    job["required"] = json!([]);
    job["oneOf"] = json!([{"required": ["text"]}, {"required": ["prompt"]}]);
    job["title"] = "t2i job, `text` or `prompt`".into();
    job
}

fn schemas(limits: &Limits, model: &str) -> Map<String, Value> {
    let mut c = Map::new();
    let job = hoist(include_str!("../../schemas/job.schema.json"), &mut c);
    hoist(include_str!("../../schemas/event.schema.json"), &mut c);
    let submission = submission(job, limits, model);
    c.insert(
        "GenerateImageRequest".into(),
        generate_request(submission.clone()),
    );
    c.insert("JobSubmission".into(), submission);
    let string = json!({"type": "string"});
    c.insert(
        "Error".into(),
        json!({
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": string, "message": string, "field": string, "value": string}},
            "job_id": string, "status": string, "status_url": string}}),
    );
    c.insert(
        "Accepted".into(),
        json!({
        "type": "object", "required": ["job_id", "status", "status_url"],
        "properties": {"job_id": string, "status": {"const": "queued"}, "status_url": string}}),
    );
    c.insert(
        "JobStatus".into(),
        json!({
        "description": "The job's latest record: the data of its latest event, `status` the state",
        "allOf": [{"$ref": "#/components/schemas/EventData"}, {"type": "object", "properties": {
            "status": {"enum": ["queued", "running", "succeeded", "failed", "canceled", "expired"]},
            "updated_at": {"type": "string", "format": "date-time"}}}]}),
    );
    c.insert(
        "CancelRequested".into(),
        json!({
        "type": "object", "required": ["job_id", "status", "status_url"],
        "properties": {"job_id": string, "status": {"const": "cancel_requested"},
            "status_url": string}}),
    );
    c.insert(
        "GenerateImageResult".into(),
        json!({
        "type": "object", "required": ["job_id", "status", "image_url", "images"],
        "properties": {"job_id": string, "status": {"const": "succeeded"},
            "image_url": {"type": ["string", "null"]},
            "images": {"type": "array", "items": {"$ref": "#/components/schemas/ImageRecord"}},
            "timings_ms": {}}}),
    );
    c
}

/// `{"200": ..., "4xx": Error, ...}`: one success, the error statuses as JSON errors.
fn responses(ok: &str, success: Value, errors: &[&str], auth: bool) -> Value {
    let mut m = Map::new();
    m.insert(ok.into(), success);
    for code in errors.iter().filter(|c| auth || **c != "401") {
        let why = match *code {
            "400" => "not JSON, not an object, an unreadable body or a malformed query string",
            "401" => "missing or wrong bearer token",
            "404" => "no such job, or no such route (an empty id)",
            "409" => "the job has already ended, or was canceled",
            "413" => "the body is over the limit",
            "422" => {
                "a field is invalid (`field` names it), or no worker pool serves the job's `model` (`model_not_served`)"
            }
            "502" => "the job failed",
            "503" => "the broker, the store or the workers cannot be reached; retry",
            "504" => "no result in time; the job goes on",
            _ => "error",
        };
        m.insert(
            code.to_string(),
            json!({"description": why, "content": {"application/json":
            {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(m)
}

fn json_body(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema":
        {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn text(description: &str) -> Value {
    json!({"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}})
}

/// The document for a gateway with these limits, this model, and a bearer token or none.
pub(super) fn document(limits: &Limits, model: &str, auth: bool) -> Value {
    let job_id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string",
        "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:-]+$",
        "not": {"enum": [".", "..", "_index"]}}});
    let key_prefix = json!({"name": "key_prefix", "in": "query", "required": false,
        "schema": {"type": "string", "maxLength": 512, "pattern": "^[A-Za-z0-9._/=+-]*$"},
        "description": "where the job's objects are (default: the store's id index, else the root)"});
    let links = json!({
        "GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/job_id"}},
        "CancelJob": {"operationId": "cancelJob", "parameters": {"id": "$response.body#/job_id"}}});
    let mut accepted = json_body("queued", "Accepted");
    accepted["headers"] = json!({"Location": {"schema": {"type": "string"},
        "description": "the status URL"}});
    accepted["links"] = links;
    let open = json!([]);
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "t2i gateway", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Text-to-image jobs (contract v1) over HTTP. Every error, on \
                     every route (unknown ones and wrong methods included), is a JSON error. \
                     Bodies are at most 64 KiB as sent; the gateway's own `job_id` is not counted."},
        "components": {"schemas": schemas(limits, model)},
        "paths": {
            "/v1/jobs": {"post": {
                "operationId": "submitJob",
                "summary": "Queue a job (job_id optional: a UUIDv7 is assigned)",
                "parameters": [{"name": "lane", "in": "query", "required": false,
                    "schema": {"type": "string", "enum": Lane::ALL.map(Lane::routing_key)}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema":
                    {"$ref": "#/components/schemas/JobSubmission"}}}},
                "responses": responses("202", accepted,
                    &["400", "401", "413", "422", "503"], auth)
            }},
            "/v1/jobs/{id}": {
                "parameters": [job_id, key_prefix],
                "get": {
                    "operationId": "getJob",
                    "summary": "A job's latest state: queued, running, succeeded, failed, canceled or expired",
                    "responses": responses("200", json_body(
                        "the latest record, image URLs presigned now", "JobStatus"),
                        &["400", "401", "404", "422", "503"], auth)
                },
                "delete": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a job that has not ended",
                    "responses": responses("202", json_body(
                        "cancellation sent to the workers", "CancelRequested"),
                        &["400", "401", "404", "409", "422", "503"], auth)
                }
            },
            "/generate-image": {"post": {
                "operationId": "generateImage",
                "summary": "Generate and wait: {\"text\": ...} plus optional job fields",
                "requestBody": {"required": true, "content": {"application/json": {"schema":
                    {"$ref": "#/components/schemas/GenerateImageRequest"}}}},
                "responses": responses("200", json_body("image URLs", "GenerateImageResult"),
                    &["400", "401", "409", "413", "422", "502", "503", "504"], auth)
            }},
            "/openapi.json": {"get": {"operationId": "openapi", "security": open,
                "responses": {"200": {"description": "this document", "content":
                    {"application/json": {"schema": {"type": "object"}}}}}}},
            "/healthz": {"get": {"operationId": "healthz", "security": open,
                "responses": {"200": text("alive")}}},
            "/readyz": {"get": {"operationId": "readyz", "security": open,
                "responses": {"200": text("connected to the broker"), "503": text("not connected")}}},
            "/metrics": {"get": {"operationId": "metrics", "security": open,
                "responses": {"200": text("Prometheus text format 0.0.4")}}}
        }
    });
    if auth {
        doc["components"]["securitySchemes"] =
            json!({"bearer": {"type": "http", "scheme": "bearer"}});
        doc["security"] = json!([{"bearer": []}]);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves_within_the_document() {
        // The regression: refs to `#/$defs/...`, which no OpenAPI tool resolves.
        let doc = document(&Limits::default(), "segmind/SSD-1B", true);
        let mut all = vec![];
        refs(&doc, &mut all);
        assert!(all.len() > 10, "{all:?}");
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r}"));
            assert!(doc["components"]["schemas"][name].is_object(), "{r}");
        }
        let text = doc.to_string();
        assert!(
            !text.contains("$defs") && !text.contains("\"$id\""),
            "{text}"
        );
    }

    #[test]
    fn job_id_is_optional_and_the_gateways_limits_are_the_bounds() {
        let limits = Limits {
            min_side: 32,
            max_steps: 50,
            ..Limits::default()
        };
        let doc = document(&limits, "segmind/SSD-1B", false);
        let job = &doc["components"]["schemas"]["JobSubmission"];
        assert_eq!(job["required"], json!(["prompt"]));
        assert_eq!(job["properties"]["width"]["minimum"], 32);
        assert_eq!(job["properties"]["steps"]["maximum"], 50);
        let gen_ = &doc["components"]["schemas"]["GenerateImageRequest"];
        assert!(gen_["properties"]["text"].is_object());
    }

    #[test]
    fn without_a_token_no_operation_asks_for_one() {
        let doc = document(&Limits::default(), "m", false);
        assert!(doc.get("security").is_none());
        assert!(
            doc["paths"]["/v1/jobs"]["post"]["responses"]
                .get("401")
                .is_none()
        );
        let doc = document(&Limits::default(), "m", true);
        assert_eq!(doc["security"], json!([{"bearer": []}]));
        assert!(doc["paths"]["/v1/jobs"]["post"]["responses"]["401"].is_object());
    }
}
