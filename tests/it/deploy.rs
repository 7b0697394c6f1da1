//! Deployment files against the code: `infra/base/rabbitmq/definitions.json` (what an operator loads
//! into RabbitMQ) must describe exactly the topology `t2i worker` declares. Both go into their own
//! vhost on the real broker, the worker's declaration is also run against the imported one (RabbitMQ
//! refuses a redeclaration whose arguments differ), and the queues, exchanges and bindings the broker
//! reports for the two vhosts are compared. The file also holds the queues of the model pools
//! `infra/base` deploys ([`DEPLOYED_MODELS`]), so that their jobs are routed before a worker of the
//! pool has ever started (KEDA scales those pools from zero).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use t2i_worker::queue::Topology;

use crate::broker::serial;

/// The models of the pools in `infra/base`: `T2I_MODEL` of `config.yaml` (the SSD-1B pools) and
/// of `worker-vega.yaml`.
const DEPLOYED_MODELS: [&str; 2] = ["segmind/SSD-1B", "segmind/Segmind-Vega"];

const FROM_FILE: &str = "t2i-test-definitions";
const FROM_CODE: &str = "t2i-test-topology";

fn ctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn fresh_vhost(name: &str) {
    let _ = ctl(&["delete_vhost", name]);
    ctl(&["add_vhost", name]).unwrap();
    ctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]).unwrap();
}

/// What the broker reports for a vhost, sorted, without the vhost's name.
fn snapshot(vhost: &str) -> Value {
    let list = |what: &str, cols: &[&str]| -> Value {
        let mut args = vec![what, "-q", "-p", vhost];
        args.extend_from_slice(cols);
        args.extend_from_slice(&["--formatter", "json"]);
        let mut rows: Vec<Value> = serde_json::from_str(&ctl(&args).unwrap()).unwrap();
        // Arguments as name → value: RabbitMQ treats integer widths alike (a JSON 5 imports as
        // `long`, the worker declares `signedint`) and accepted the redeclaration above.
        for row in &mut rows {
            if let Some(Value::Array(args)) = row.get("arguments") {
                let map: serde_json::Map<String, Value> = args
                    .iter()
                    .filter_map(|a| Some((a.get(0)?.as_str()?.to_string(), a.get(2)?.clone())))
                    .collect();
                row["arguments"] = Value::Object(map);
            }
        }
        rows.sort_by_key(|r| r.to_string());
        Value::Array(rows)
    };
    serde_json::json!({
        "queues": list("list_queues", &["name", "durable", "auto_delete", "arguments"]),
        "exchanges": list("list_exchanges", &["name", "type", "durable", "auto_delete", "internal", "arguments"]),
        "bindings": list("list_bindings", &["source_name", "destination_name", "destination_kind", "routing_key", "arguments"]),
    })
}

async fn declare_topology(vhost: &str) -> lapin::Result<()> {
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let conn = lapin::Connection::connect(&url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let topology = Topology::default();
    let mut declared = topology.declare(&ch).await;
    for model in DEPLOYED_MODELS {
        let slug = t2i_worker::job::ModelSlug::of(model).unwrap();
        if declared.is_ok() {
            declared = topology.declare_pool(&ch, &slug).await;
        }
    }
    let _ = conn.close(0, "done".into()).await;
    declared
}

#[test]
fn the_deployed_models_are_the_ones_infra_names() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("infra/base");
    let config = std::fs::read_to_string(base.join("config.yaml")).unwrap();
    assert!(config.contains(&format!("T2I_MODEL: {}", DEPLOYED_MODELS[0])));
    let vega = std::fs::read_to_string(base.join("worker-vega.yaml")).unwrap();
    assert!(vega.contains(&format!("value: {}", DEPLOYED_MODELS[1])));
}

#[tokio::test]
async fn rabbitmq_definitions_file_matches_the_worker_topology() {
    let _g = serial().await;
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("infra/base/rabbitmq/definitions.json");
    let mut defs: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

    // The file targets vhost "/"; import it into a test vhost instead.
    defs.as_object_mut().unwrap().remove("vhosts");
    for key in ["exchanges", "queues", "bindings", "policies"] {
        for item in defs[key].as_array_mut().unwrap() {
            item["vhost"] = Value::from(FROM_FILE);
        }
    }
    fresh_vhost(FROM_FILE);
    fresh_vhost(FROM_CODE);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), defs.to_string()).unwrap();
    // rabbitmqctl runs as another user (rabbitmq) on some machines: the file must be readable.
    let _ = Command::new("chmod").arg("644").arg(tmp.path()).status();
    ctl(&["import_definitions", tmp.path().to_str().unwrap()]).unwrap();

    declare_topology(FROM_CODE).await.unwrap();
    let imported = snapshot(FROM_FILE);
    // Redeclaring over the imported topology fails if any argument differs (PRECONDITION_FAILED).
    declare_topology(FROM_FILE)
        .await
        .expect("the worker's topology conflicts with definitions.json");
    let declared = snapshot(FROM_CODE);
    assert!(
        imported["queues"].as_array().unwrap().len() >= 11,
        "{imported:#}"
    );
    assert_eq!(
        imported, declared,
        "definitions.json and Topology::declare disagree"
    );
    // Redeclaring added nothing to the imported vhost either.
    assert_eq!(snapshot(FROM_FILE), imported);
    for v in [FROM_FILE, FROM_CODE] {
        let _ = ctl(&["delete_vhost", v]);
    }
}
