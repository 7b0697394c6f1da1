//! SSRF guard for webhook URLs: job messages name the URL, so a hostile one must not make the relay
//! call into the cluster. Refused unless explicitly allowed: plain `http` (HTTPS only by default),
//! and any address that is not public unicast: loopback, private (RFC 1918, IPv6 ULA), link-local
//! (including the cloud metadata address 169.254.169.254 and fd00:ec2::254), CGNAT, 0.0.0.0/8,
//! multicast, broadcast, documentation, benchmarking and reserved space, IPv6 outside 2000::/3, and
//! IPv4 addresses embedded in IPv6 (mapped, translated, compatible, NAT64, 6to4) judged as IPv4;
//! also `localhost` and names under it. The check runs on the URL's literal host (the URL parser
//! has already turned decimal, octal, hex and short IPv4 forms into dotted quads), on every address
//! a host name resolves to (the HTTP client's resolver is this guard, so there is no gap between
//! check and connect), and on every redirect target.
//!
//! An `--allow-host host:port` entry covers that host on that port only. The resolver only sees a
//! name, never a port, so the relay has two clients: one whose resolver accepts any address for the
//! allowed names, used only for a URL whose host and port are an entry exactly, and which follows
//! redirects only to such URLs or to hosts that are not allowed names; and one whose resolver checks
//! every address, for everything else, which gives no allowance to redirect targets.
//!
//! Both clients ignore `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` (through a proxy the
//! resolver would never see the receiver's name); `--egress-proxy` names a proxy explicitly, and
//! `parse_egress_proxy` says what is guarded then.

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

    /// The checks for a URL without an allowance: it has a host, a literal address must be one
    /// the guard accepts, and a name must not be a localhost name.
    fn check_unallowed(&self, url: &Url) -> Result<(), String> {
        let host = url
            .host_str()
            .ok_or_else(|| format!("refused {url}: no host"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(ip)
                .map_err(|why| format!("refused {url}: {why}"))?;
        } else if !self.allow_private && is_localhost_name(host) {
            return Err(format!("refused {url}: {host} is a localhost name"));
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

/// Why an address must not be called, if it must not: everything but public unicast, after the
/// IANA special-purpose registries (RFC 6890 and successors).
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    // Forms that carry an IPv4 address are judged by it: mapped (::ffff:0:0/96), translated
    // (::ffff:0:0:0/96, RFC 2765), NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return forbidden_v4(v4(s[1], s[2]));
    }
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("a private (unique local) address")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local (deprecated)")
    } else if s[..6] == [0; 6] {
        Some("IPv4-compatible (deprecated)")
    } else if s[..3] == [0x64, 0xff9b, 1] {
        Some("local-use NAT64")
    } else if s[..4] == [0x100, 0, 0, 0] {
        Some("discard-only")
    } else if (s[0] & 0xe000) != 0x2000 {
        Some("reserved (outside global unicast 2000::/3)")
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000) {
        Some("documentation space")
    } else if s[0] == 0x2001 && s[1] < 0x200 {
        Some("IETF protocol assignments (Teredo, ORCHID, ...)")
    } else {
        None
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
    } else if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_broadcast() || ip.is_multicast() {
        Some("broadcast or multicast")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (CGNAT) address space")
    } else if o[..3] == [192, 0, 0] {
        Some("IETF protocol assignments")
    } else if o[..3] == [192, 0, 2] || o[..3] == [198, 51, 100] || o[..3] == [203, 0, 113] {
        Some("documentation space")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking space")
    } else if o[..3] == [192, 88, 99] {
        Some("6to4 relay anycast (deprecated)")
    } else if o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// `localhost` and the names under it, which resolve to loopback (RFC 6761): refused before any
/// lookup, which matters where the relay does not resolve (through an egress proxy).
fn is_localhost_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host == "localhost" || host.ends_with(".localhost")
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
    /// `parse_egress_proxy`); without it every request goes direct, whatever `HTTP_PROXY`,
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
}
