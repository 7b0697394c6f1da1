//! Who gets an event and with which secrets: the receivers file, and the routing of one event to
//! its [`Target`]s. Pure: no broker, no HTTP, no state store.
//!
//! A **configured receiver** (`--receivers receivers.toml`) has an id, a URL, one or more secrets
//! of its own and an optional event filter:
//!
//! ```toml
//! [[receiver]]
//! id = "acme"                                  # what jobs name: "webhook": {"receiver": "acme"}
//! url = "https://hooks.acme.example/t2i/"      # where it is POSTed, and the URLs it owns
//! secrets = ["whsec_..."]                      # every one signs (rotation: add, hand out, remove)
//! secrets_env = "ACME_WEBHOOK_SECRETS"         # and/or whsec_ values from this variable
//! events = ["job.succeeded", "job.failed"]     # default: the job's own filter, else terminal ones
//! all_jobs = false                             # true: every job's events, whatever the job names
//! ```
//!
//! A job names a receiver by id (`webhook.receiver`), optionally with a `webhook.url` under the
//! receiver's URL (a per-job path). A job that names only a `webhook.url` is delivered to the
//! receiver that owns the URL (the longest configured URL it is under, on a path-segment
//! boundary), signed with that receiver's secrets; a URL no receiver owns is an **ad-hoc
//! receiver**, signed with its per-URL secret derived from the relay's URL key
//! ([`Secret::derive`]), and dead-lettered when the relay has none. Either way one URL's signing
//! key is known only to the relay and to that URL's owner, so no receiver can forge events for
//! another, and naming a URL in a job gives its producer no signing power.

use std::collections::HashSet;

use reqwest::Url;
use serde::Deserialize;

use super::sign::{Secret, Secrets};
use crate::events::{CloudEvent, EventKind};

/// Longest receiver id, and its alphabet: the id is part of the state store's object keys and of
/// AMQP headers, so it stays short and path-safe.
const MAX_ID_LEN: usize = 64;

/// A receiver id: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` (never a hidden or `..` path).
pub fn is_receiver_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiversFile {
    #[serde(default)]
    receiver: Vec<ReceiverEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiverEntry {
    id: String,
    url: String,
    #[serde(default)]
    secrets: Vec<String>,
    secrets_env: Option<String>,
    events: Option<Vec<String>>,
    #[serde(default)]
    all_jobs: bool,
}

/// One configured receiver.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub id: String,
    /// Where its events go, and the prefix of the job URLs it owns.
    pub url: Url,
    pub secrets: Secrets,
    /// Events it takes; `None`: whatever the job asks for (terminal ones for `all_jobs`).
    events: Option<Vec<EventKind>>,
    /// Gets every job's events (the static endpoint of a deployment).
    all_jobs: bool,
}

impl Receiver {
    /// Whether `url` is this receiver's URL or under it. The comparison is on the URLs as the
    /// parser writes them (scheme and host lowercased, default port dropped, dot segments
    /// resolved), and a prefix that does not end in `/` only matches up to a `/` or `?`, so
    /// `https://a.example/t2i` owns `/t2i/jobs/1` but not `/t2i-other`.
    pub fn owns(&self, url: &Url) -> bool {
        let (base, u) = (self.url.as_str(), url.as_str());
        match u.strip_prefix(base) {
            Some(rest) => base.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
            None => false,
        }
    }

    fn takes(&self, kind: EventKind) -> bool {
        self.events.as_ref().is_none_or(|e| e.contains(&kind))
    }
}

/// One delivery to make: the URL, and the configured receiver it is for (`None`: an ad-hoc URL,
/// or a URL whose owner is looked up when it is signed). Retry and dead-letter copies carry both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub url: String,
    pub receiver: Option<String>,
}

/// What signs a delivery and what a `410 Gone` disables.
#[derive(Debug, Clone, PartialEq)]
pub struct Signer {
    pub secrets: Secrets,
    /// The receiver id, or the URL of an ad-hoc receiver: the name `t2i webhooks enable` takes.
    pub name: String,
    /// `name` is a configured receiver's id.
    pub configured: bool,
}

/// The configured receivers, with the URL keys that sign ad-hoc URLs.
#[derive(Debug, Clone, Default)]
pub struct Receivers {
    list: Vec<Receiver>,
    url_keys: Vec<Secret>,
}

impl Receivers {
    /// Parses a receivers file (TOML); `env` reads the variables that `secrets_env` names.
    /// Every receiver needs at least one secret; ids and URLs must be unique.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let file: ReceiversFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut list = Vec::new();
        let (mut ids, mut urls) = (HashSet::new(), HashSet::new());
        for e in file.receiver {
            let id = e.id;
            if !is_receiver_id(&id) {
                return Err(format!(
                    "receiver {id:?}: an id is 1 to {MAX_ID_LEN} of [A-Za-z0-9._-], not starting with '.'"
                ));
            }
            let url = Url::parse(&e.url).map_err(|err| format!("receiver {id}: url: {err}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.fragment().is_some() {
                return Err(format!(
                    "receiver {id}: url must be http(s) without a #fragment"
                ));
            }
            let mut secrets = Vec::new();
            for s in &e.secrets {
                secrets.push(Secret::parse(s).map_err(|err| format!("receiver {id}: {err}"))?);
            }
            if let Some(var) = &e.secrets_env {
                let value = env(var)
                    .ok_or_else(|| format!("receiver {id}: secrets_env {var} is not set"))?;
                secrets.extend(
                    Secrets::parse_list(&value)
                        .map_err(|err| format!("receiver {id}: {var}: {err}"))?,
                );
            }
            let secrets = Secrets::new(secrets)
                .ok_or_else(|| format!("receiver {id}: no secrets (secrets or secrets_env)"))?;
            let events = match e.events {
                None => None,
                Some(names) => Some(
                    names
                        .iter()
                        .map(|n| parse_relayed(n).map_err(|err| format!("receiver {id}: {err}")))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if !ids.insert(id.clone()) {
                return Err(format!("receiver {id}: the id is used twice"));
            }
            if !urls.insert(url.to_string()) {
                return Err(format!("receiver {id}: {url} is another receiver's url"));
            }
            list.push(Receiver {
                id,
                url,
                secrets,
                events,
                all_jobs: e.all_jobs,
            });
        }
        Ok(Self {
            list,
            url_keys: Vec::new(),
        })
    }

    /// Ad-hoc URLs are signed with their per-URL secret under each of `keys` (several while the
    /// URL key is rotated); without keys they are not delivered.
    pub fn with_url_keys(mut self, keys: Vec<Secret>) -> Self {
        self.url_keys = keys;
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = &Receiver> {
        self.list.iter()
    }

    pub fn by_id(&self, id: &str) -> Option<&Receiver> {
        self.list.iter().find(|r| r.id == id)
    }

    /// The receiver that owns `url`: the longest configured URL it is under.
    pub fn owner_of(&self, url: &Url) -> Option<&Receiver> {
        self.list
            .iter()
            .filter(|r| r.owns(url))
            .max_by_key(|r| r.url.as_str().len())
    }

    /// Who signs a delivery to `target`, or why it cannot be delivered (dead-lettered with that
    /// reason). Looked up on every attempt, so a rotated secret applies to retries too.
    pub fn signer(&self, target: &Target) -> Result<Signer, String> {
        let url = Url::parse(&target.url).ok();
        if let Some(id) = &target.receiver {
            let r = self
                .by_id(id)
                .ok_or_else(|| format!("no receiver {id:?} is configured"))?;
            return match url {
                Some(u) if r.owns(&u) => Ok(Signer {
                    secrets: r.secrets.clone(),
                    name: r.id.clone(),
                    configured: true,
                }),
                _ => Err(format!(
                    "{} is not under receiver {id}'s url {}",
                    target.url, r.url
                )),
            };
        }
        let url = url.ok_or_else(|| format!("bad URL {}", target.url))?;
        if let Some(r) = self.owner_of(&url) {
            return Ok(Signer {
                secrets: r.secrets.clone(),
                name: r.id.clone(),
                configured: true,
            });
        }
        let derived = self.url_keys.iter().map(|k| k.derive(&url)).collect();
        match Secrets::new(derived) {
            Some(secrets) => Ok(Signer {
                secrets,
                name: url.to_string(),
                configured: false,
            }),
            None => Err(format!(
                "no receiver owns {url} and the relay has no --url-key for ad-hoc URLs"
            )),
        }
    }

    /// The deliveries of `event`'s first attempt: the job's webhook (if its filter and its
    /// receiver's filter take the event), every `all_jobs` receiver that takes it, and the
    /// `endpoints` (ad-hoc URLs) when `endpoint_events` has it. Each target once.
    pub fn targets(
        &self,
        event: &CloudEvent,
        endpoints: &[Url],
        endpoint_events: &[EventKind],
    ) -> Vec<Target> {
        let Some(kind) = EventKind::parse(&event.kind) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(t) = self.job_target(event, kind) {
            out.push(t);
        }
        for r in self.list.iter().filter(|r| r.all_jobs) {
            let takes = match &r.events {
                Some(e) => e.contains(&kind),
                None => EventKind::TERMINAL.contains(&kind),
            };
            if takes {
                out.push(Target {
                    url: r.url.to_string(),
                    receiver: Some(r.id.clone()),
                });
            }
        }
        if endpoint_events.contains(&kind) {
            out.extend(endpoints.iter().map(|u| Target {
                url: u.to_string(),
                receiver: None,
            }));
        }
        let mut seen = HashSet::new();
        out.retain(|t| seen.insert(t.clone()));
        out
    }

    /// The job's own webhook (`params.webhook` of the event), if it wants `kind`.
    fn job_target(&self, event: &CloudEvent, kind: EventKind) -> Option<Target> {
        let hook = event.data.params.as_ref()?.get("webhook")?;
        let wants = match hook.get("events").and_then(|e| e.as_array()) {
            Some(list) => list.iter().any(|e| e.as_str() == Some(kind.routing_key())),
            None => EventKind::TERMINAL.contains(&kind),
        };
        let url = hook.get("url").and_then(|u| u.as_str());
        let receiver = hook.get("receiver").and_then(|r| r.as_str());
        // The receiver's own filter narrows what the job asks for.
        let owner = match (receiver, url) {
            (Some(id), _) => self.by_id(id),
            (None, Some(u)) => Url::parse(u).ok().and_then(|u| self.owner_of(&u)),
            (None, None) => None,
        };
        if !wants || owner.is_some_and(|r| !r.takes(kind)) {
            return None;
        }
        let url = match (url, receiver) {
            (Some(u), _) => u.to_string(),
            // An unknown receiver still gets a copy in the dead letters, under its name.
            (None, Some(id)) => {
                owner.map_or_else(|| format!("receiver:{id}"), |r| r.url.to_string())
            }
            (None, None) => return None,
        };
        Some(Target {
            url,
            receiver: receiver.map(str::to_string),
        })
    }
}

/// An event type the relay delivers, by its routing key (`job.succeeded`).
pub fn parse_relayed(name: &str) -> Result<EventKind, String> {
    match EventKind::parse(name).filter(|k| EventKind::RELAYED.contains(k)) {
        Some(kind) if kind.routing_key() == name => Ok(kind),
        _ => {
            let relayed: Vec<&str> = EventKind::RELAYED.iter().map(|k| k.routing_key()).collect();
            Err(format!("`{name}` is not one of {}", relayed.join(", ")))
        }
    }
}

#[cfg(test)]
#[path = "receivers_tests.rs"]
mod tests;
