//! The guard's refusals and allowances: every reserved range, every spelling of loopback, exact
//! `host:port` allowances, redirects and the egress proxy.

use super::*;

fn url(s: &str) -> Url {
    Url::parse(s).unwrap()
}

#[test]
fn private_and_metadata_addresses_are_refused() {
    let g = Guard::default();
    for bad in [
        "https://127.0.0.1/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.1.2.3/",
        "https://172.20.0.1/",
        "https://192.168.1.1/",
        "https://100.64.0.1/",
        "https://0.0.0.0/",
        "https://[::1]/",
        "https://[fd00:ec2::254]/",
        "https://[fe80::1]/",
        "https://[::ffff:127.0.0.1]/",
        "https://[64:ff9b::a9fe:a9fe]/",
        "http://93.184.215.14/",
        "ftp://93.184.215.14/",
    ] {
        assert!(g.check_url(&url(bad)).is_err(), "{bad}");
    }
    for good in [
        "https://93.184.215.14/hook",
        "https://example.com/hook",
        "https://[2606:4700::1]/",
    ] {
        assert!(g.check_url(&url(good)).is_ok(), "{good}");
    }
}

#[test]
fn explicit_allowances() {
    let g = Guard::new(true, false, &["127.0.0.1:8080".into()]).unwrap();
    assert!(g.check_url(&url("http://127.0.0.1:8080/hook")).is_ok());
    assert!(g.check_url(&url("http://127.0.0.1:8081/hook")).is_err());
    let open = Guard {
        allow_private: true,
        ..Guard::default()
    };
    assert!(open.check_url(&url("https://10.0.0.1/")).is_ok());
}

fn allowing(hosts: &[&str]) -> Guard {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    Guard::new(true, false, &hosts).unwrap()
}

#[test]
fn allow_host_matches_host_and_port_exactly() {
    let g = allowing(&[
        "LocalHost:8080",
        "127.1:9000",
        "[FD00::1]:8443",
        "hooks.internal:443",
    ]);
    for yes in [
        "http://localhost:8080/x",
        "http://127.0.0.1:9000/",
        "https://[fd00::1]:8443/",
        "https://hooks.internal/",
        "http://hooks.internal:443/",
    ] {
        assert!(g.allows(&url(yes)), "{yes}");
        assert!(g.check_url(&url(yes)).is_ok(), "{yes}");
    }
    for no in [
        "http://localhost:8081/",
        "http://localhost/",
        "http://127.0.0.1:9001/",
        "https://[fd00::1]/",
        "http://hooks.internal/",
        "https://hooks.internal:8443/",
        "https://sub.hooks.internal/",
    ] {
        assert!(!g.allows(&url(no)), "{no}");
    }
    // Literal addresses on another port are refused outright; names are left to the resolver.
    assert!(g.check_url(&url("http://127.0.0.1:9001/")).is_err());
    assert!(g.check_url(&url("https://[fd00::1]/")).is_err());
}

#[test]
fn allow_host_entries_need_a_port() {
    for bad in [
        "hooks.internal",
        "[fd00::1]",
        "fd00::1:8443",
        "hooks.internal:0",
        "hooks.internal:65536",
        "http://hooks.internal:80",
        "hooks.internal:80/path",
        "user@hooks.internal:80",
    ] {
        let err = Guard::new(false, false, &[bad.into()]).unwrap_err();
        assert!(err.contains("expected host:port"), "{bad}: {err}");
    }
    assert!(Guard::new(false, false, &["".into(), " h:1 ".into()]).is_ok());
}

#[test]
fn redirects_get_allowances_only_from_the_trusted_client() {
    let g = allowing(&["localhost:8080", "127.0.0.1:9000"]);
    // From an allowed receiver: other allowed URLs, public hosts; not the allowed name on
    // another port (the trusted resolver would let it through), not private addresses.
    assert!(
        g.check_redirect(&url("http://localhost:8080/b"), true)
            .is_ok()
    );
    assert!(
        g.check_redirect(&url("http://127.0.0.1:9000/"), true)
            .is_ok()
    );
    assert!(g.check_redirect(&url("https://example.com/"), true).is_ok());
    let err = g
        .check_redirect(&url("http://localhost:6379/"), true)
        .unwrap_err();
    assert!(err.contains("refused"), "{err}");
    assert!(
        g.check_redirect(&url("http://127.0.0.1:9001/"), true)
            .is_err()
    );
    // From anywhere else, no allowance.
    assert!(
        g.check_redirect(&url("http://127.0.0.1:9000/"), false)
            .is_err()
    );
    assert!(
        g.check_redirect(&url("https://example.com/"), false)
            .is_ok()
    );
}

#[tokio::test]
async fn only_the_trusted_resolver_accepts_an_allowed_name() {
    use reqwest::dns::Resolve;
    let g = Arc::new(allowing(&["localhost:8080"]));
    let resolver = |trusted: Vec<String>| GuardedResolver {
        guard: g.clone(),
        trusted,
    };
    let name = || "localhost".parse::<reqwest::dns::Name>().unwrap();
    let err = match resolver(Vec::new()).resolve(name()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("localhost resolved on the strict resolver"),
    };
    assert!(err.contains("refused localhost"), "{err}");
    let trusted = resolver(vec!["localhost".into()]);
    let addrs: Vec<SocketAddr> = trusted.resolve(name()).await.unwrap().collect();
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
}

type Seen = Arc<std::sync::Mutex<Vec<String>>>;

/// A loopback HTTP listener: answers `answer(request line)` to one request per connection and
/// records the request line of every connection it accepted.
async fn listener(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> (u16, Seen) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Seen = Default::default();
    let (lines, answer) = (seen.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            let (lines, answer) = (lines.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                lines.lock().unwrap().push(line.clone());
                let _ = conn.write_all(answer(&line).as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (port, seen)
}

fn path(request_line: &str) -> &str {
    request_line.split_whitespace().nth(1).unwrap_or("")
}

fn answer(status: &str, location: Option<String>) -> String {
    let location = location.map_or(String::new(), |l| format!("location: {l}\r\n"));
    format!("HTTP/1.1 {status}\r\n{location}content-length: 0\r\nconnection: close\r\n\r\n")
}

/// The client path the relay uses, against listeners on loopback: `--allow-host localhost:R`
/// reaches R, and neither a URL nor a redirect reaches another port of `localhost`.
#[tokio::test]
async fn an_allowed_name_is_not_reached_on_another_port() {
    let (trap, trapped) = listener(|_| answer("200 OK", None)).await;
    let (receiver, received) = listener(move |line| match path(line) {
        "/redirect" => answer(
            "307 Temporary Redirect",
            Some(format!("http://localhost:{trap}/stolen")),
        ),
        _ => answer("200 OK", None),
    })
    .await;
    let g = Arc::new(allowing(&[&format!("localhost:{receiver}")]));
    let client = WebhookClient::new(g, Duration::from_secs(5), None).unwrap();
    // The client alone: the relay's check_url, which runs first, refuses localhost names anyway.
    let send = |u: String| client.post(url(&u)).body("{}").send();
    let ok = send(format!("http://localhost:{receiver}/hook"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for u in [
        format!("http://localhost:{trap}/direct"),
        format!("http://localhost:{receiver}/redirect"),
    ] {
        let err = send(u.clone()).await.unwrap_err();
        let chain = format!("{:?}", err);
        assert!(chain.contains("refused"), "{u}: {chain}");
    }
    let trapped = trapped.lock().unwrap().clone();
    assert!(
        trapped.is_empty(),
        "the other port was reached: {trapped:?}"
    );
    assert_eq!(received.lock().unwrap().len(), 2);
}

/// With `--egress-proxy`, every URL but an allowed one goes to the proxy (named here by a name
/// that resolves to loopback: the proxy's own address is trusted), allowed receivers are called
/// directly.
#[tokio::test]
async fn an_egress_proxy_carries_all_but_allowed_receivers() {
    let (proxy, proxied) = listener(|_| answer("403 Forbidden", None)).await;
    let (receiver, received) = listener(|_| answer("200 OK", None)).await;
    let g = Arc::new(allowing(&[&format!("127.0.0.1:{receiver}")]));
    let proxy_url = parse_egress_proxy(&format!("http://localhost:{proxy}")).unwrap();
    let client = WebhookClient::new(g, Duration::from_secs(5), Some(proxy_url)).unwrap();
    let ok = client
        .post(url(&format!("http://127.0.0.1:{receiver}/hook")))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        client
            .post(url("https://receiver.example/hook"))
            .send()
            .await
            .is_err()
    );
    let denied = client
        .post(url("http://receiver.example/hook"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(
        *proxied.lock().unwrap(),
        [
            "CONNECT receiver.example:443 HTTP/1.1",
            "POST http://receiver.example/hook HTTP/1.1"
        ]
    );
    assert_eq!(*received.lock().unwrap(), ["POST /hook HTTP/1.1"]);
}

#[test]
fn egress_proxy_urls() {
    for good in [
        "http://egress:3128",
        "https://user:pw@egress.internal:8443/",
    ] {
        assert!(parse_egress_proxy(good).is_ok(), "{good}");
    }
    for bad in [
        "egress:3128",
        "socks5://egress:1080",
        "http://egress:3128/path",
        "http://",
    ] {
        assert!(parse_egress_proxy(bad).is_err(), "{bad}");
    }
}

#[test]
fn reserved_ranges_are_refused() {
    for bad in [
        "0.1.2.3",
        "100.127.255.254",
        "192.0.0.8",
        "192.0.2.1",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "192.88.99.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:10.0.0.1",
        "::ffff:0:127.0.0.1",
        "::ffff:0:169.254.169.254",
        "::127.0.0.1",
        "::8.8.8.8",
        "64:ff9b::10.0.0.1",
        "64:ff9b:1::a00:1",
        "100::1",
        "2001::1",
        "2001:10::1",
        "2001:20::1",
        "2001:db8::1",
        "3fff::1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
        "5f00::1",
        "fc00::1",
        "fec0::1",
        "fe80::1",
        "ff02::1",
        "4000::1",
    ] {
        let ip: IpAddr = bad.parse().unwrap();
        assert!(forbidden(ip).is_some(), "{bad}");
    }
    for good in [
        "1.1.1.1",
        "93.184.215.14",
        "100.128.0.1",
        "192.0.3.1",
        "198.20.0.1",
        "203.0.114.1",
        "2606:4700::1",
        "2a00:1450::1",
        "::ffff:93.184.215.14",
        "64:ff9b::5db8:d70e",
        "2002:5db8:d70e::1",
        "2001:200::1",
    ] {
        let ip: IpAddr = good.parse().unwrap();
        assert_eq!(forbidden(ip), None, "{good}");
    }
}

/// What the URL parser makes of each spelling of a loopback or unspecified address, and that
/// the guard refuses every one of them.
#[test]
fn every_spelling_of_loopback_is_refused() {
    for (spelling, host) in [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("%31%32%37.0.0.1", "127.0.0.1"),
        ("\u{ff11}\u{ff12}\u{ff17}.0.0.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("[::ffff:127.0.0.1]", "[::ffff:7f00:1]"),
        ("[0:0:0:0:0:ffff:7f00:1]", "[::ffff:7f00:1]"),
        ("[::ffff:0:127.0.0.1]", "[::ffff:0:7f00:1]"),
        ("[::127.0.0.1]", "[::7f00:1]"),
        ("[64:ff9b::127.0.0.1]", "[64:ff9b::7f00:1]"),
        ("[2002:7f00:1::1]", "[2002:7f00:1::1]"),
        ("[::]", "[::]"),
        ("[0::1]", "[::1]"),
        ("LocalHost", "localhost"),
        ("localhost.", "localhost."),
        ("hooks.localhost", "hooks.localhost"),
        ("%6c%6fcalhost", "localhost"),
    ] {
        let u = url(&format!("https://{spelling}:8443/x"));
        assert_eq!(u.host_str(), Some(host), "{spelling}");
        let err = Guard::default().check_url(&u).unwrap_err();
        assert!(err.starts_with("refused"), "{spelling}: {err}");
    }
    // Explicit allowances still cover them, and --allow-private-networks lets all through.
    let g = allowing(&["localhost:8443"]);
    assert!(g.check_url(&url("http://localhost:8443/")).is_ok());
    assert!(g.check_url(&url("http://localhost:8444/")).is_err());
    let open = Guard::new(true, true, &[]).unwrap();
    assert!(open.check_url(&url("http://localhost:1/")).is_ok());
}
