//! RGB pixels → PNG, JPEG or WebP bytes, with the generation parameters embedded where SD tools look.
//!
//! * PNG: a text chunk `parameters` in the A1111 format every SD tool reads
//!   (`prompt\nNegative prompt: …\nSteps: 25, Sampler: Euler, CFG scale: 7, Seed: 42, Size: …, Model: …`;
//!   LoRA adapters as A1111's Lora extension writes them: `<lora:name:scale>` after the prompt and
//!   `Lora hashes: "name: 0123456789ab, …"`)
//!   and a chunk `t2i` with the full normalized job as JSON. `tEXt` when the text is Latin-1,
//!   `iTXt` (UTF-8) otherwise, as Pillow does.
//! * JPEG and WebP: EXIF `UserComment` with the `parameters` text (UNICODE, as A1111/piexif write it);
//!   WebP also carries the JSON in XMP. JPEG has no XMP support in the encoder, so the JSON is PNG/WebP
//!   only. WebP output is lossless (the `image` crate's encoder).
//!
//! Pure: bytes in memory, no files.

use std::io::Cursor;

use ::image::{ImageEncoder, RgbImage};

pub use crate::job::ImageFormat;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("PNG encoding: {0}")]
    Png(#[from] png::EncodingError),
    #[error("{0} encoding: {1}")]
    Image(&'static str, ::image::ImageError),
}

/// What gets embedded in every image.
#[derive(Debug, Clone)]
pub struct ImageMetadata {
    /// A1111-style `parameters` text; see [`parameters_text`].
    pub parameters: String,
    /// The normalized job, as JSON.
    pub job_json: String,
}

/// The fields of the A1111 `parameters` text.
pub struct ParametersText<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub steps: u32,
    pub sampler: &'a str,
    pub guidance_scale: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: &'a str,
    /// The generation's LoRA adapters (their short hashes once fetched).
    pub loras: &'a [crate::job::Lora],
}

impl<'a> ParametersText<'a> {
    /// The parameters of image `seed` of a generation rendered with `model` (its display name).
    pub fn of(g: &'a crate::job::Generation, seed: u64, model: &'a str) -> Self {
        Self {
            prompt: &g.prompt,
            negative_prompt: g.negative_prompt.as_deref(),
            steps: g.steps,
            sampler: g.scheduler.display_name(),
            guidance_scale: g.guidance_scale,
            seed,
            width: g.width,
            height: g.height,
            model,
            loras: &g.loras,
        }
    }
}

/// The short name of a model for image metadata: the last segment of a repo id or folder path.
pub fn model_display_name(spec: &str) -> &str {
    spec.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(spec)
}

/// `prompt\nNegative prompt: …\nSteps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …`.
///
/// With LoRA adapters, as A1111 writes them (`extensions-builtin/Lora/extra_networks_lora.py`): each
/// as `<lora:name:scale>` after the prompt (A1111 keeps the tags the user typed in the prompt; ours
/// come from the job's `loras`, so they are appended), and `Lora hashes: "name: hash, …"` after the
/// other parameters, the value quoted as A1111's `infotext_utils.quote` quotes one with `:` or `,`.
/// The encoders never see the tags: they are metadata for tools that read it back.
pub fn parameters_text(p: &ParametersText<'_>) -> String {
    let mut s = p.prompt.to_string();
    for l in p.loras {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!("<lora:{}:{}>", l.name(), l.scale));
    }
    if let Some(n) = p.negative_prompt.filter(|n| !n.is_empty()) {
        s.push_str("\nNegative prompt: ");
        s.push_str(n);
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        p.steps, p.sampler, p.guidance_scale, p.seed, p.width, p.height, p.model
    ));
    let hashes: Vec<String> = p
        .loras
        .iter()
        .filter_map(|l| Some(format!("{}: {}", l.name(), l.short_hash.as_deref()?)))
        .collect();
    if !hashes.is_empty() {
        s.push_str(&format!(
            ", Lora hashes: {}",
            a1111_quote(&hashes.join(", "))
        ));
    }
    s
}

/// A1111's `infotext_utils.quote`: a value with `,`, `:` or a newline is written as a JSON string.
fn a1111_quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// Encodes `img`. `quality` (1..=100) applies to JPEG only.
pub fn encode(
    img: &RgbImage,
    format: ImageFormat,
    quality: u8,
    meta: &ImageMetadata,
) -> Result<Vec<u8>, EncodeError> {
    match format {
        ImageFormat::Png => encode_png(img, meta),
        ImageFormat::Jpeg => {
            let mut out = Vec::new();
            let mut enc = ::image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out,
                quality.clamp(1, 100),
            );
            // Infallible for JPEG (the encoder supports EXIF); ignore the Unsupported case defensively.
            let _ = enc.set_exif_metadata(exif_user_comment(&meta.parameters));
            enc.write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ::image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| EncodeError::Image("JPEG", e))?;
            Ok(out)
        }
        ImageFormat::Webp => {
            let mut out = Vec::new();
            let mut enc = image_webp::WebPEncoder::new(&mut out);
            enc.set_exif_metadata(exif_user_comment(&meta.parameters));
            enc.set_xmp_metadata(xmp_packet(&meta.job_json).into_bytes());
            enc.encode(
                img.as_raw(),
                img.width(),
                img.height(),
                image_webp::ColorType::Rgb8,
            )
            .map_err(|e| {
                EncodeError::Image(
                    "WebP",
                    ::image::ImageError::IoError(std::io::Error::other(e)),
                )
            })?;
            Ok(out)
        }
    }
}

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

fn encode_png(img: &RgbImage, meta: &ImageMetadata) -> Result<Vec<u8>, EncodeError> {
    let mut out = Cursor::new(Vec::new());
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, text) in [("parameters", &meta.parameters), ("t2i", &meta.job_json)] {
            if is_latin1(text) {
                enc.add_text_chunk(key.into(), text.clone())?;
            } else {
                enc.add_itxt_chunk(key.into(), text.clone())?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
    }
    Ok(out.into_inner())
}

/// A minimal big-endian TIFF/EXIF block: IFD0 → Exif IFD → UserComment (tag 0x9286, type UNDEFINED),
/// encoded as `"UNICODE\0"` + UTF-16BE (what piexif's `UserComment.dump(encoding="unicode")` writes).
fn exif_user_comment(text: &str) -> Vec<u8> {
    let mut comment = b"UNICODE\0".to_vec();
    for unit in text.encode_utf16() {
        comment.extend_from_slice(&unit.to_be_bytes());
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"MM\0\x2a"); // big-endian TIFF header
    b.extend_from_slice(&8u32.to_be_bytes()); // IFD0 at offset 8
    // IFD0: one entry, ExifIFDPointer (0x8769, LONG) → offset 26.
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&0x8769u16.to_be_bytes());
    b.extend_from_slice(&4u16.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&26u32.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    // Exif IFD at 26: one entry, UserComment (0x9286, UNDEFINED=7) with its data at offset 44.
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&0x9286u16.to_be_bytes());
    b.extend_from_slice(&7u16.to_be_bytes());
    b.extend_from_slice(&(comment.len() as u32).to_be_bytes());
    b.extend_from_slice(&44u32.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&comment);
    b
}

/// An XMP packet carrying the job JSON as `t2i:job`.
fn xmp_packet(job_json: &str) -> String {
    let escaped = job_json
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\
<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\
<rdf:Description rdf:about=\"\" xmlns:t2i=\"https://github.com/t2i-worker/ns/1.0/\" t2i:job=\"{escaped}\"/>\
</rdf:RDF></x:xmpmeta><?xpacket end=\"r\"?>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(prompt: &str) -> ImageMetadata {
        ImageMetadata {
            parameters: parameters_text(&ParametersText {
                prompt,
                negative_prompt: Some("blurry"),
                steps: 25,
                sampler: "Euler",
                guidance_scale: 7.0,
                seed: 42,
                width: 8,
                height: 8,
                model: "SSD-1B",
                loras: &[],
            }),
            job_json: r#"{"prompt":"x"}"#.into(),
        }
    }

    #[test]
    fn parameters_text_is_in_the_a1111_format() {
        assert_eq!(
            meta("a wolf").parameters,
            "a wolf\nNegative prompt: blurry\nSteps: 25, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 8x8, Model: SSD-1B"
        );
    }

    #[test]
    fn loras_are_tagged_after_the_prompt_and_hashed_as_a1111_does() {
        let loras = crate::job::lora::parse_loras(vec![
            crate::job::LoraRequest {
                uri: "hf://owner/styles/ink-style.safetensors".into(),
                scale: Some(0.8),
            },
            crate::job::LoraRequest {
                uri: "s3://bucket/people/face.safetensors".into(),
                scale: Some(-1.0),
            },
        ])
        .unwrap();
        let mut loras = loras;
        loras[0].short_hash = Some("0123456789ab".into());
        loras[1].short_hash = Some("ba9876543210".into());
        let text = parameters_text(&ParametersText {
            prompt: "a wolf",
            negative_prompt: None,
            steps: 4,
            sampler: "Euler",
            guidance_scale: 5.0,
            seed: 1,
            width: 64,
            height: 64,
            model: "SSD-1B",
            loras: &loras,
        });
        assert_eq!(
            text,
            "a wolf <lora:ink-style:0.8> <lora:face:-1>\nSteps: 4, Sampler: Euler, CFG scale: 5, \
             Seed: 1, Size: 64x64, Model: SSD-1B, Lora hashes: \"ink-style: 0123456789ab, face: ba9876543210\""
        );
    }

    #[test]
    fn png_round_trips_pixels_and_text_chunks_including_non_latin1() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
        for prompt in ["a wolf", "東京の猫"] {
            let bytes = encode(&img, ImageFormat::Png, 90, &meta(prompt)).unwrap();
            let decoder = png::Decoder::new(Cursor::new(&bytes));
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            reader.next_frame(&mut buf).unwrap();
            assert_eq!(&buf[..], img.as_raw().as_slice());
            let info = reader.info();
            let mut texts: Vec<(String, String)> = info
                .uncompressed_latin1_text
                .iter()
                .map(|t| (t.keyword.clone(), t.text.clone()))
                .collect();
            texts.extend(
                info.utf8_text
                    .iter()
                    .map(|t| (t.keyword.clone(), t.get_text().unwrap())),
            );
            let params = texts.iter().find(|(k, _)| k == "parameters").unwrap();
            assert!(params.1.starts_with(prompt));
            assert!(
                texts
                    .iter()
                    .any(|(k, v)| k == "t2i" && v.contains("prompt"))
            );
        }
    }

    #[test]
    fn jpeg_and_webp_decode_and_carry_exif() {
        let img = RgbImage::from_fn(16, 16, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        for format in [ImageFormat::Jpeg, ImageFormat::Webp] {
            let bytes = encode(&img, format, 90, &meta("a wolf")).unwrap();
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (16, 16));
            let needle: Vec<u8> = "a wolf"
                .encode_utf16()
                .flat_map(|u| u.to_be_bytes())
                .collect();
            assert!(
                bytes.windows(needle.len()).any(|w| w == needle),
                "{format:?} lacks the UserComment"
            );
        }
    }
}
