//! Per-job LoRA adapters: the `loras` field of the contract (docs/architecture.md §2 "Job message").
//! A job lists up to [`MAX_LORAS`] adapters, each a [`LoraSource`] URI and a scale; [`parse_loras`]
//! checks every bound and names the field of the first one broken (`loras[1].scale`).
//!
//! Pure: a URI is checked for its form only. Whether the file exists, may be read (the worker's LoRA
//! folder, its S3 allow-list, the webhooks' SSRF policy for URLs) and is a LoRA that fits the model
//! is decided when a worker fetches and merges it (`crate::adapters`, `crate::pipeline::lora`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Rejection;

/// Most adapters one job may stack. Merging costs one pass over every weight an adapter touches, and
/// every distinct set of adapters is a model variant held in memory: a job asking for dozens would
/// hold the device for its merges alone. A1111 and diffusers set no limit; stacks seen in practice
/// are one to a handful.
pub const MAX_LORAS: usize = 8;

/// Largest `|scale|`. A1111 (`<lora:name:scale>`) and diffusers (`set_adapters(adapter_weights=)`,
/// `fuse_lora(lora_scale=)`) accept any number, negatives included (a negative weight inverts an
/// adapter, as "slider" LoRAs are used); the bound only refuses what is certainly a typo (80 for 0.8).
pub const MAX_LORA_SCALE: f64 = 10.0;

/// Longest `uri`: room for a presigned URL's query string.
pub const MAX_LORA_URI_BYTES: usize = 2048;

/// The file a hub URI without a file name means: what diffusers' `save_lora_weights` writes
/// (`LORA_WEIGHT_NAME_SAFE` in diffusers/loaders/lora_base.py).
pub const DEFAULT_HUB_FILE: &str = "pytorch_lora_weights.safetensors";

/// One adapter as a job asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// Where the safetensors file is: `hf://owner/repo[@revision][/path/file.safetensors]` (a
    /// Hugging Face Hub repo; without a file, `pytorch_lora_weights.safetensors`),
    /// `s3://bucket/key.safetensors` (under a prefix the worker allows), `https://…` (public
    /// addresses only), or `path/file.safetensors` (relative to the worker's LoRA folder).
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Weight of the adapter: W + scale · (alpha / rank) · up · down, as diffusers' `set_adapters`
    /// and A1111's `<lora:name:scale>` [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -10.0, max = 10.0))]
    pub scale: Option<f64>,
}

/// Where an adapter file comes from, parsed from its URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LoraSource {
    /// A file of a Hugging Face Hub model repo.
    Hub {
        repo: String,
        revision: Option<String>,
        file: String,
    },
    S3 {
        bucket: String,
        key: String,
    },
    /// An `http(s)` URL, as written.
    Url(String),
    /// A `/`-separated path relative to the worker's LoRA folder (`--lora-dir`).
    Local(String),
}

/// A checked adapter of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lora {
    pub uri: String,
    pub scale: f64,
    /// SHA-256 of the whole file, set once a worker has the file: reported in events, and part of
    /// the batch key, so that two jobs naming one URI whose content changed never share a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A1111's short hash of the file (image metadata's `Lora hashes`), set with `sha256`.
    #[serde(skip)]
    pub short_hash: Option<String>,
    #[serde(skip)]
    pub source: LoraSource,
}

impl Lora {
    /// The adapter's name in A1111 metadata: its file name without `.safetensors`, with the
    /// characters A1111's `<lora:name:scale>` syntax and `Lora hashes` list use as separators
    /// (`:`, `,`, `<`, `>`) replaced by `_`.
    pub fn name(&self) -> String {
        let path = match &self.source {
            LoraSource::Hub { file, .. } => file.as_str(),
            LoraSource::S3 { key, .. } => key.as_str(),
            LoraSource::Local(path) => path.as_str(),
            LoraSource::Url(url) => url
                .split(['?', '#'])
                .next()
                .unwrap_or(url)
                .trim_end_matches('/'),
        };
        let last = path.rsplit('/').next().unwrap_or(path);
        let stem = strip_suffix_ignore_case(last, ".safetensors").unwrap_or(last);
        let name: String = stem
            .chars()
            .map(|c| match c {
                ':' | ',' | '<' | '>' => '_',
                c if c.is_control() => '_',
                c => c,
            })
            .collect();
        if name.is_empty() { "lora".into() } else { name }
    }

    /// The job field this adapter came from, for rejections (`loras[1].uri`).
    pub fn field(index: usize, member: &str) -> String {
        format!("loras[{index}].{member}")
    }

    /// The adapter as a request again.
    pub fn to_request(&self) -> LoraRequest {
        LoraRequest {
            uri: self.uri.clone(),
            scale: Some(self.scale),
        }
    }
}

fn strip_suffix_ignore_case<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    (s.is_char_boundary(cut) && s[cut..].eq_ignore_ascii_case(suffix)).then(|| &s[..cut])
}

fn is_safetensors_name(path: &str) -> bool {
    strip_suffix_ignore_case(path, ".safetensors").is_some_and(|stem| !stem.ends_with('/'))
}

/// Checks a job's `loras`: at most [`MAX_LORAS`], each URI well-formed and listed once, each scale
/// finite within ±[`MAX_LORA_SCALE`] (absent: 1, diffusers' and A1111's default).
pub fn parse_loras(requests: Vec<LoraRequest>) -> Result<Vec<Lora>, Rejection> {
    if requests.len() > MAX_LORAS {
        return Err(Rejection::new(
            "loras",
            format!("{} adapters", requests.len()),
            format!("at most {MAX_LORAS}"),
        ));
    }
    let mut out: Vec<Lora> = Vec::with_capacity(requests.len());
    for (i, req) in requests.into_iter().enumerate() {
        let source = LoraSource::parse(&req.uri)
            .map_err(|why| Rejection::new(Lora::field(i, "uri"), quoted(&req.uri), why))?;
        if let Some(j) = out.iter().position(|l| l.uri == req.uri) {
            return Err(Rejection::new(
                Lora::field(i, "uri"),
                quoted(&req.uri),
                format!("already listed as loras[{j}]: list each adapter once"),
            ));
        }
        let scale = req.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > MAX_LORA_SCALE {
            return Err(Rejection::new(
                Lora::field(i, "scale"),
                scale,
                format!("must be a finite number in -{MAX_LORA_SCALE}..={MAX_LORA_SCALE}"),
            ));
        }
        out.push(Lora {
            uri: req.uri,
            scale,
            sha256: None,
            short_hash: None,
            source,
        });
    }
    Ok(out)
}

fn quoted(s: &str) -> String {
    let short: String = s.chars().take(120).collect();
    if short.len() < s.len() {
        format!("{short:?}…")
    } else {
        format!("{short:?}")
    }
}

impl LoraSource {
    /// Parses a `uri` ([`LoraRequest::uri`] lists the forms); the error says what is wrong.
    pub fn parse(uri: &str) -> Result<Self, String> {
        if uri.is_empty() || uri.len() > MAX_LORA_URI_BYTES {
            return Err(format!("must be 1 to {MAX_LORA_URI_BYTES} bytes"));
        }
        if uri.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        if let Some(rest) = uri.strip_prefix("hf://") {
            return parse_hub(rest);
        }
        if let Some(rest) = uri.strip_prefix("s3://") {
            return parse_s3(rest);
        }
        let lower = uri.get(..8).unwrap_or(uri).to_ascii_lowercase();
        if lower.starts_with("https://") || lower.starts_with("http://") {
            return parse_url(uri);
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            return Err(format!(
                "unknown scheme `{scheme}://`: use hf://, s3://, https:// or a path relative to the \
                 worker's LoRA folder"
            ));
        }
        check_relative_path(uri, "a path relative to the worker's LoRA folder")?;
        if !is_safetensors_name(uri) {
            return Err("must name a .safetensors file".into());
        }
        Ok(Self::Local(uri.to_string()))
    }
}

/// `owner/repo[@revision][/path/in/repo.safetensors]`, huggingface_hub's `hf://` form.
fn parse_hub(rest: &str) -> Result<LoraSource, String> {
    let form = "expected hf://owner/repo[@revision][/file.safetensors]";
    let mut parts = rest.splitn(3, '/');
    let owner = parts.next().unwrap_or_default();
    let repo_rev = parts.next().ok_or_else(|| form.to_string())?;
    let file = parts.next();
    let (name, revision) = match repo_rev.split_once('@') {
        Some((name, rev)) => (name, Some(rev)),
        None => (repo_rev, None),
    };
    // The hub's own rule for names (huggingface_hub `validate_repo_id`): [A-Za-z0-9_.-], not
    // starting with `.`, at most 96 characters for the whole id.
    let name_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !name_ok(owner) || !name_ok(name) || owner.len() + name.len() + 1 > 96 {
        return Err(format!(
            "{form}; a repo id is 1 to 96 characters of [A-Za-z0-9_.-]"
        ));
    }
    if let Some(rev) = revision
        && (rev.is_empty()
            || rev.len() > 128
            || !rev
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(format!(
            "{form}; a revision is a branch, tag or commit of [A-Za-z0-9_.-]"
        ));
    }
    let file = match file {
        None | Some("") => DEFAULT_HUB_FILE.to_string(),
        Some(f) => {
            check_relative_path(f, "a file path in the repo")?;
            if !is_safetensors_name(f) {
                return Err("must name a .safetensors file".into());
            }
            f.to_string()
        }
    };
    Ok(LoraSource::Hub {
        repo: format!("{owner}/{name}"),
        revision: revision.map(str::to_string),
        file,
    })
}

/// `bucket/key`: an S3 bucket name (3 to 63 of `[a-z0-9.-]`) and a key naming a safetensors file.
fn parse_s3(rest: &str) -> Result<LoraSource, String> {
    let (bucket, key) = rest
        .split_once('/')
        .ok_or("expected s3://bucket/key.safetensors")?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !bucket_ok {
        return Err("expected s3://bucket/key.safetensors with a bucket of 3 to 63 characters of [a-z0-9.-]".into());
    }
    if key.is_empty() || key.len() > 1024 || !is_safetensors_name(key) {
        return Err("the key must name a .safetensors file (at most 1024 bytes)".into());
    }
    Ok(LoraSource::S3 {
        bucket: bucket.to_string(),
        key: key.to_string(),
    })
}

/// An `http(s)` URL with a host and no credentials (secrets never travel in job messages). Its
/// address is judged when it is fetched, by the same guard as webhook URLs.
fn parse_url(uri: &str) -> Result<LoraSource, String> {
    let url = reqwest::Url::parse(uri).map_err(|e| format!("not a valid URL: {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a URL needs a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials (user:password@): secrets never travel in jobs".into(),
        );
    }
    Ok(LoraSource::Url(uri.to_string()))
}

/// A relative `/`-separated path: no leading `/`, no empty, `.` or `..` segments, no `\`.
fn check_relative_path(path: &str, what: &str) -> Result<(), String> {
    let bad_segment = path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..");
    if path.starts_with('/') || path.contains('\\') || bad_segment {
        return Err(format!(
            "must be {what}: no leading '/', no '\\', no empty, '.' or '..' segments"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(uri: &str, scale: Option<f64>) -> Result<Lora, Rejection> {
        parse_loras(vec![LoraRequest {
            uri: uri.into(),
            scale,
        }])
        .map(|mut v| v.remove(0))
    }

    #[test]
    fn every_uri_form_parses_to_its_source() {
        let hub = one("hf://owner/styles@v2/ink/ink-style.safetensors", None).unwrap();
        assert_eq!(
            hub.source,
            LoraSource::Hub {
                repo: "owner/styles".into(),
                revision: Some("v2".into()),
                file: "ink/ink-style.safetensors".into()
            }
        );
        assert_eq!(hub.scale, 1.0);
        assert_eq!(hub.name(), "ink-style");
        let bare = one("hf://owner/repo", Some(0.5)).unwrap();
        assert!(
            matches!(&bare.source, LoraSource::Hub { file, revision: None, .. } if file == DEFAULT_HUB_FILE)
        );
        let s3 = one("s3://my-bucket/loras/a.SafeTensors", Some(-1.5)).unwrap();
        assert_eq!(
            s3.source,
            LoraSource::S3 {
                bucket: "my-bucket".into(),
                key: "loras/a.SafeTensors".into()
            }
        );
        assert_eq!(s3.name(), "a");
        let url = one("https://cdn.example.com/x/my:lora.safetensors?sig=1", None).unwrap();
        assert!(matches!(url.source, LoraSource::Url(_)));
        assert_eq!(url.name(), "my_lora");
        let local = one("styles/ink.safetensors", None).unwrap();
        assert_eq!(
            local.source,
            LoraSource::Local("styles/ink.safetensors".into())
        );
    }

    #[test]
    fn paths_that_leave_the_lora_folder_are_refused_with_the_field() {
        for bad in [
            "../secrets.safetensors",
            "/etc/passwd.safetensors",
            "a/../../b.safetensors",
            "a//b.safetensors",
            "./a.safetensors",
            "a\\..\\b.safetensors",
            "hf://o/r/../x.safetensors",
        ] {
            let e = one(bad, None).unwrap_err();
            assert_eq!(e.field, "loras[0].uri", "{bad}");
            assert!(e.reason.contains(".."), "{bad}: {e}");
        }
    }

    #[test]
    fn malformed_uris_say_what_is_expected() {
        let cases = [
            ("ftp://host/x.safetensors", "unknown scheme"),
            ("model.ckpt", ".safetensors"),
            ("s3://B/x.safetensors", "bucket"),
            ("s3://bucket/x.bin", ".safetensors"),
            ("hf://owner", "hf://owner/repo"),
            ("hf://-/x@/y.safetensors", "revision"),
            ("https://user:pw@host/x.safetensors", "credentials"),
            ("https://", "URL"),
            ("", "1 to 2048"),
        ];
        for (uri, want) in cases {
            let e = one(uri, None).unwrap_err();
            assert!(e.reason.contains(want), "{uri}: {e}");
        }
    }

    #[test]
    fn scales_are_finite_and_bounded_and_negatives_are_accepted() {
        assert_eq!(one("a.safetensors", Some(-10.0)).unwrap().scale, -10.0);
        for bad in [f64::NAN, f64::INFINITY, 10.5, -80.0] {
            let e = one("a.safetensors", Some(bad)).unwrap_err();
            assert_eq!(e.field, "loras[0].scale");
            assert!(e.reason.contains("-10..=10"), "{e}");
        }
    }

    #[test]
    fn the_count_is_bounded_and_each_uri_listed_once() {
        let many: Vec<LoraRequest> = (0..=MAX_LORAS)
            .map(|i| LoraRequest {
                uri: format!("l{i}.safetensors"),
                scale: None,
            })
            .collect();
        let e = parse_loras(many).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("loras", "9 adapters")
        );
        let twice = vec![
            LoraRequest {
                uri: "a.safetensors".into(),
                scale: Some(1.0),
            },
            LoraRequest {
                uri: "a.safetensors".into(),
                scale: Some(0.5),
            },
        ];
        let e = parse_loras(twice).unwrap_err();
        assert_eq!(e.field, "loras[1].uri");
        assert!(e.reason.contains("loras[0]"), "{e}");
    }
}
