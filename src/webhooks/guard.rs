//! SSRF guard for webhook URLs: job messages name the URL, so a hostile one must not make the relay
//! call into the cluster. Refused unless explicitly allowed: plain `http` (HTTPS only by default),
//! and any address that is loopback, private (RFC 1918, IPv6 ULA), link-local (including the cloud
//! metadata address 169.254.169.254 and fd00:ec2::254), CGNAT, unspecified, multicast, broadcast or
//! reserved, including IPv4 addresses embedded in IPv6 (mapped, NAT64). The check runs on the URL's
//! literal host, on every address a host name resolves to (the HTTP client's resolver is this guard,
//! so there is no gap between check and connect), and on every redirect target.

//! SSRF guard for webhook URLs: job messages name the URL, so a hostile one must not make the relay
//! call into the cluster. Refused unless explicitly allowed: plain `http` (HTTPS only by default),
//! and any address that is loopback, private (RFC 1918, IPv6 ULA), link-local (including the cloud
//! metadata address 169.254.169.254 and fd00:ec2::254), CGNAT, unspecified, multicast, broadcast or
//! reserved, including IPv4 addresses embedded in IPv6 (mapped, NAT64). The check runs on the URL's
//! literal host, on every address a host name resolves to (the HTTP client's resolver is this guard,
//! so there is no gap between check and connect), and on every redirect target.
//!
//! An `--allow-host host:port` entry covers that host on that port only. The resolver only sees a
//! name, never a port, so the relay has two clients: one whose resolver accepts any address for the
//! allowed names, used only for a URL whose host and port are an entry exactly, and which follows
//! redirects only to such URLs or to hosts that are not allowed names; and one whose resolver checks
//! every address, for everything else, which gives no allowance to redirect targets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

/// One `--allow-host` entry, its host as the URL parser writes it (lowercase name, canonical
/// address, IPv6 in brackets), so that it compares with `Url::host_str`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    host: String,
    port: u16,
}

impl Allowed {
    fn parse(entry: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "--allow-host {entry}: expected host:port, e.g. hooks.internal:8443 or [fd00::1]:8443"
            )
        };
        let port = entry
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .filter(|&p| p != 0)
            .ok_or_else(bad)?;
        let url = Url::parse(&format!("http://{entry}/")).map_err(|_| bad())?;
        let plain = url.username().is_empty()
            && url.password().is_none()
            && url.path() == "/"
            && url.query().is_none()
            && url.fragment().is_none();
        let host = url.host_str().filter(|_| plain).ok_or_else(bad)?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Accept `http://` URLs.
    pub allow_http: bool,
    /// Accept every address (trusted networks only).
    pub allow_private: bool,
    /// `host:port` pairs accepted whatever their address (e.g. an in-cluster receiver).
    allowed: Vec<Allowed>,
}

impl Guard {
    /// `allow_hosts`: `--allow-host` entries, each `host:port` (the port is required).
    pub fn new(
        allow_http: bool,
        allow_private: bool,
        allow_hosts: &[String],
    ) -> Result<Self, String> {
        let allowed = allow_hosts
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(Allowed::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allow_http,
            allow_private,
            allowed,
        })
    }

    /// The URL's host and port (the scheme's default if none is written) are an `--allow-host`
    /// entry, exactly.
    pub fn allows(&self, url: &Url) -> bool {
        match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => self
                .allowed
                .iter()
                .any(|a| a.host == host && a.port == port),
            _ => false,
        }
    }

    /// Host names (not addresses) that have an allowance, on some port.
    fn allowed_names(&self) -> impl Iterator<Item = &str> {
        self.allowed
            .iter()
            .map(|a| a.host.as_str())
            .filter(|h| !is_ip_literal(h))
    }

    /// Checks a URL before a request: the scheme, then the literal address unless the URL is
    /// allowed (a host name's addresses are checked by the resolver, when connecting).
    pub fn check_url(&self, url: &Url) -> Result<(), String> {
        self.check_scheme(url)?;
        if self.allows(url) {
            return Ok(());
        }
        self.check_unallowed(url)
    }

    /// Checks a redirect target. `trusted_client`: the request is on the client whose resolver
    /// accepts any address for allowed names (it began at an allowed URL); there an allowed URL is
    /// followed, and an allowed name on another port is refused, since that resolver would let it
    /// through. The other client gives redirect targets no allowance at all.
    pub fn check_redirect(&self, url: &Url, trusted_client: bool) -> Result<(), String> {
        self.check_scheme(url)?;
        if trusted_client {
            if self.allows(url) {
                return Ok(());
            }
            if let Some(host) = url.host_str()
                && !self.allow_private
                && self.allowed_names().any(|n| n == host)
            {
                return Err(format!(
                    "refused {url}: {host} is allowed on its --allow-host port only"
                ));
            }
        }
        self.check_unallowed(url)
    }

    fn check_scheme(&self, url: &Url) -> Result<(), String> {
        match url.scheme() {
            "https" => Ok(()),
            "http" if self.allow_http => Ok(()),
            "http" => Err(format!("refused {url}: plain http is not allowed")),
            s => Err(format!("refused {url}: scheme {s}")),
        }
    }

    /// The checks for a URL without an allowance: it has a host, and a literal address must be
    /// one the guard accepts.
    fn check_unallowed(&self, url: &Url) -> Result<(), String> {
        let host = url
            .host_str()
            .ok_or_else(|| format!("refused {url}: no host"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(ip)
                .map_err(|why| format!("refused {url}: {why}"))?;
        }
        Ok(())
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.allow_private {
            return Ok(());
        }
        match forbidden(ip) {
            Some(why) => Err(format!("{ip} is {why}")),
            None => Ok(()),
        }
    }
}

/// Why an address must not be called, if it must not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let v4 = Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
                return forbidden_v4(v4);
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("a private (unique local) address")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1) {
                Some("loopback")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata lives here)")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() {
        Some("broadcast or multicast")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (CGNAT) address space")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking space")
    } else if o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// The HTTP client's DNS resolver: resolves with the system resolver, then keeps only addresses the
/// guard accepts (all of them for the `trusted` names); none left is an error.
pub struct GuardedResolver {
    guard: Arc<Guard>,
    trusted: Vec<String>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let trusted = self.trusted.iter().any(|t| t == name.as_str());
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut why = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| trusted || guard.check_ip(a.ip()).map_err(|e| why = Some(e)).is_ok())
                .collect();
            if ok.is_empty() {
                let msg = format!(
                    "refused {host}: {}",
                    why.unwrap_or_else(|| "resolves to no address".into())
                );
                return Err(msg.into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Parses `--egress-proxy`: an `http` or `https` proxy URL, credentials allowed, no path.
///
/// With a proxy, the proxy resolves and connects to receivers, so what the relay guards is the URL:
/// before the request and on every redirect its scheme, its literal address (in every spelling
/// the URL parser accepts) and its allowance are checked as without a proxy. What the relay cannot
/// see is what a receiver's name resolves to at the proxy: the proxy must refuse internal
/// destinations itself. Allowed receivers are called directly, through the trusted client.
fn parse_egress_proxy(url: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("--egress-proxy: {why}");
    let parsed = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("an http:// or https:// proxy URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a proxy URL has no path"));
    }
    Ok(parsed)
}

/// `--egress-proxy`, parsed and logged (without its credentials); without one, a warning when
/// proxy variables that the relay ignores are set.
pub fn egress_proxy(arg: Option<&str>) -> Result<Option<Url>, String> {
    let Some(arg) = arg.filter(|a| !a.is_empty()) else {
        let set: Vec<&str> = PROXY_VARIABLES
            .into_iter()
            .filter(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
            .collect();
        if !set.is_empty() {
            tracing::warn!(ignored = %set.join(","), "the webhook relay ignores proxy variables; use --egress-proxy");
        }
        return Ok(None);
    };
    let proxy = parse_egress_proxy(arg)?;
    let port = proxy.port_or_known_default().unwrap_or_default();
    tracing::info!(
        proxy = %format!("{}://{}:{port}", proxy.scheme(), proxy.host_str().unwrap_or_default()),
        "webhooks go through the egress proxy, to --allow-host receivers directly"
    );
    Ok(Some(proxy))
}

const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The relay's HTTP client: the two clients of the module comment, each with its own connection
/// pool, so a connection made under an allowance is never reused for another URL.
pub struct WebhookClient {
    guard: Arc<Guard>,
    trusted: reqwest::Client,
    strict: reqwest::Client,
}

impl WebhookClient {
    /// `egress_proxy`: where every request but one to an allowed URL goes (see
    /// [`parse_egress_proxy`]); without it every request goes direct, whatever `HTTP_PROXY`,
    /// `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` say.
    pub fn new(
        guard: Arc<Guard>,
        timeout: Duration,
        egress_proxy: Option<Url>,
    ) -> reqwest::Result<Self> {
        // The proxy's own name is resolved by the same resolver, and the operator chose it.
        let proxy_name = egress_proxy
            .as_ref()
            .and_then(|p| p.host_str())
            .filter(|h| !is_ip_literal(h))
            .map(String::from);
        let build = |trusted: bool| {
            let mut names: Vec<String> = proxy_name.iter().cloned().collect();
            if trusted {
                names.extend(guard.allowed_names().map(String::from));
            }
            let redirect_guard = guard.clone();
            let mut builder = reqwest::Client::builder()
                .timeout(timeout)
                .no_proxy()
                .dns_resolver(Arc::new(GuardedResolver {
                    guard: guard.clone(),
                    trusted: names,
                }))
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= 5 {
                        return attempt.error("too many redirects");
                    }
                    match redirect_guard.check_redirect(attempt.url(), trusted) {
                        Ok(()) => attempt.follow(),
                        Err(why) => attempt.error(why),
                    }
                }));
            if let Some(proxy) = &egress_proxy {
                let (guard, proxy) = (guard.clone(), proxy.clone());
                builder = builder.proxy(reqwest::Proxy::custom(move |url| {
                    (!guard.allows(url)).then(|| proxy.clone())
                }));
            }
            builder.build()
        };
        Ok(Self {
            trusted: build(true)?,
            strict: build(false)?,
            guard,
        })
    }

    /// A POST to `url` (which [`Guard::check_url`] has accepted) on the client its allowance calls
    /// for.
    pub fn post(&self, url: Url) -> reqwest::RequestBuilder {
        match self.guard.allows(&url) {
            true => self.trusted.post(url),
            false => self.strict.post(url),
        }
    }
}

#[cfg(test)]
mod tests {
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
        let client = WebhookClient::new(g.clone(), Duration::from_secs(5), None).unwrap();
        let send = |u: String| {
            let u = url(&u);
            assert!(g.check_url(&u).is_ok(), "{u}");
            client.post(u).body("{}").send()
        };
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
}
