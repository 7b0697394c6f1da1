//! `GET /openapi.json`: the gateway's OpenAPI 3.1 document.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::queue::Lane;

pub(super) async fn openapi() -> Response {
    let job: Value =
        serde_json::from_str(include_str!("../../schemas/job.schema.json")).unwrap_or(Value::Null);
    let err = json!({"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
        "required": ["code", "message"], "properties": {"code": {"type": "string"},
        "message": {"type": "string"}, "field": {"type": "string"}, "value": {"type": "string"}}}}});
    let errors = |codes: &[&str]| -> Value {
        let mut m = serde_json::Map::new();
        for c in codes {
            m.insert(c.to_string(), json!({"description": "error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
        }
        Value::Object(m)
    };
    let with = |mut base: Value, extra: Value| {
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        base
    };
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "t2i gateway", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Text-to-image jobs (contract v1) over HTTP."},
        "components": {
            "schemas": {"Job": job, "Error": err},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {"post": {
                "summary": "Queue a job (job_id optional)",
                "parameters": [{"name": "lane", "in": "query", "schema": {"enum": Lane::ALL.map(Lane::routing_key)}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                "responses": with(json!({"202": {"description": "queued", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"job_id": {"type": "string"}, "status": {"const": "queued"},
                    "status_url": {"type": "string"}}}}}}}), errors(&["400", "401", "413", "422", "503"]))
            }},
            "/v1/jobs/{id}": {
                "parameters": [
                    {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
                    {"name": "key_prefix", "in": "query", "required": false, "schema": {"type": "string"},
                     "description": "where the job's objects are (default: the store's id index, else the root)"}
                ],
                "get": {
                    "summary": "A job's latest state: queued, running, succeeded, failed, canceled or expired",
                    "responses": with(json!({"200": {"description": "the latest event's data, image URLs presigned now",
                        "content": {"application/json": {"schema": {"type": "object",
                        "required": ["job_id", "status"], "properties": {"job_id": {"type": "string"},
                        "status": {"enum": ["queued", "running", "succeeded", "failed", "canceled", "expired"]},
                        "updated_at": {"type": "string"}, "images": {"type": "array"}, "error": {}}}}}}}),
                        errors(&["401", "404", "422", "503"]))
                },
                "delete": {
                    "summary": "Cancel a job that has not ended",
                    "responses": with(json!({"202": {"description": "cancellation sent to the workers",
                        "content": {"application/json": {"schema": {"type": "object", "properties": {
                        "job_id": {"type": "string"}, "status": {"const": "cancel_requested"}}}}}}}),
                        errors(&["401", "409", "422", "503"]))
                }
            },
            "/generate-image": {"post": {
                "summary": "Generate and wait: {\"text\": ...} plus optional job fields",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}},
                    "additionalProperties": true}}}},
                "responses": with(json!({"200": {"description": "image URLs", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"job_id": {"type": "string"}, "image_url": {"type": "string"},
                    "images": {"type": "array"}}}}}}}), errors(&["400", "401", "409", "413", "422", "502", "503", "504"]))
            }},
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"security": [], "responses": {"200": {"description": "connected to the broker"},
                "503": {"description": "not connected"}}}}
        }
    }))
    .into_response()
}
