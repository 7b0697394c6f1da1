//! `t2i batch contact-sheet`: something to look at — a grid image of a batch's thumbnails and an HTML
//! index with each image's caption and parameters.
//!
//! When the jobs come from a template (their `metadata.template_vars`), the grid is the X/Y plot
//! A1111 users know: one column per value of `--x`, one row per value of `--y` (by default the first
//! two variables by name), each cell the first image found with that pair. Otherwise the images
//! fill a square-ish grid in batch order. The grid holds at most `--max` thumbnails, and at most
//! `--scan` stored results are read to fill it, so a sheet of a million-image batch costs what a
//! sheet of a hundred does. The image has no text (that would need a font renderer); the row and
//! column labels are in `index.html`, which shows the same grid with captions.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use serde_json::Value;

use crate::cli::BatchSheetArgs;
use crate::events::{EventData, ImageRecord};
use crate::records::Listed;
use crate::storage::{ImageStore, Pages, Store};

/// The grey of a cell no image was found for, and of the gaps between cells.
const EMPTY: Rgb<u8> = Rgb([48, 48, 48]);
/// Pixels between cells.
const GAP: u32 = 4;

/// One thumbnail of the sheet with what its caption says.
struct Cell {
    thumb: RgbImage,
    caption: String,
    key: String,
}

/// The first `scan` done jobs under `key_prefix`, in listing (batch) order.
async fn results(store: &Store, key_prefix: &str, scan: usize) -> Result<Vec<EventData>> {
    let mut out = Vec::new();
    let mut pages = Pages::new(store, key_prefix);
    while let Some(page) = pages.next().await? {
        for k in &page {
            if out.len() >= scan {
                return Ok(out);
            }
            if matches!(Listed::of(k, key_prefix), Some((_, Listed::Result)))
                && let Some(b) = store.get(k).await?
                && let Ok(d) = serde_json::from_slice::<EventData>(&b)
            {
                out.push(d);
            }
        }
    }
    Ok(out)
}

fn template_vars(d: &EventData) -> Option<&serde_json::Map<String, Value>> {
    d.metadata.as_ref()?.get("template_vars")?.as_object()
}

fn caption(d: &EventData, img: &ImageRecord) -> String {
    let p = d.params.clone().unwrap_or(Value::Null);
    let s = |k: &str| p.get(k).map(|v| v.to_string()).unwrap_or_default();
    format!(
        "{} — seed {}, {}x{}, {} steps, {}, cfg {}",
        p.get("prompt").and_then(Value::as_str).unwrap_or(""),
        img.seed,
        img.width,
        img.height,
        s("steps"),
        p.get("scheduler").and_then(Value::as_str).unwrap_or(""),
        s("guidance_scale"),
    )
}

async fn thumbnail(store: &Store, img: &ImageRecord, side: u32) -> Result<RgbImage> {
    let key = store.relative_key(&img.key);
    let bytes = store
        .get(key)
        .await?
        .with_context(|| format!("{key} is not in the store"))?;
    let decoded = image::load_from_memory(&bytes).with_context(|| format!("decoding {key}"))?;
    Ok(decoded.thumbnail(side, side).to_rgb8())
}

/// The sheet's layout: cells by (row, column), and the labels of both.
struct Grid {
    columns: Vec<String>,
    rows: Vec<String>,
    cells: HashMap<(usize, usize), (usize, usize)>, // (row, col) → (result, image)
    axes: Option<(String, String)>,
}

fn layout(found: &[EventData], max: usize, x: Option<&str>, y: Option<&str>) -> Grid {
    let mut names: Vec<&String> = found
        .iter()
        .filter_map(template_vars)
        .flat_map(|v| v.keys())
        .collect();
    names.sort();
    names.dedup();
    let x = x
        .map(str::to_string)
        .or_else(|| names.first().map(|s| s.to_string()));
    let y = y
        .map(str::to_string)
        .or_else(|| names.get(1).map(|s| s.to_string()));
    if let Some(x) = x {
        // An X/Y plot (one row when there is no second variable).
        let value = |d: &EventData, name: &Option<String>| -> Option<String> {
            let Some(n) = name else {
                return Some(String::new());
            };
            let v = template_vars(d)?.get(n)?;
            Some(v.as_str().map_or_else(|| v.to_string(), str::to_string))
        };
        let xs = Some(x.clone());
        let (mut columns, mut rows) = (Vec::<String>::new(), Vec::<String>::new());
        let side = (max as f64).sqrt().ceil() as usize;
        let (max_cols, max_rows) = if y.is_some() {
            (side, max / side.max(1))
        } else {
            (max, 1)
        };
        let mut cells = HashMap::new();
        for (i, d) in found.iter().enumerate() {
            let (Some(cx), Some(ry)) = (value(d, &xs), value(d, &y)) else {
                continue;
            };
            let col = match columns.iter().position(|c| *c == cx) {
                Some(c) => c,
                None if columns.len() < max_cols => {
                    columns.push(cx);
                    columns.len() - 1
                }
                None => continue,
            };
            let row = match rows.iter().position(|r| *r == ry) {
                Some(r) => r,
                None if rows.len() < max_rows.max(1) => {
                    rows.push(ry);
                    rows.len() - 1
                }
                None => continue,
            };
            if !d.images.is_empty() {
                cells.entry((row, col)).or_insert((i, 0));
            }
        }
        return Grid {
            columns,
            rows,
            cells,
            axes: Some((x, y.unwrap_or_default())),
        };
    }
    // No template: the first `max` images in batch order, in a square-ish grid.
    let images: Vec<(usize, usize)> = found
        .iter()
        .enumerate()
        .flat_map(|(i, d)| (0..d.images.len()).map(move |k| (i, k)))
        .take(max)
        .collect();
    let cols = (images.len() as f64).sqrt().ceil().max(1.0) as usize;
    let cells = images
        .iter()
        .enumerate()
        .map(|(n, at)| ((n / cols, n % cols), *at))
        .collect();
    Grid {
        columns: vec![String::new(); cols.min(images.len().max(1))],
        rows: vec![String::new(); images.len().div_ceil(cols)],
        cells,
        axes: None,
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub async fn run(args: BatchSheetArgs) -> Result<()> {
    let (store, prefix) = super::open(&args.target).await?;
    let max = args.max.clamp(1, 1024);
    let found = results(&store, &prefix, args.scan.max(max)).await?;
    anyhow::ensure!(!found.is_empty(), "no stored results under {prefix}");
    let grid = layout(&found, max, args.x.as_deref(), args.y.as_deref());
    let side = args.thumb.clamp(16, 1024);
    let mut cells: HashMap<(usize, usize), Cell> = HashMap::new();
    for (&at, &(i, k)) in &grid.cells {
        let (d, img) = (&found[i], &found[i].images[k]);
        let thumb = thumbnail(&store, img, side).await?;
        let cell = Cell {
            thumb,
            caption: caption(d, img),
            key: img.key.clone(),
        };
        cells.insert(at, cell);
    }
    write(&args.out, &grid, &cells, side, &args.target.batch_id)?;
    eprintln!(
        "contact sheet: {} image(s) in {} x {} ({} result(s) read) → {}",
        cells.len(),
        grid.columns.len(),
        grid.rows.len(),
        found.len(),
        args.out.display()
    );
    Ok(())
}

fn write(
    out: &Path,
    grid: &Grid,
    cells: &HashMap<(usize, usize), Cell>,
    side: u32,
    batch: &str,
) -> Result<()> {
    std::fs::create_dir_all(out.join("thumbs"))
        .with_context(|| format!("creating {}", out.display()))?;
    let (cols, rows) = (grid.columns.len() as u32, grid.rows.len() as u32);
    let step = side + GAP;
    let mut sheet = RgbImage::from_pixel(cols * step + GAP, rows * step + GAP, EMPTY);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><meta charset=utf-8><title>{0}</title>\
         <style>body{{font:13px sans-serif;background:#222;color:#ddd}}td{{vertical-align:top;\
         width:{1}px}}figcaption{{font-size:11px}}th{{text-align:left}}</style><h1>{0}</h1>\
         <p><img src=contact-sheet.png alt=\"contact sheet\"></p><table><tr><th>",
        html_escape(batch),
        side
    );
    if let Some((x, y)) = &grid.axes {
        let _ = write!(html, "{} ↓ / {} →", html_escape(y), html_escape(x));
    }
    html.push_str("</th>");
    for c in &grid.columns {
        let _ = write!(html, "<th>{}</th>", html_escape(c));
    }
    html.push_str("</tr>");
    for (r, label) in grid.rows.iter().enumerate() {
        let _ = write!(html, "<tr><th>{}</th>", html_escape(label));
        for c in 0..grid.columns.len() {
            match cells.get(&(r, c)) {
                Some(cell) => {
                    let (x, y) = (GAP + c as u32 * step, GAP + r as u32 * step);
                    let (ox, oy) = (
                        (side - cell.thumb.width()) / 2,
                        (side - cell.thumb.height()) / 2,
                    );
                    image::imageops::replace(
                        &mut sheet,
                        &cell.thumb,
                        (x + ox).into(),
                        (y + oy).into(),
                    );
                    let name = format!("thumbs/{r:03}-{c:03}.jpg");
                    cell.thumb
                        .save(out.join(&name))
                        .with_context(|| format!("writing {name}"))?;
                    let _ = write!(
                        html,
                        "<td><figure><img src=\"{name}\" alt=\"\"><figcaption>{}<br><code>{}</code>\
                         </figcaption></figure></td>",
                        html_escape(&cell.caption),
                        html_escape(&cell.key)
                    );
                }
                None => html.push_str("<td>—</td>"),
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>\n");
    sheet
        .save(out.join("contact-sheet.png"))
        .context("writing contact-sheet.png")?;
    std::fs::write(out.join("index.html"), html).context("writing index.html")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(vars: &[(&str, &str)]) -> EventData {
        let mut tv = serde_json::Map::new();
        for (k, v) in vars {
            tv.insert(k.to_string(), Value::from(*v));
        }
        let img = ImageRecord {
            index: 0,
            seed: 1,
            bucket: None,
            key: "k/0.png".into(),
            url: None,
            url_expires_at: None,
            content_type: "image/png".into(),
            width: 8,
            height: 8,
            bytes: 1,
            sha256: String::new(),
        };
        EventData {
            job_id: "j".into(),
            status: "succeeded".into(),
            attempt: 1,
            worker: "w".into(),
            model: "m".into(),
            params: None,
            images: vec![img],
            timings_ms: None,
            error: None,
            progress: None,
            prompt_truncated: false,
            batch: None,
            metadata: Some(serde_json::json!({ "template_vars": tv })),
            safety_checker: None,
        }
    }

    #[test]
    fn template_variables_make_an_xy_plot_bounded_by_max() {
        let mut found = Vec::new();
        for a in ["cat", "dog", "fox"] {
            for s in ["oil", "ink", "chalk", "pen", "wax"] {
                found.push(job(&[("animal", a), ("style", s)]));
            }
        }
        let g = layout(&found, 100, None, None);
        assert_eq!(g.axes, Some(("animal".into(), "style".into())));
        assert_eq!(g.columns, ["cat", "dog", "fox"]);
        assert_eq!(g.rows, ["oil", "ink", "chalk", "pen", "wax"]);
        assert_eq!(g.cells[&(1, 2)], (11, 0), "fox in ink");
        // Bounded: at most `max` cells, in a square-ish block.
        let g = layout(&found, 4, Some("style"), Some("animal"));
        assert_eq!(g.columns, ["oil", "ink"]);
        assert_eq!(g.rows, ["cat", "dog"]);
        assert!(g.cells.len() <= 4);
        // No template: a plain grid.
        let plain: Vec<EventData> = (0..5)
            .map(|_| EventData {
                metadata: None,
                safety_checker: None,
                ..job(&[])
            })
            .collect();
        let g = layout(&plain, 100, None, None);
        assert_eq!((g.columns.len(), g.rows.len(), g.cells.len()), (3, 2, 5));
        assert_eq!(g.axes, None);
    }
}
