//! `t2i healthcheck URL`: a container `HEALTHCHECK` that needs no curl in the image. One HTTP/1.0
//! GET over a plain TCP connection; exit 0 only on a `200` status line.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cli::HealthcheckArgs;

pub fn run(args: HealthcheckArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_s.max(1));
    let status = probe(&args.url, timeout)?;
    if status != 200 {
        bail!("{} answered HTTP {status}", args.url);
    }
    Ok(())
}

/// The status code `url` answers a GET with.
pub fn probe(url: &str, timeout: Duration) -> Result<u16> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {authority} (host:port expected)"))?
        .next()
        .with_context(|| format!("{url}: {authority} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("{url}: cannot connect"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    stream
        .take(4096)
        .read_to_end(&mut head)
        .with_context(|| format!("{url}: no answer"))?;
    let line = String::from_utf8_lossy(&head);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{url}: not an HTTP answer"))?;
    Ok(status)
}
