//! The webhook relay's SSRF guard through the real binary: every forbidden form of a receiver URL
//! against a listener on loopback that must see no connection, and the egress proxy.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::broker::{World, serial};
use crate::webhooks::*;

/// A TCP listener on loopback that answers each request with `answer(request line)` and records
/// the request lines (one request per connection).
struct Listener {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

type Answer = std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>;

impl Listener {
    /// Listens on 127.0.0.1 and, where the host has IPv6, on [::1] with the same port.
    async fn start(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        let answer: Answer = std::sync::Arc::new(answer);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = tokio::net::TcpListener::bind(("::1", port)).await.ok();
        for l in std::iter::once(v4).chain(v6) {
            let (seen, answer) = (seen.clone(), answer.clone());
            tokio::spawn(async move {
                while let Ok((conn, _)) = l.accept().await {
                    let (seen, answer) = (seen.clone(), answer.clone());
                    tokio::spawn(Self::serve(conn, seen, answer));
                }
            });
        }
        Self { port, seen }
    }

    async fn serve(
        mut conn: tokio::net::TcpStream,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        answer: Answer,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(i + 4);
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end.unwrap_or(buf.len())]).to_string();
        let line = head.lines().next().unwrap_or("(nothing sent)").to_string();
        seen.lock().unwrap().push(line.clone());
        let Some(head_end) = head_end else { return };
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = conn.write_all(answer(&line).as_bytes()).await;
        let _ = conn.shutdown().await;
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn http_answer(status: &str, headers: &[(&str, &str)]) -> String {
    let mut s = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s + "\r\n"
}

/// Names other than `localhost` that this host resolves to 127.0.0.1 only (from /etc/hosts), so a
/// name that resolves to loopback is tested as a name, not caught by the `localhost` rule.
fn loopback_names() -> Vec<String> {
    use std::net::ToSocketAddrs;
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut names: Vec<String> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip: std::net::IpAddr = words.next()?.parse().ok()?;
            ip.is_loopback()
                .then(|| words.map(str::to_lowercase).collect::<Vec<_>>())
        })
        .flatten()
        .filter(|n| n != "localhost" && !n.ends_with(".localhost"))
        .filter(|n| {
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .filter(|n| {
            (n.as_str(), 0).to_socket_addrs().is_ok_and(|addrs| {
                let addrs: Vec<_> = addrs.collect();
                !addrs.is_empty()
                    && addrs.iter().all(|a| a.ip().is_loopback())
                    && addrs
                        .iter()
                        .any(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST)
            })
        })
        .collect();
    names.dedup();
    names.truncate(2);
    names
}

/// Publishes a `job.succeeded` event whose job names `url` as its webhook (no worker needed: the
/// relay reads nothing else).
async fn publish_hook_event(world: &World, job_id: &str, url: &str) {
    publish_webhook_event(world, job_id, json!({ "url": url })).await;
}

/// An allowed receiver on loopback: `/ok` answers 200, `/redirect/{i}` redirects (307) to
/// `redirects[i]`, anything else 404.
async fn redirecting_receiver(redirects: Vec<String>) -> Listener {
    Listener::start(move |line| {
        let path = line.split_whitespace().nth(1).unwrap_or("");
        if path == "/ok" {
            return http_answer("200 OK", &[]);
        }
        match path
            .strip_prefix("/redirect/")
            .and_then(|i| redirects.get(i.parse::<usize>().ok()?))
        {
            Some(to) => http_answer("307 Temporary Redirect", &[("location", to)]),
            None => http_answer("404 Not Found", &[]),
        }
    })
    .await
}

/// Starts the relay with `extra` flags and `env`, retrying once after 1 s, and waits until ready.
async fn start_guard_relay(
    world: &World,
    allowed: &[String],
    extra: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> Proc {
    let relay_http = free_port();
    let mut args: Vec<String> = vec![
        "--url-key".into(),
        URL_KEY.into(),
        "--allow-http".into(),
        "--webhook-retry-delays".into(),
        "1".into(),
        "--timeout-s".into(),
        "3".into(),
        "--http-addr".into(),
        format!("127.0.0.1:{relay_http}"),
        "--state".into(),
        log.with_extension("state").display().to_string(),
    ];
    for a in allowed {
        args.extend(["--allow-host".into(), a.clone()]);
    }
    args.extend(extra.iter().cloned());
    let relay = spawn_relay(world, &args, env, log);
    wait_http_ok(
        &format!("http://127.0.0.1:{relay_http}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    relay
}

/// Publishes one event per URL, then waits until `dead` deliveries are dead-lettered (and 2 s
/// more, for anything that should not happen) and returns them.
async fn relay_all(world: &World, urls: &[&String], dead: usize) -> Vec<(String, String)> {
    for (i, url) in urls.iter().enumerate() {
        publish_hook_event(world, &format!("guard{i}"), url).await;
    }
    let dead_q = world.topology.webhooks_dead_queue();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && (world.message_count(&dead_q).await as usize) < dead {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drain_webhook_dead_letters(world).await
}

/// The proxy variables of a relay's environment, all naming `proxy`.
fn proxy_env(proxy: &str) -> Vec<(&'static str, String)> {
    PROXY_VARS[..6]
        .iter()
        .map(|v| (*v, proxy.to_string()))
        .collect()
}

/// The SSRF guard against every forbidden form, through the real relay: a listener on loopback
/// (127.0.0.1 and ::1, one port) must see no connection at all, whether the URL names it directly
/// (decimal, octal, hex and short IPv4, IPv4-mapped and -compatible IPv6, 0.0.0.0, `localhost` in
/// several spellings, another name that resolves to loopback, an allowed host on another port) or
/// an allowed receiver redirects to it, and while `HTTP(S)_PROXY`/`ALL_PROXY` in the relay's
/// environment name that listener as the proxy. Each refused URL is dead-lettered as refused, and
/// an allowed receiver still gets its deliveries, directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_guard_reaches_no_loopback_listener() {
    let _g = serial().await;
    let world = World::new("guard").await;
    let dir = tempfile::tempdir().unwrap();
    let trap = Listener::start(|_| http_answer("200 OK", &[])).await;
    let t = trap.port;
    let names = loopback_names();
    if names.is_empty() {
        eprintln!("no loopback name besides localhost in /etc/hosts: only localhost is tested");
    }

    // Where the allowed receiver redirects /redirect/{i} to; the last one is allowed.
    let mut redirects = vec![
        format!("http://127.0.0.1:{t}/stolen"),
        format!("http://localhost:{t}/stolen"),
        format!("http://2130706433:{t}/stolen"),
        format!("http://[::ffff:127.0.0.1]:{t}/stolen"),
        format!("http://[::1]:{t}/stolen"),
    ];
    redirects.extend(names.iter().map(|n| format!("http://{n}:{t}/stolen")));
    let refused_redirects = redirects.len();
    let receiver = {
        // The receiver's port is only known once it listens: /redirect/{last} reads it here.
        let port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let p = port.clone();
        let mut redirects = redirects.clone();
        redirects.push(String::new());
        let last = redirects.len() - 1;
        let r = Listener::start(move |line| {
            let path = line.split_whitespace().nth(1).unwrap_or("");
            match path
                .strip_prefix("/redirect/")
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(i) if i == last => http_answer(
                    "307 Temporary Redirect",
                    &[(
                        "location",
                        &format!("http://127.0.0.1:{}/ok", p.get().unwrap()),
                    )],
                ),
                Some(i) if i < last => {
                    http_answer("307 Temporary Redirect", &[("location", &redirects[i])])
                }
                _ if path == "/ok" => http_answer("200 OK", &[]),
                _ => http_answer("404 Not Found", &[]),
            }
        })
        .await;
        port.set(r.port).unwrap();
        r
    };
    let r = receiver.port;

    let mut allowed = vec![format!("127.0.0.1:{r}"), format!("localhost:{r}")];
    allowed.extend(names.iter().map(|n| format!("{n}:{r}")));
    let _relay = start_guard_relay(
        &world,
        &allowed,
        &[],
        &proxy_env(&format!("http://127.0.0.1:{t}")),
        &dir.path().join("relay.log"),
    )
    .await;

    let mut forbidden = vec![
        format!("http://127.0.0.1:{t}/plain"),
        format!("http://2130706433:{t}/decimal"),
        format!("http://0177.0.0.1:{t}/octal"),
        format!("http://0x7f.0.0.1:{t}/hex"),
        format!("http://127.1:{t}/short"),
        format!("http://0.0.0.0:{t}/unspecified"),
        format!("http://0:{t}/zero"),
        format!("http://[::1]:{t}/v6-loopback"),
        format!("http://[::ffff:127.0.0.1]:{t}/v4-mapped"),
        format!("http://[::127.0.0.1]:{t}/v4-compatible"),
        format!("http://localhost:{t}/localhost"),
        format!("http://LocalHost.:{t}/localhost-dot"),
        format!("http://hooks.localhost:{t}/sub-localhost"),
    ];
    forbidden.extend(names.iter().map(|n| format!("http://{n}:{t}/name")));
    forbidden.extend((0..refused_redirects).map(|i| format!("http://127.0.0.1:{r}/redirect/{i}")));
    // The allowed host by name, redirecting to itself on the listener's port.
    forbidden.push(format!("http://localhost:{r}/redirect/1"));
    for (i, n) in names.iter().enumerate() {
        forbidden.push(format!("http://{n}:{r}/redirect/{}", 5 + i));
    }
    let delivered = [
        format!("http://127.0.0.1:{r}/ok"),
        format!("http://localhost:{r}/redirect/{refused_redirects}"),
    ];
    // Public, so allowed, but unresolvable here: it fails (and is dead-lettered after one retry)
    // without reaching anything, unless the relay hands it to HTTPS_PROXY.
    let unresolvable = "https://receiver.example/hook".to_string();

    let urls: Vec<&String> = forbidden
        .iter()
        .chain(&delivered)
        .chain(std::iter::once(&unresolvable))
        .collect();
    let dead = relay_all(&world, &urls, forbidden.len() + 1).await;
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    assert!(
        trap.seen().is_empty(),
        "the loopback listener was reached: {:#?}\nrelay log:\n{log}",
        trap.seen()
    );
    for url in &forbidden {
        let (_, why) = dead
            .iter()
            .find(|(t, _)| t == url)
            .unwrap_or_else(|| panic!("{url} not dead-lettered: {dead:#?}\nrelay log:\n{log}"));
        assert!(why.contains("refused"), "{url}: {why}");
    }
    let (_, why) = dead
        .iter()
        .find(|(t, _)| *t == unresolvable)
        .unwrap_or_else(|| panic!("{unresolvable} not dead-lettered: {dead:#?}"));
    assert!(!why.contains("refused"), "{why}");
    assert_eq!(dead.len(), forbidden.len() + 1, "{dead:#?}");
    // The allowed receiver: /ok twice (directly and through the allowed redirect), each redirect
    // asked for once, nothing else.
    let seen = receiver.seen();
    let oks = seen.iter().filter(|l| l.starts_with("POST /ok ")).count();
    assert_eq!(oks, 2, "{seen:#?}\nrelay log:\n{log}");
    let redirects_asked = urls.iter().filter(|u| u.contains("/redirect/")).count();
    assert_eq!(seen.len(), 2 + redirects_asked, "{seen:#?}");
    assert!(
        seen.iter()
            .all(|l| l.starts_with("POST /ok ") || l.starts_with("POST /redirect/")),
        "{seen:#?}"
    );
    assert!(log.contains("ignores proxy variables"), "{log}");
    delete_webhook_queues(&world, 1).await;
    world.cleanup().await;
}

/// `--egress-proxy`: every delivery but those to allowed receivers goes to the proxy (CONNECT for
/// https, absolute-form requests for http, redirects included), named here by `localhost`; the
/// guard still refuses forbidden literal addresses, localhost names and redirects before anything
/// is sent; `HTTPS_PROXY` (a loopback trap) is not used. What the relay does not guard in this
/// mode, and the proxy must: a name that resolves to an internal address at the proxy (here a
/// loopback name from /etc/hosts, handed to the proxy as it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_egress_proxy_carries_all_but_allowed_receivers() {
    let _g = serial().await;
    let world = World::new("egress").await;
    let dir = tempfile::tempdir().unwrap();
    let trap = Listener::start(|_| http_answer("200 OK", &[])).await;
    let t = trap.port;
    // A proxy that denies everything, as an egress proxy does for destinations it refuses.
    let proxy = Listener::start(|_| http_answer("403 Forbidden", &[])).await;
    let receiver = redirecting_receiver(vec![
        format!("http://127.0.0.1:{t}/stolen"),
        "http://receiver.example/redirected".into(),
    ])
    .await;
    let r = receiver.port;
    let names = loopback_names();
    let _relay = start_guard_relay(
        &world,
        &[format!("127.0.0.1:{r}")],
        &[
            "--egress-proxy".into(),
            format!("http://localhost:{}", proxy.port),
        ],
        &proxy_env(&format!("http://127.0.0.1:{t}")),
        &dir.path().join("relay.log"),
    )
    .await;

    let forbidden = [
        format!("http://127.0.0.1:{t}/plain"),
        format!("http://2130706433:{t}/decimal"),
        format!("http://[::ffff:127.0.0.1]:{t}/v4-mapped"),
        format!("http://localhost:{t}/localhost"),
        format!("http://127.0.0.1:{r}/redirect/0"),
    ];
    let connect = "https://receiver.example/hook".to_string();
    let redirected = format!("http://127.0.0.1:{r}/redirect/1");
    let handed: Vec<String> = names
        .iter()
        .map(|n| format!("http://{n}:{t}/name"))
        .collect();
    let ok = format!("http://127.0.0.1:{r}/ok");
    let urls: Vec<&String> = forbidden
        .iter()
        .chain([&connect, &redirected, &ok])
        .chain(&handed)
        .collect();
    // The https one fails twice at the proxy (CONNECT refused, retried once); the others answer
    // 403 through it (permanent).
    let expected_dead = forbidden.len() + 2 + handed.len();
    let dead = relay_all(&world, &urls, expected_dead).await;
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    assert!(
        trap.seen().is_empty(),
        "the loopback listener was reached: {:#?}\nrelay log:\n{log}",
        trap.seen()
    );
    for url in &forbidden {
        let (_, why) = dead
            .iter()
            .find(|(t, _)| t == url)
            .unwrap_or_else(|| panic!("{url} not dead-lettered: {dead:#?}\nrelay log:\n{log}"));
        assert!(why.contains("refused"), "{url}: {why}");
    }
    assert_eq!(dead.len(), expected_dead, "{dead:#?}\nrelay log:\n{log}");
    let mut proxied = proxy.seen();
    proxied.sort();
    let mut expected = vec![
        "CONNECT receiver.example:443 HTTP/1.1".to_string(),
        "CONNECT receiver.example:443 HTTP/1.1".to_string(),
        "POST http://receiver.example/redirected HTTP/1.1".to_string(),
    ];
    expected.extend(
        names
            .iter()
            .map(|n| format!("POST http://{n}:{t}/name HTTP/1.1")),
    );
    expected.sort();
    assert_eq!(proxied, expected, "relay log:\n{log}");
    let mut direct = receiver.seen();
    direct.sort();
    assert_eq!(
        direct,
        [
            "POST /ok HTTP/1.1",
            "POST /redirect/0 HTTP/1.1",
            "POST /redirect/1 HTTP/1.1"
        ]
    );
    assert!(!log.contains("ignores proxy variables"), "{log}");
    delete_webhook_queues(&world, 1).await;
    world.cleanup().await;
}
