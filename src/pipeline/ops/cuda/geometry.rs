//! Launch geometry of the project's kernels (`kernels/*.cu`), as plain numbers so that it is
//! computed, and tested, without a GPU. A shape that does not fit a kernel's limits (grid
//! dimensions, 32-bit element counts) gets `None`, and the op takes candle's path instead.

/// Threads per block of the row, flat and group-norm kernels.
pub(crate) const THREADS: u32 = 256;
/// Columns each thread of a row kernel covers at least, before another column block is added.
const ITEMS: usize = 8;
/// Largest grid y and z dimensions CUDA allows (x goes to 2³¹ − 1).
const MAX_GRID_YZ: usize = 65_535;
const MAX_GRID_X: usize = (1 << 31) - 1;
/// GroupNorm pass 1: a chunk of a group is at least this many elements (16 per thread), and a
/// group has at most this many chunks (pass 2 merges them in one warp, two per lane).
const MIN_CHUNK: usize = 4096;
pub(crate) const MAX_CHUNKS: usize = 64;

/// A kernel launch: grid and block dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl Launch {
    #[cfg(test)]
    pub fn blocks(&self) -> u64 {
        self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64
    }
}

/// A row kernel over `rows × cols` (GEGLU, the bias adds, GroupNorm's pass 2): grid x is the
/// row, grid y the column blocks, each thread striding over its row's columns.
pub(crate) fn rows(rows: usize, cols: usize) -> Option<Launch> {
    if rows == 0 || cols == 0 || rows > MAX_GRID_X || cols > u32::MAX as usize {
        return None;
    }
    let col_blocks = cols
        .div_ceil(THREADS as usize * ITEMS)
        .clamp(1, MAX_GRID_YZ);
    Some(Launch {
        grid: (rows as u32, col_blocks as u32, 1),
        block: (THREADS, 1, 1),
    })
}

/// A grid-stride kernel over `n` elements (the residual add).
pub(crate) fn flat(n: usize) -> Option<Launch> {
    if n == 0 {
        return None;
    }
    let blocks = n.div_ceil(THREADS as usize * ITEMS).clamp(1, MAX_GRID_X);
    Some(Launch {
        grid: (blocks as u32, 1, 1),
        block: (THREADS, 1, 1),
    })
}

/// The tokens-onto-image add: 32×32 tiles of (channels × pixels), block (32, 8), one grid z per
/// image.
pub(crate) fn tiles(images: usize, channels: usize, pixels: usize) -> Option<Launch> {
    let (gx, gy) = (pixels.div_ceil(32), channels.div_ceil(32));
    if images == 0 || gx == 0 || gy == 0 || gx > MAX_GRID_X || gy > MAX_GRID_YZ {
        return None;
    }
    if images > MAX_GRID_YZ || channels > u32::MAX as usize || pixels > u32::MAX as usize {
        return None;
    }
    Some(Launch {
        grid: (gx as u32, gy as u32, images as u32),
        block: (32, 8, 1),
    })
}

/// Both passes of a GroupNorm over `(images, channels, pixels)` in `groups` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupNormPlan {
    /// Elements of one group of one image: `channels / groups · pixels`.
    pub group_len: u32,
    /// Elements per pass-1 chunk; the last chunk of a group may be shorter.
    pub chunk_len: u32,
    /// Chunks per group (pass-1 grid x).
    pub chunks: u32,
    pub partial: Launch,
    pub apply: Launch,
}

pub(crate) fn group_norm(
    images: usize,
    channels: usize,
    pixels: usize,
    groups: usize,
) -> Option<GroupNormPlan> {
    if groups == 0 || channels == 0 || !channels.is_multiple_of(groups) {
        return None;
    }
    let group_len = channels / groups * pixels;
    let group_count = images * groups;
    if group_len == 0 || group_len > u32::MAX as usize || group_count > MAX_GRID_YZ {
        return None;
    }
    let wanted = group_len.div_ceil(MIN_CHUNK).clamp(1, MAX_CHUNKS);
    let chunk_len = group_len.div_ceil(wanted);
    let chunks = group_len.div_ceil(chunk_len);
    Some(GroupNormPlan {
        group_len: group_len as u32,
        chunk_len: chunk_len as u32,
        chunks: chunks as u32,
        partial: Launch {
            grid: (chunks as u32, group_count as u32, 1),
            block: (THREADS, 1, 1),
        },
        apply: rows(images * channels, pixels)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SSD-1B's group norms at 1024² with CFG (2 rows) in the UNet, and the VAE decoder's at
    /// one image: (images, channels, pixels).
    const SSD1B_GROUP_NORMS: [(usize, usize, usize); 10] = [
        (2, 320, 128 * 128),
        (2, 640, 128 * 128),
        (2, 640, 64 * 64),
        (2, 960, 64 * 64),
        (2, 1280, 32 * 32),
        (2, 2560, 32 * 32),
        (1, 512, 128 * 128),
        (1, 512, 256 * 256),
        (1, 256, 512 * 512),
        (1, 128, 1024 * 1024),
    ];

    #[test]
    fn group_norm_chunks_tile_each_group_exactly() {
        let shapes = SSD1B_GROUP_NORMS.into_iter().chain([
            (1, 4, 1),
            (3, 32, 7),
            (1, 64, 4096),
            (8, 2560, 32 * 32),
        ]);
        for (b, c, hw) in shapes {
            let p = group_norm(b, c, hw, 32.min(c)).unwrap();
            let (len, chunk, n) = (
                p.group_len as usize,
                p.chunk_len as usize,
                p.chunks as usize,
            );
            assert_eq!(len, c / 32.min(c) * hw);
            assert!((1..=MAX_CHUNKS).contains(&n), "{b} {c} {hw}: {n} chunks");
            // Every element in exactly one chunk; no chunk empty.
            assert!(n * chunk >= len && (n - 1) * chunk < len, "{b} {c} {hw}");
            assert_eq!(p.partial.grid, (n as u32, (b * 32.min(c)) as u32, 1));
            assert_eq!(p.apply.grid.0 as usize, b * c);
        }
    }

    #[test]
    fn group_norm_fills_an_h100_with_many_blocks_per_group() {
        // 132 SMs: one block per (image, group) would be 32-64 blocks for all of these.
        for (b, c, hw) in SSD1B_GROUP_NORMS {
            let p = group_norm(b, c, hw, 32).unwrap();
            if c / 32 * hw >= MIN_CHUNK * 8 {
                assert!(p.chunks >= 8, "{b} {c} {hw}: {} chunks", p.chunks);
            }
            assert!(
                p.partial.blocks() >= 2 * 132 || p.group_len as usize <= 2 * MIN_CHUNK,
                "{b} {c} {hw}: {} pass-1 blocks",
                p.partial.blocks()
            );
        }
    }

    #[test]
    fn shapes_beyond_the_limits_are_refused() {
        assert!(
            group_norm(1, 30, 10, 32).is_none(),
            "channels not in groups"
        );
        assert!(group_norm(1, 0, 10, 1).is_none());
        assert!(group_norm(3000, 32, 10, 32).is_none(), "grid y over 65535");
        assert!(group_norm(1, 1, 1 << 33, 1).is_none(), "group over u32");
        assert!(rows(0, 5).is_none() && rows(5, 0).is_none());
        assert!(rows(1 << 31, 5).is_none());
        assert!(tiles(70_000, 32, 32).is_none());
        assert!(flat(0).is_none());
    }

    #[test]
    fn row_and_tile_grids_cover_their_shapes() {
        // The kernels stride over columns, so correctness needs only a row per grid x and at
        // least one column block; the column blocks give each thread ITEMS or more columns.
        for (r, c) in [
            (1, 1),
            (8192, 640),
            (32768, 5120),
            (2, 1 << 20),
            (3, 100_000_000),
        ] {
            let l = rows(r, c).unwrap();
            assert_eq!(l.grid.0 as usize, r);
            let blocks = l.grid.1 as usize;
            assert!((1..=MAX_GRID_YZ).contains(&blocks), "{r}x{c}");
            // At most ITEMS columns per thread, unless the grid is at its limit; never a column
            // block without a column.
            let per_thread = c.div_ceil(blocks * THREADS as usize);
            assert!(per_thread <= ITEMS || blocks == MAX_GRID_YZ, "{r}x{c}");
            assert!(
                (blocks - 1) * (THREADS as usize) < c,
                "{r}x{c}: empty column blocks"
            );
        }
        let t = tiles(2, 640, 4096).unwrap();
        assert_eq!((t.grid, t.block), ((128, 20, 2), (32, 8, 1)));
        let t = tiles(1, 33, 31).unwrap();
        assert_eq!(t.grid, (1, 2, 1), "partial tiles round up");
        let f = flat(10_000).unwrap();
        assert!(f.grid.0 as usize * THREADS as usize * ITEMS >= 10_000);
    }
}
