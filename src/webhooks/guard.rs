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

/// The guard's refusal inside a request: every address a name resolves to (the resolver), or a
/// redirect target (the redirect policy). An error of its own type, so that a caller can tell it
/// from a connection that failed ([`is_refusal`]).
#[derive(Debug)]
pub struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// Whether a request failed because the guard refused where it led (not because a server was down).
pub fn is_refusal(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<Refusal>() {
            return true;
        }
        source = err.source();
    }
    false
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
                return Err(Box::new(Refusal(msg)) as Box<dyn std::error::Error + Send + Sync>);
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
                        Err(why) => attempt.error(Refusal(why)),
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

    /// A GET of `url` under the same policy (the workers' LoRA downloads, `crate::adapters`).
    pub fn get(&self, url: Url) -> reqwest::RequestBuilder {
        match self.guard.allows(&url) {
            true => self.trusted.get(url),
            false => self.strict.get(url),
        }
    }
}

#[cfg(test)]
#[path = "guard_tests.rs"]
mod tests;
