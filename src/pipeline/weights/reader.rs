//! A component's safetensors files as a candle `VarBuilder`, read with positioned reads (one tensor
//! at a time) and converted to the compute dtype. Which files those are is decided in the parent
//! module; headers are parsed and checked by the `safetensors` crate. A builder may also record
//! every tensor it hands out ([`Recorded`]): the LoRA variants of a component are built from those
//! (`pipeline/lora`), never from the files again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

/// Where one component's load time went, for `t2i bench` and the load log line.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ComponentLoad {
    pub component: &'static str,
    pub tensors: usize,
    /// Read from the files (their dtype).
    pub bytes: u64,
    /// Held by the loaded tensors (the compute dtype): what the component occupies on its device.
    pub loaded_bytes: u64,
    /// In positioned reads from the files (page cache or disk).
    #[serde(serialize_with = "secs")]
    pub read: Duration,
    /// Building tensors from the bytes read: dtype conversion, the copy to the device.
    #[serde(serialize_with = "secs")]
    pub convert: Duration,
    /// The whole component, building its layers included (wall time; components may overlap).
    #[serde(serialize_with = "secs")]
    pub total: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Shared between a component's backend and its loader, which reads it when the component is built.
pub(crate) type LoadStats = Arc<Mutex<ComponentLoad>>;

/// Every tensor a recording builder handed out, by name, as the component holds it (converted to
/// its dtype, on its device). The tensors share their storage with the component's own (candle
/// tensors are reference-counted), so recording costs no weight memory.
pub(crate) type Recorded = Arc<Mutex<std::collections::HashMap<String, candle_core::Tensor>>>;

/// A component's safetensors files as a candle `VarBuilder` converting to `dtype` (see
/// [`SafetensorsFiles`]).
pub(crate) fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    component: &'static str,
) -> candle_core::Result<(VarBuilder<'static>, LoadStats)> {
    let mut backend = SafetensorsFiles::open(files)?;
    let stats = LoadStats::new(Mutex::new(ComponentLoad {
        component,
        ..ComponentLoad::default()
    }));
    backend.stats = stats.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    Ok((vb, stats))
}

/// [`var_builder`] that also records every tensor it hands out into `record`.
pub(crate) fn recording_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    component: &'static str,
    record: Recorded,
) -> candle_core::Result<(VarBuilder<'static>, LoadStats)> {
    let mut backend = SafetensorsFiles::open(files)?;
    let stats = LoadStats::new(Mutex::new(ComponentLoad {
        component,
        ..ComponentLoad::default()
    }));
    backend.stats = stats.clone();
    backend.record = Some(record);
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    Ok((vb, stats))
}

/// Safetensors files read one tensor at a time with positioned reads, instead of candle's
/// memory-mapped loader: every tensor is copied out of the file anyway (candle's CPU tensors own
/// their memory), and with a mapping the pages of the file being loaded count in the process's
/// resident memory on top of those copies until the whole component is built. For SSD-1B in f32
/// that put peak RSS 4.8 GB above steady state (the UNet's 5.3 GB file mapped while its copy was
/// made); read this way, the transient is one tensor.
struct SafetensorsFiles {
    files: Vec<std::fs::File>,
    /// Name → (file index, dtype, shape, absolute byte range in that file).
    tensors: std::collections::HashMap<String, StoredTensor>,
    stats: LoadStats,
    record: Option<Recorded>,
}

struct StoredTensor {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

impl SafetensorsFiles {
    /// Reads and checks every file's header (the safetensors format: a little-endian u64 header
    /// length, a JSON header of tensor dtypes, shapes and data offsets, then the data).
    fn open(paths: &[PathBuf]) -> candle_core::Result<Self> {
        use std::os::unix::fs::FileExt;
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = std::collections::HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let fail =
                |what: String| candle_core::Error::Msg(format!("{}: {what}", path.display()));
            let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
            let file_len = file
                .metadata()
                .map_err(|e| fail(format!("cannot stat: {e}")))?
                .len();
            let mut prefix = [0u8; 8];
            file.read_exact_at(&mut prefix, 0)
                .map_err(|e| fail(format!("not a safetensors file (no header length): {e}")))?;
            let header_len = u64::from_le_bytes(prefix);
            let data_start = header_len
                .checked_add(8)
                .filter(|&end| end <= file_len)
                .ok_or_else(|| {
                    fail(format!(
                        "header length {header_len} exceeds the file ({file_len} bytes)"
                    ))
                })?;
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| fail(format!("cannot read the header: {e}")))?;
            // safetensors' own parser: it checks that the tensors are contiguous, in order, and
            // that each byte range matches its dtype and shape.
            let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
                .map_err(|e| fail(format!("invalid header: {e}")))?;
            let data_len = metadata
                .tensors()
                .values()
                .map(|info| info.data_offsets.1)
                .max()
                .unwrap_or(0) as u64;
            if data_start + data_len != file_len {
                return Err(fail(format!(
                    "the header describes {data_len} bytes of data, the file has {} \
                     (truncated or corrupt download?)",
                    file_len - data_start
                )));
            }
            for (name, info) in metadata.tensors() {
                let dtype =
                    DType::try_from(info.dtype).map_err(|e| fail(format!("tensor {name}: {e}")))?;
                let (begin, end) = info.data_offsets;
                tensors.insert(
                    name,
                    StoredTensor {
                        file: index,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + begin as u64,
                        len: end - begin,
                    },
                );
            }
            files.push(file);
        }
        Ok(Self {
            files,
            tensors,
            stats: LoadStats::default(),
            record: None,
        })
    }

    /// The named tensor, on `device`, converted to `dtype`.
    fn load(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        use std::os::unix::fs::FileExt;
        let stored = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let started = Instant::now();
        let file = &self.files[stored.file];
        let read_into = |buf: &mut [u8]| {
            file.read_exact_at(buf, stored.start)
                .map_err(|e| candle_core::Error::Msg(format!("cannot read tensor {name}: {e}")))
        };
        // The format is little-endian, as every target this builds for. The float types are read
        // straight into the buffer the tensor keeps (on CPU: no second copy of the weights, and no
        // second set of fresh pages to fault in); other dtypes go through a byte buffer.
        let (raw, read) = match stored.dtype {
            DType::F32 => typed::<f32>(stored, read_into, device)?,
            DType::F16 => typed::<half::f16>(stored, read_into, device)?,
            DType::BF16 => typed::<half::bf16>(stored, read_into, device)?,
            other => {
                let mut bytes = vec![0u8; stored.len];
                read_into(&mut bytes)?;
                let read = started.elapsed();
                let t = candle_core::Tensor::from_raw_buffer(&bytes, other, &stored.shape, device)?;
                (t, read)
            }
        };
        let tensor = raw.to_dtype(dtype)?;
        if let Some(record) = &self.record {
            record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string(), tensor.clone());
        }
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.tensors += 1;
        stats.bytes += stored.len as u64;
        stats.loaded_bytes += (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        stats.read += read;
        stats.convert += started.elapsed() - read;
        Ok(tensor)
    }
}

/// Reads a stored tensor of `T`s into a `Vec<T>` and makes it a tensor (on CPU, the same memory);
/// also returns the time the read took.
fn typed<T: bytemuck::Pod + candle_core::WithDType>(
    stored: &StoredTensor,
    read_into: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
    device: &Device,
) -> candle_core::Result<(candle_core::Tensor, Duration)> {
    let started = Instant::now();
    let mut values: Vec<T> = bytemuck::zeroed_vec(stored.len / std::mem::size_of::<T>());
    read_into(bytemuck::cast_slice_mut(&mut values))?;
    let read = started.elapsed();
    let tensor = candle_core::Tensor::from_vec(values, stored.shape.as_slice(), device)?;
    Ok((tensor, read))
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        // Checked before reading, so a mismatched checkpoint fails without loading the tensor.
        if let Some(stored) = self.tensors.get(name)
            && stored.shape.as_slice() != shape.dims()
        {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: stored.shape.clone().into(),
            }
            .bt());
        }
        self.load(name, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
