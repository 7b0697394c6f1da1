//! SSRF guard for webhook URLs: job messages name the URL, so a hostile one must not make the relay
//! call into the cluster. Refused unless explicitly allowed: plain `http` (HTTPS only by default),
//! and any address that is loopback, private (RFC 1918, IPv6 ULA), link-local (including the cloud
//! metadata address 169.254.169.254 and fd00:ec2::254), CGNAT, unspecified, multicast, broadcast or
//! reserved, including IPv4 addresses embedded in IPv6 (mapped, NAT64). The check runs on the URL's
//! literal host, on every address a host name resolves to (the HTTP client's resolver is this guard,
//! so there is no gap between check and connect), and on every redirect target.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;

#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Accept `http://` URLs.
    pub allow_http: bool,
    /// Accept every address (trusted networks only).
    pub allow_private: bool,
    /// `host:port` pairs accepted whatever their address (e.g. an in-cluster receiver).
    pub allow_hosts: Vec<String>,
}

impl Guard {
    fn host_allowed(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allow_hosts.iter().any(|a| match a.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.trim_start_matches('[').trim_end_matches(']') == host
                    && Some(p.parse::<u16>().ok()) == Some(port)
            }
            _ => a == host,
        })
    }

    /// Checks a URL before a request or a redirect.
    pub fn check_url(&self, url: &Url) -> Result<(), String> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => return Err(format!("refused {url}: plain http is not allowed")),
            s => return Err(format!("refused {url}: scheme {s}")),
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("refused {url}: no host"))?;
        if self.host_allowed(host, url.port_or_known_default()) {
            return Ok(());
        }
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
/// guard accepts (all of them for allowed hosts); none left is an error.
pub struct GuardedResolver(pub Arc<Guard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let trusted = guard
                .allow_hosts
                .iter()
                .any(|a| a == &host || a.rsplit_once(':').is_some_and(|(h, _)| h == host));
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
        let g = Guard {
            allow_http: true,
            allow_private: false,
            allow_hosts: vec!["127.0.0.1:8080".into()],
        };
        assert!(g.check_url(&url("http://127.0.0.1:8080/hook")).is_ok());
        assert!(g.check_url(&url("http://127.0.0.1:8081/hook")).is_err());
        let open = Guard {
            allow_private: true,
            ..Guard::default()
        };
        assert!(open.check_url(&url("https://10.0.0.1/")).is_ok());
    }
}
