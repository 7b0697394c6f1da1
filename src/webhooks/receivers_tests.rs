use super::*;
use crate::events::EventData;

const A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const B: &str = "whsec_bmV3LXNlY3JldC1mb3Itcm90YXRpb24tMzJieXRlcw==";
const C: &str = "whsec_c29tZW9uZS1lbHNlcy1zZWNyZXQtMTZi";

fn receivers() -> Receivers {
    let text = format!(
        r#"
        [[receiver]]
        id = "acme"
        url = "https://hooks.acme.example/t2i"
        secrets = ["{A}"]
        secrets_env = "ACME_SECRETS"

        [[receiver]]
        id = "acme-bulk"
        url = "https://hooks.acme.example/t2i/bulk/"
        secrets = ["{B}"]
        events = ["job.failed"]

        [[receiver]]
        id = "audit"
        url = "https://audit.example/all"
        secrets = ["{C}"]
        all_jobs = true
        "#
    );
    Receivers::parse(&text, |v| (v == "ACME_SECRETS").then(|| B.to_string())).unwrap()
}

fn event(kind: EventKind, webhook: serde_json::Value) -> CloudEvent {
    let data: EventData = serde_json::from_value(serde_json::json!({
        "job_id": "j1", "status": "succeeded", "attempt": 1, "worker": "w", "model": "m",
        "params": {"webhook": webhook},
    }))
    .unwrap();
    CloudEvent::new(kind, "test", data, time::OffsetDateTime::UNIX_EPOCH)
}

fn url(s: &str) -> Url {
    Url::parse(s).unwrap()
}

fn target(url: &str, receiver: Option<&str>) -> Target {
    Target {
        url: url.into(),
        receiver: receiver.map(str::to_string),
    }
}

#[test]
fn secrets_come_from_the_file_and_the_environment() {
    let r = receivers();
    let acme = r.by_id("acme").unwrap();
    assert_eq!(acme.secrets.iter().count(), 2);
}

#[test]
fn a_receiver_owns_its_url_and_paths_under_it_only() {
    let r = receivers();
    let acme = r.by_id("acme").unwrap();
    for owned in [
        "https://hooks.acme.example/t2i",
        "https://hooks.acme.example/t2i/jobs/7",
        "https://hooks.acme.example/t2i?job=7",
        "HTTPS://Hooks.Acme.Example:443/t2i/x",
        "https://hooks.acme.example/x/../t2i/y",
    ] {
        assert!(acme.owns(&url(owned)), "{owned}");
    }
    for foreign in [
        "https://hooks.acme.example/t2i-evil",
        "https://hooks.acme.example/t2",
        "https://hooks.acme.example.evil/t2i",
        "https://hooks.acme.example@evil.example/t2i",
        "http://hooks.acme.example/t2i",
        "https://hooks.acme.example:8443/t2i",
    ] {
        assert!(!acme.owns(&url(foreign)), "{foreign}");
    }
}

#[test]
fn the_longest_owning_url_wins() {
    let r = receivers();
    let owner = |u: &str| r.owner_of(&url(u)).map(|r| r.id.as_str());
    assert_eq!(
        owner("https://hooks.acme.example/t2i/bulk/1"),
        Some("acme-bulk")
    );
    assert_eq!(owner("https://hooks.acme.example/t2i/1"), Some("acme"));
    assert_eq!(owner("https://elsewhere.example/"), None);
}

#[test]
fn a_job_naming_a_receiver_is_signed_with_its_secrets_only() {
    let r = receivers();
    let s = r
        .signer(&target("https://hooks.acme.example/t2i", Some("acme")))
        .unwrap();
    assert_eq!(s.name, "acme");
    assert_eq!(s.secrets, r.by_id("acme").unwrap().secrets);
    // A URL under another receiver is signed with that receiver's secrets, not the job's choice.
    let s = r
        .signer(&target("https://hooks.acme.example/t2i/bulk/9", None))
        .unwrap();
    assert_eq!(s.name, "acme-bulk");
}

#[test]
fn a_receiver_never_signs_for_a_url_it_does_not_own() {
    let r = receivers();
    let err = r
        .signer(&target("https://attacker.example/", Some("acme")))
        .unwrap_err();
    assert!(err.contains("not under receiver acme"), "{err}");
    let err = r
        .signer(&target("https://x.example/", Some("nobody")))
        .unwrap_err();
    assert!(err.contains("no receiver \"nobody\""), "{err}");
}

#[test]
fn ad_hoc_urls_need_a_url_key_and_get_their_own_derived_secret() {
    let r = receivers();
    let adhoc = target("https://else.example/hook", None);
    assert!(r.signer(&adhoc).unwrap_err().contains("--url-key"));
    let key = Secret::parse(A).unwrap();
    let r = r.with_url_keys(vec![key.clone()]);
    let s = r.signer(&adhoc).unwrap();
    assert_eq!(s.name, "https://else.example/hook");
    let expected = Secrets::new(vec![key.derive(&url("https://else.example/hook"))]).unwrap();
    assert_eq!(s.secrets, expected);
    let other = r
        .signer(&target("https://else.example/other", None))
        .unwrap();
    assert_ne!(other.secrets, s.secrets);
}

#[test]
fn events_go_to_the_job_receiver_and_every_all_jobs_receiver() {
    let r = receivers();
    let t = r.targets(
        &event(
            EventKind::Succeeded,
            serde_json::json!({"receiver": "acme"}),
        ),
        &[],
        &[],
    );
    assert_eq!(
        t,
        [
            target("https://hooks.acme.example/t2i", Some("acme")),
            target("https://audit.example/all", Some("audit")),
        ]
    );
    // job.started: the job did not ask for it, the audit receiver takes terminal events only.
    let t = r.targets(
        &event(EventKind::Started, serde_json::json!({"receiver": "acme"})),
        &[],
        &[],
    );
    assert!(t.is_empty(), "{t:?}");
}

#[test]
fn a_receiver_filter_narrows_what_the_job_asks_for() {
    let r = receivers();
    let hook = serde_json::json!({"url": "https://hooks.acme.example/t2i/bulk/1"});
    let t = r.targets(&event(EventKind::Succeeded, hook.clone()), &[], &[]);
    assert_eq!(t, [target("https://audit.example/all", Some("audit"))]);
    let t = r.targets(&event(EventKind::Failed, hook), &[], &[]);
    assert_eq!(t[0], target("https://hooks.acme.example/t2i/bulk/1", None));
}

#[test]
fn an_unknown_receiver_is_still_a_target_so_it_is_dead_lettered() {
    let r = receivers();
    let t = r.targets(
        &event(
            EventKind::Failed,
            serde_json::json!({"receiver": "gone-away"}),
        ),
        &[],
        &[],
    );
    assert_eq!(t[0], target("receiver:gone-away", Some("gone-away")));
    assert!(r.signer(&t[0]).is_err());
}

#[test]
fn endpoints_are_ad_hoc_targets_for_their_events() {
    let r = Receivers::default();
    let ep = [url("https://ops.example/hook")];
    let t = r.targets(
        &event(EventKind::Failed, serde_json::Value::Null),
        &ep,
        &[EventKind::Failed],
    );
    assert_eq!(t, [target("https://ops.example/hook", None)]);
}

#[test]
fn bad_receiver_files_are_refused_with_the_receiver_named() {
    let none = |_: &str| -> Option<String> { None };
    let cases = [
        (
            "[[receiver]]\nid = \"a\"\nurl = \"https://a.example/\"".to_string(),
            "no secrets",
        ),
        (
            format!(
                "[[receiver]]\nid = \"../x\"\nurl = \"https://a.example/\"\nsecrets = [\"{A}\"]"
            ),
            "an id is",
        ),
        (
            format!("[[receiver]]\nid = \"a\"\nurl = \"ftp://a.example/\"\nsecrets = [\"{A}\"]"),
            "http(s)",
        ),
        (
            "[[receiver]]\nid = \"a\"\nurl = \"https://a/\"\nsecrets_env = \"NOPE\"".to_string(),
            "NOPE is not set",
        ),
        (
            format!(
                "[[receiver]]\nid = \"a\"\nurl = \"https://a/\"\nsecrets = [\"{A}\"]\nevents = [\"job.progress\"]"
            ),
            "job.progress",
        ),
        (
            format!(
                "[[receiver]]\nid = \"a\"\nurl = \"https://a/\"\nsecrets = [\"{A}\"]\n[[receiver]]\nid = \"a\"\nurl = \"https://b/\"\nsecrets = [\"{A}\"]"
            ),
            "used twice",
        ),
        (
            format!("[[receiver]]\nid = \"a\"\nurl = \"https://a/\"\nsecret = \"{A}\""),
            "unknown field",
        ),
    ];
    for (text, why) in cases {
        let err = Receivers::parse(&text, none).unwrap_err();
        assert!(err.contains(why), "{why}: {err}");
    }
}
