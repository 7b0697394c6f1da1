//! What a fetched adapter file is checked for before any job uses it: a safetensors file (its
//! header parses and describes exactly the bytes that follow), within the size bound; and its two
//! hashes: SHA-256 of the whole file (reported in events, the identity of merged variants), and
//! A1111's short hash for image metadata.
//!
//! A1111's short hash (`extensions-builtin/Lora/network.py` `NetworkOnDisk`): the header's
//! `sshs_model_hash` when the file has one, else `hashes.addnet_hash_safetensors` (SHA-256 of
//! everything after the 8-byte length and the JSON header: the tensor data only, so editing
//! metadata does not change it), cut to 12 hex digits (`shorthash = hash[0:12]`).

use std::io::Read;
use std::path::Path;

use sha2::Digest;

/// safetensors' own bound on a header (`MAX_HEADER_SIZE` in the safetensors crate).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The hashes of a checked file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashes {
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
    /// A1111's short hash (12 hex digits).
    pub short_hash: String,
}

/// Checks `path` is a safetensors file of at most `max_bytes` and hashes it. `Err` says why not.
pub(crate) fn inspect(path: &Path, max_bytes: u64) -> Result<Hashes, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    if len > max_bytes {
        return Err(format!("{len} bytes, more than the limit of {max_bytes}"));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| {
        "not a safetensors file (shorter than its 8-byte header length)".to_string()
    })?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > len {
        return Err(format!(
            "not a safetensors file (header length {header_len} in a file of {len} bytes)"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("cannot read the header: {e}"))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| format!("not a safetensors file (invalid header: {e})"))?;
    let data_len = metadata
        .tensors()
        .values()
        .map(|info| info.data_offsets.1)
        .max()
        .unwrap_or(0) as u64;
    if 8 + header_len + data_len != len {
        return Err(format!(
            "not a whole safetensors file: the header describes {data_len} bytes of data, the file has {}",
            len - 8 - header_len
        ));
    }
    let mut whole = sha2::Sha256::new();
    whole.update(prefix);
    whole.update(&header);
    let mut data = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        data.update(&buf[..n]);
    }
    let addnet = hex::encode(data.finalize());
    let sshs = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("sshs_model_hash"))
        .filter(|h| h.len() >= 12 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .cloned();
    let short_hash = sshs.unwrap_or(addnet)[..12].to_ascii_lowercase();
    Ok(Hashes {
        sha256: hex::encode(whole.finalize()),
        short_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, metadata: Option<&str>) -> std::path::PathBuf {
        let values = [1f32, 2.0, 3.0];
        let path = dir.join(name);
        let meta: Option<std::collections::HashMap<String, String>> =
            metadata.map(|m| [("sshs_model_hash".to_string(), m.to_string())].into());
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![3],
            bytemuck::cast_slice(&values),
        )
        .unwrap();
        safetensors::serialize_to_file([("w", view)], meta, &path).unwrap();
        path
    }

    #[test]
    fn the_short_hash_covers_the_tensor_data_only_as_a1111_computes_it() {
        let dir = tempfile::tempdir().unwrap();
        let plain = write(dir.path(), "a.safetensors", None);
        let h = inspect(&plain, 1 << 20).unwrap();
        let bytes = std::fs::read(&plain).unwrap();
        assert_eq!(h.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
        // Three f32s, 1, 2, 3 little-endian: the data after the header.
        let data: Vec<u8> = [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(h.short_hash, hex::encode(sha2::Sha256::digest(&data))[..12]);
        // Other header metadata, same data: same short hash, other file hash. A recorded
        // `sshs_model_hash` wins, as in A1111.
        let tagged = write(dir.path(), "b.safetensors", Some("ABCDEF0123456789"));
        let t = inspect(&tagged, 1 << 20).unwrap();
        assert_ne!(t.sha256, h.sha256);
        assert_eq!(t.short_hash, "abcdef012345");
    }

    #[test]
    fn files_that_are_not_whole_safetensors_or_too_big_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), "a.safetensors", None);
        let len = std::fs::metadata(&good).unwrap().len();
        assert!(
            inspect(&good, len - 1)
                .unwrap_err()
                .contains("more than the limit")
        );
        let cut = dir.path().join("cut.safetensors");
        let bytes = std::fs::read(&good).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
        assert!(inspect(&cut, 1 << 20).unwrap_err().contains("not a whole"));
        let pickle = dir.path().join("x.safetensors");
        std::fs::write(&pickle, b"\x80\x02}q\x00(X\x05\x00\x00\x00state").unwrap();
        assert!(
            inspect(&pickle, 1 << 20)
                .unwrap_err()
                .contains("not a safetensors")
        );
    }
}
