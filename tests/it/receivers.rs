//! `t2i webhooks` with configured receivers, through the real binary, RabbitMQ, Garage and the
//! Python receiver (`standardwebhooks` verifies every signature): each receiver signed with its own
//! secrets and no other's, two secrets during a rotation, an ad-hoc URL with its per-URL secret,
//! a 410 that disables its receiver across a relay restart until `t2i webhooks enable`, and
//! `t2i webhooks replay` redelivering what was dead-lettered meanwhile.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::broker::{World, amqp_url, serial};
use crate::webhooks::{
    Proc, SECRET, URL_KEY, delete_webhook_queues, drain_webhook_dead_letters, free_port,
    publish_webhook_event, read_log, spawn_relay, start_receiver, wait_http_ok,
};

/// Beta's secrets during a rotation: the old one in the file, the new one in the environment.
const BETA_OLD: &str = "whsec_bmV3LXNlY3JldC1mb3Itcm90YXRpb24tMzJieXRlcw==";
const BETA_NEW: &str = "whsec_c29tZW9uZS1lbHNlcy1zZWNyZXQtMTZi";

/// Runs `t2i webhooks <args>` to completion (an operator command) and returns its stdout.
fn t2i_webhooks(world: &World, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_t2i"))
        .arg("webhooks")
        .args(args)
        .envs(world.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("T2I_AMQP_URL", amqp_url())
        .env("T2I_AMQP_PREFIX", &world.prefix)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "t2i webhooks {args:?}: {stdout}{stderr}"
    );
    stdout
}

/// Starts the relay on `receivers` and waits until it is ready; returns it and its metrics URL.
async fn start_relay(
    world: &World,
    main: u16,
    receivers: &Path,
    state: &str,
    extra: &[&str],
    log: &Path,
) -> (Proc, String) {
    let http = free_port();
    let mut args: Vec<String> = [
        "--receivers",
        receivers.to_str().unwrap(),
        "--state",
        state,
        "--state-refresh-s",
        "1",
        "--allow-http",
        "--allow-host",
        &format!("127.0.0.1:{main}"),
        "--webhook-retry-delays",
        "1",
        "--http-addr",
        &format!("127.0.0.1:{http}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let env = [("IT_BETA_SECRETS", BETA_NEW.to_string())];
    let relay = spawn_relay(world, &args, &env, log);
    wait_http_ok(
        &format!("http://127.0.0.1:{http}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    (relay, format!("http://127.0.0.1:{http}/metrics"))
}

/// Waits until `done` holds for the receiver's log (60 s at most), then 2 s more for anything
/// that should not happen, and returns the log.
async fn wait_log(log: &Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&read_log(log)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    read_log(log)
}

async fn wait_dead(world: &World, n: u32) {
    let q = world.topology.webhooks_dead_queue();
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.message_count(&q).await < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(world.message_count(&q).await, n, "dead letters in {q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_sign_with_their_own_secrets_rotation_and_per_url_secrets() {
    let _g = serial().await;
    let world = World::new("receivers").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received.jsonl");
    let checks = dir.path().join("checks.json");
    let (_receiver, main, _) = start_receiver(&log, 0, Some(&checks));
    let base = format!("http://127.0.0.1:{main}/ok");
    let receivers = dir.path().join("receivers.toml");
    std::fs::write(
        &receivers,
        format!(
            r#"
            [[receiver]]
            id = "alpha"
            url = "{base}/alpha"
            secrets = ["{SECRET}"]

            [[receiver]]
            id = "beta"
            url = "{base}/beta/"
            secrets = ["{BETA_OLD}"]
            secrets_env = "IT_BETA_SECRETS"
            "#
        ),
    )
    .unwrap();
    // What the operator hands the owner of an ad-hoc URL.
    let adhoc = format!("{base}/adhoc");
    let adhoc_secret = t2i_webhooks(&world, &["url-secret", &adhoc, "--url-key", URL_KEY]);
    let adhoc_secret = adhoc_secret.trim();
    assert!(adhoc_secret.starts_with("whsec_"), "{adhoc_secret}");
    std::fs::write(
        &checks,
        json!({"alpha": SECRET, "beta_old": BETA_OLD, "beta_new": BETA_NEW,
               "adhoc": adhoc_secret, "url_key": URL_KEY})
        .to_string(),
    )
    .unwrap();
    let state = dir.path().join("state").display().to_string();
    let (_relay, metrics) = start_relay(
        &world,
        main,
        &receivers,
        &state,
        &["--url-key", URL_KEY],
        &dir.path().join("relay.log"),
    )
    .await;

    let jobs = [
        ("to-alpha", json!({"receiver": "alpha"})),
        ("to-beta", json!({"receiver": "beta"})),
        // A URL under beta's, named without the id: still beta's secrets.
        ("beta-url", json!({"url": format!("{base}/beta/job-7")})),
        ("to-adhoc", json!({"url": adhoc})),
        // Alpha's id with beta's URL: never signed with alpha's secret for beta.
        (
            "forged",
            json!({"receiver": "alpha", "url": format!("{base}/beta/x")}),
        ),
        ("nobody", json!({"receiver": "nobody"})),
    ];
    for (id, hook) in &jobs {
        publish_webhook_event(&world, id, hook.clone()).await;
    }
    let entries = wait_log(&log, |e| e.len() >= 4).await;
    assert_eq!(entries.len(), 4, "{entries:#?}");
    let by_path = |p: &str| {
        entries
            .iter()
            .find(|e| e["path"] == p)
            .unwrap_or_else(|| panic!("nothing POSTed to {p}: {entries:#?}"))
    };
    let expect = |path: &str, accepted: &[&str], signatures: u64| {
        let e = by_path(path);
        for name in ["alpha", "beta_old", "beta_new", "adhoc", "url_key"] {
            assert_eq!(
                e["checks"][name],
                accepted.contains(&name),
                "{path}: verified with {name}? {e}"
            );
        }
        assert_eq!(e["signatures"], signatures, "{e}");
        assert_eq!(e["status"], 200, "{e}");
    };
    expect("/ok/alpha", &["alpha"], 1);
    expect("/ok/beta/", &["beta_old", "beta_new"], 2);
    expect("/ok/beta/job-7", &["beta_old", "beta_new"], 2);
    expect("/ok/adhoc", &["adhoc"], 1);

    let dead = drain_webhook_dead_letters(&world).await;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    assert!(
        dead.iter()
            .any(|(t, why)| t.ends_with("/ok/beta/x") && why.contains("not under receiver alpha")),
        "{dead:#?}"
    );
    assert!(
        dead.iter()
            .any(|(t, why)| t == "receiver:nobody" && why.contains("no receiver \"nobody\"")),
        "{dead:#?}"
    );
    let metrics = reqwest::get(metrics).await.unwrap().text().await.unwrap();
    for line in ["outcome=\"delivered\"} 4", "outcome=\"unrouted\"} 2"] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    delete_webhook_queues(&world, 1).await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_a_receiver_across_restarts_until_enabled_and_replay_redelivers() {
    let _g = serial().await;
    let world = World::new("gone").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received.jsonl");
    let (_receiver, main, _) = start_receiver(&log, 0, None);
    let receivers = dir.path().join("receivers.toml");
    std::fs::write(
        &receivers,
        format!(
            "[[receiver]]\nid = \"comeback\"\nurl = \"http://127.0.0.1:{main}/gone-once\"\nsecrets = [\"{SECRET}\"]\n"
        ),
    )
    .unwrap();
    // In the object store, where every replica and the operator see it.
    let state = format!("{}webhook-state", world.storage());
    let relay_log = |n: u32| dir.path().join(format!("relay{n}.log"));
    let (relay, _) = start_relay(&world, main, &receivers, &state, &[], &relay_log(1)).await;
    publish_webhook_event(&world, "first", json!({"receiver": "comeback"})).await;
    wait_dead(&world, 1).await;
    drop(relay);

    // A new relay: the 410 is remembered, nothing is POSTed, the event waits in the dead letters.
    let (_relay, metrics) = start_relay(&world, main, &receivers, &state, &[], &relay_log(2)).await;
    publish_webhook_event(&world, "second", json!({"receiver": "comeback"})).await;
    publish_webhook_event(&world, "elsewhere", json!({"receiver": "nobody"})).await;
    wait_dead(&world, 3).await;
    let entries = read_log(&log);
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["status"], 410);
    let m = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    assert!(m.contains("outcome=\"disabled\"} 1"), "{m}");
    let relay2 = std::fs::read_to_string(relay_log(2)).unwrap();
    assert!(relay2.contains("disabled since"), "{relay2}");

    let out = t2i_webhooks(&world, &["enable", "comeback", "--state", &state]);
    assert!(out.contains("enabled comeback"), "{out}");
    // The relay trusts what it read for --state-refresh-s (1 s here).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = t2i_webhooks(&world, &["replay", "--receiver", "comeback"]);
    assert!(out.contains("replayed 2 "), "{out}");
    assert!(out.contains("1 others"), "{out}");
    let entries = wait_log(&log, |e| {
        e.iter().filter(|e| e["status"] == 200).count() >= 2
    })
    .await;
    let ok: Vec<&Value> = entries.iter().filter(|e| e["status"] == 200).collect();
    assert_eq!(ok.len(), 2, "{entries:#?}");
    for e in &ok {
        assert_eq!(e["verified"], true, "{e}");
    }
    assert_eq!(entries.len(), 3, "{entries:#?}");
    // The first event's id came back with the replay: receivers deduplicate on it.
    assert_eq!(ok.iter().filter(|e| e["id"] == entries[0]["id"]).count(), 1);
    let dead = drain_webhook_dead_letters(&world).await;
    assert_eq!(
        dead.len(),
        1,
        "only the other receiver's is left: {dead:#?}"
    );
    assert_eq!(dead[0].0, "receiver:nobody");
    delete_webhook_queues(&world, 1).await;
    world.cleanup().await;
}
