//! Finding the imaging area from the pixels when the header gives no ultrasound region.
//!
//! Scanner screens carry the B-mode image (a rectangle or a fan) surrounded by black, with
//! burned-in text, scales and logos (coloured pixels do not count as signal). The image is the largest connected patch of signal: on a
//! grid of 4×4-pixel blocks, blocks with mean intensity above a floor are closed (to bridge
//! dark speckle and anechoic areas), the largest 4-connected component kept (text glyphs are
//! small separate components), and each of its rows filled from first to last block.

use ndarray::{Array2, Array3};

use crate::frame::{
    chroma, Fan, ImagingRegion, Rect, RegionShape, RegionSource, COLOUR_CHROMA_THRESHOLD,
};

/// Block edge in pixels.
const BLOCK: usize = 4;
/// Mean grey level (0–255) above which a block holds signal: the black surround of scanner
/// screens sits at 0–3 even after lossy compression.
const SIGNAL_FLOOR: f32 = 6.0;
/// Closing radius in blocks: bridges anechoic holes up to about 2 × 2 × 4 = 16 px.
const CLOSE_RADIUS: usize = 2;
/// A component smaller than this share of the frame is not taken for the image.
const MIN_IMAGE_FRACTION: f64 = 0.05;
/// A component filling less of its bounding box than this is a sector (fan) ...
const SECTOR_FILL: f64 = 0.9;
/// ... if it also widens with depth: the median width of its top rows
/// ([`TOP_ROWS_SHARE`] of its height) must be below this share of its widest row. A fan's
/// near arc is a fraction r/(r + depth) of its far arc's chord (about 0.5–0.8 for convex
/// arrays at MSK depths); a linear image is as wide at the skin as anywhere, and the black
/// corners beneath it are acoustic shadows (bone either side of a joint gap), not a fan's.
const SECTOR_TOP_WIDTH: f64 = 0.9;
/// The share of the component's height whose rows are its top, for [`SECTOR_TOP_WIDTH`].
const TOP_ROWS_SHARE: f64 = 0.1;

/// A fan found inside a declared rectangle must span at least this share of its width and
/// height; a smaller dark-cornered area is more likely a linear image with dark tissue.
const FAN_COVER: f64 = 0.8;

/// The region `header` declares (a rectangle from the Sequence of Ultrasound Regions), with the
/// fan found inside it when the image there is a sector: same bounds and source, shape
/// `Sector`, and the fan's mask. Anything else is returned as declared.
pub fn fan_within(
    header: &ImagingRegion,
    gray: &Array2<f32>,
    rgb: Option<&Array3<u8>>,
) -> ImagingRegion {
    let b = header.bounds;
    let (h, w) = gray.dim();
    if header.shape != RegionShape::Rectangle
        || header.mask.is_some()
        || b.x1 > w
        || b.y1 > h
        || b.x0 >= b.x1
        || b.y0 >= b.y1
    {
        return header.clone();
    }
    let crop = gray.slice(ndarray::s![b.y0..b.y1, b.x0..b.x1]).to_owned();
    let crop_rgb = rgb.map(|c| c.slice(ndarray::s![b.y0..b.y1, b.x0..b.x1, ..]).to_owned());
    let found = detect_imaging_region(&crop, crop_rgb.as_ref());
    let covers = found.bounds.width() as f64 >= FAN_COVER * b.width() as f64
        && found.bounds.height() as f64 >= FAN_COVER * b.height() as f64;
    match (&found.mask, found.shape, covers) {
        (Some(m), RegionShape::Sector, true) => {
            let mask = Array2::from_shape_fn((h, w), |(y, x)| {
                if b.contains(x, y) {
                    m[[y - b.y0, x - b.x0]]
                } else {
                    0
                }
            });
            fit_sector(
                gray,
                ImagingRegion {
                    bounds: b,
                    shape: RegionShape::Sector,
                    source: header.source,
                    mask: Some(std::sync::Arc::new(mask)),
                    fan: None,
                },
            )
        }
        _ => header.clone(),
    }
}

/// How far above the fan's first echo the declared transducer face may lie, mm. The near
/// field of a convex array stays dark for a fraction of a millimetre at any setting (the first
/// samples before the receive aperture opens, the scan conversion's first row), and for a few
/// millimetres when the gain or the near-field TGC is low: ultrasound QA phantoms measure this
/// "dead zone" with filaments 1 to 10 mm deep, and a pulse-echo validation fan at 6 dB less
/// gain first lit 3.8 mm below its face. A reference pixel further above is not the face.
const FACE_ABOVE_ECHO_MM: f64 = 5.0;
/// ... nor one above the near arc by more than this share of the arc's radius: some scanners
/// put the reference pixel at the fan's apex (radius 0), and a microconvex array's radius can
/// be as small as about 10 mm.
const FACE_ABOVE_ECHO_MAX_SHARE: f64 = 0.25;

/// A fitted fan's near arc moved up to the transducer face that the file declares: the
/// region's reference pixel (physical depth 0) when it lies on the fan's middle beams,
/// above the first echo by at most [`FACE_ABOVE_ECHO_MM`] and [`FACE_ABOVE_ECHO_MAX_SHARE`] of
/// the near radius. The skin is where the probe
/// touches it, not where the image first lights up. Anything else is returned unchanged.
pub fn face_at_reference(
    region: ImagingRegion,
    face_px: (f64, f64),
    mm_per_px_y: f64,
) -> ImagingRegion {
    let Some(fan) = region.fan else {
        return region;
    };
    // Pixel centres are at +0.5 in the fan's coordinates.
    let (r, t) = fan.polar(face_px.0 + 0.5, face_px.1 + 0.5);
    let span = fan.theta_right - fan.theta_left;
    let middle = (t - fan.theta_left) >= 0.25 * span && (fan.theta_right - t) >= 0.25 * span;
    let above_px = fan.r_near - r;
    let agrees = middle
        && mm_per_px_y.is_finite()
        && mm_per_px_y > 0.0
        && (0.0..=FACE_ABOVE_ECHO_MM / mm_per_px_y).contains(&above_px)
        && above_px <= FACE_ABOVE_ECHO_MAX_SHARE * fan.r_near;
    if !agrees {
        return region;
    }
    let fan = Fan { r_near: r, ..fan };
    let b = region.bounds;
    let (h, w) = region.mask.as_deref().map_or((b.y1, b.x1), |m| m.dim());
    let rendered = Array2::from_shape_fn((h, w), |(y, x)| {
        u8::from(b.contains(x, y) && fan.contains(x as f64 + 0.5, y as f64 + 0.5))
    });
    ImagingRegion {
        mask: Some(std::sync::Arc::new(rendered)),
        fan: Some(fan),
        ..region
    }
}

/// Detects the imaging area of a frame from its intensity (and colours, which count as signal).
pub fn detect_imaging_region(gray: &Array2<f32>, rgb: Option<&Array3<u8>>) -> ImagingRegion {
    let (h, w) = gray.dim();
    let whole = ImagingRegion {
        bounds: Rect::full(w, h),
        shape: RegionShape::Rectangle,
        source: RegionSource::WholeFrame,
        mask: None,
        fan: None,
    };
    let (bh, bw) = (h.div_ceil(BLOCK), w.div_ceil(BLOCK));
    if bh < 4 || bw < 4 {
        return whole;
    }
    let mut sum = Array2::<f32>::zeros((bh, bw));
    let mut count = Array2::<f32>::zeros((bh, bw));
    for ((y, x), v) in gray.indexed_iter() {
        // Strongly coloured pixels (banners, logos, annotations) are not B-mode signal.
        let coloured = rgb.is_some_and(|c| {
            chroma(c[[y, x, 0]], c[[y, x, 1]], c[[y, x, 2]]) > COLOUR_CHROMA_THRESHOLD
        });
        sum[[y / BLOCK, x / BLOCK]] += if coloured { 0.0 } else { *v };
        count[[y / BLOCK, x / BLOCK]] += 1.0;
    }
    let signal = Array2::from_shape_fn((bh, bw), |(y, x)| {
        sum[[y, x]] / count[[y, x]].max(1.0) > SIGNAL_FLOOR
    });
    let closed = erode(&dilate(&signal, CLOSE_RADIUS), CLOSE_RADIUS);
    let Some(component) = largest_component(&closed) else {
        return whole;
    };
    // Fill each row of the component between its first and last block.
    let mut filled = Array2::from_elem((bh, bw), false);
    let (mut bx0, mut by0, mut bx1, mut by1) = (bw, bh, 0, 0);
    let mut blocks = 0usize;
    let mut widths = Vec::with_capacity(bh);
    for by in 0..bh {
        let row = component.row(by);
        let first = row.iter().position(|v| *v);
        let last = row.iter().rposition(|v| *v);
        if let (Some(a), Some(b)) = (first, last) {
            for bx in a..=b {
                filled[[by, bx]] = true;
            }
            blocks += b - a + 1;
            widths.push((b - a + 1) as f64);
            bx0 = bx0.min(a);
            bx1 = bx1.max(b + 1);
            by0 = by0.min(by);
            by1 = by1.max(by + 1);
        }
    }
    let frac = blocks as f64 / (bh * bw) as f64;
    if frac < MIN_IMAGE_FRACTION {
        return whole;
    }
    let bounds = Rect {
        x0: bx0 * BLOCK,
        y0: by0 * BLOCK,
        x1: (bx1 * BLOCK).min(w),
        y1: (by1 * BLOCK).min(h),
    };
    let fill = blocks as f64 / ((bx1 - bx0) * (by1 - by0)) as f64;
    if fill >= SECTOR_FILL || !widens_with_depth(&widths) {
        return ImagingRegion {
            bounds,
            shape: RegionShape::Rectangle,
            source: RegionSource::Detected,
            mask: None,
            fan: None,
        };
    }
    let mask = Array2::from_shape_fn((h, w), |(y, x)| u8::from(filled[[y / BLOCK, x / BLOCK]]));
    fit_sector(
        gray,
        ImagingRegion {
            bounds,
            shape: RegionShape::Sector,
            source: RegionSource::Detected,
            mask: Some(std::sync::Arc::new(mask)),
            fan: None,
        },
    )
}

/// Whether a component whose rows (top to bottom) span `widths` blocks is narrower at its top
/// than at its widest, as a fan is ([`SECTOR_TOP_WIDTH`]).
fn widens_with_depth(widths: &[f64]) -> bool {
    let top = ((TOP_ROWS_SHARE * widths.len() as f64).ceil() as usize).clamp(1, widths.len());
    let widest = widths.iter().copied().fold(0.0, f64::max);
    median(widths[..top].to_vec()).is_some_and(|w| w < SECTOR_TOP_WIDTH * widest)
}

/// The rows checked against the block mask must be at least this share of the fan's height.
const MIN_CHECKED_SHARE: f64 = 0.2;

/// A pixel brighter than this is fan, not surround, when edges are refined pixel by pixel
/// (the surround of scanner screens is 0–3 even after lossy compression).
const EDGE_LEVEL: f32 = 3.5;
/// How far from the block mask's edge the pixel edge is looked for, px.
const EDGE_SEARCH: usize = 3 * BLOCK;
/// Pixels looked at inwards from a candidate edge, and how many of them must be above
/// `EDGE_LEVEL` (one bright speck outside does not make an edge; a dark speck inside does not
/// stop one).
const EDGE_RUN: usize = 8;
const EDGE_FILL: usize = 6;
/// Share of the fan's height, from the top, whose rows are used to fit the straight edges (the
/// deep field may be too dark for its edges to show, and the top rows hold the near arc).
const EDGE_ROWS: (f64, f64) = (0.15, 0.75);
/// Share of the pixels outside the fitted fan that must be dark, and of the upper half of the
/// fan that must be signal by the block mask.
const FAN_AGREEMENT: f64 = 0.95;

/// Fits the straight edges and the arcs of a sector found as a block mask, and re-renders its
/// mask at pixel precision from that geometry (the skin line is then the near arc, exactly).
/// A region whose shape does not fit a fan is returned as it was.
fn fit_sector(gray: &Array2<f32>, region: ImagingRegion) -> ImagingRegion {
    let Some(mask) = region.mask.as_deref() else {
        return region;
    };
    let Some(fan) = fit_fan(gray, mask, region.bounds) else {
        return region;
    };
    let b = region.bounds;
    let (h, w) = gray.dim();
    let rendered = Array2::from_shape_fn((h, w), |(y, x)| {
        u8::from(b.contains(x, y) && fan.contains(x as f64 + 0.5, y as f64 + 0.5))
    });
    // The fit must leave no signal outside it (the corners of the rectangle are black), and
    // the upper half of the fitted fan must be signal by the block mask (deep shadows and
    // fluid may leave dark holes lower down, which the block mask misses, so it is not
    // compared there; nor from the first row where a shadow narrows the mask, which bone
    // near the skin can put in the upper half).
    let (mut outside, mut outside_lit, mut upper, mut upper_signal) = (0usize, 0usize, 0, 0);
    let half = (b.y0 + b.height() / 2).min(first_narrowing_row(mask, b));
    if half < b.y0 + (MIN_CHECKED_SHARE * b.height() as f64) as usize {
        return region;
    }
    for y in b.y0..b.y1 {
        for x in b.x0..b.x1 {
            if rendered[[y, x]] == 0 {
                outside += 1;
                outside_lit += usize::from(gray[[y, x]] > EDGE_LEVEL);
            } else if y < half {
                upper += 1;
                upper_signal += usize::from(mask[[y, x]] != 0);
            }
        }
    }
    if (outside_lit as f64) > (1.0 - FAN_AGREEMENT) * outside.max(1) as f64
        || (upper_signal as f64) < FAN_AGREEMENT * upper.max(1) as f64
    {
        return region;
    }
    ImagingRegion {
        mask: Some(std::sync::Arc::new(rendered)),
        fan: Some(fan),
        ..region
    }
}

/// The first pixel from `from`, walking up (or down) within `[lo, hi)`, where the fan begins:
/// at least `EDGE_FILL` of the `EDGE_RUN` pixels from it inwards are above `EDGE_LEVEL` (dark
/// speckle inside the fan may touch 0 here and there; the surround is 0 throughout).
fn edge_in(
    at: impl Fn(usize) -> f32,
    from: usize,
    lo: usize,
    hi: usize,
    up: bool,
) -> Option<usize> {
    let mut i = from;
    loop {
        if i < lo || i >= hi {
            return None;
        }
        if at(i) > EDGE_LEVEL {
            let lit = (0..EDGE_RUN)
                .filter(|k| {
                    let j = if up { i + k } else { i.wrapping_sub(*k) };
                    j >= lo && j < hi && at(j) > EDGE_LEVEL
                })
                .count();
            if lit >= EDGE_FILL {
                return Some(i);
            }
        }
        i = if up { i + 1 } else { i.checked_sub(1)? };
    }
}

/// Robust line x = a + b·y through `pts` (y, x): Theil–Sen (the median of pairwise slopes of
/// points well apart, then the median intercept), so stray edge points do not tilt it.
fn fit_line(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len();
    if n < 8 {
        return None;
    }
    let apart = n / 4;
    let mut slopes = Vec::with_capacity(n * n / 4);
    for i in 0..n {
        for j in (i + apart)..n {
            let dy = pts[j].0 - pts[i].0;
            if dy != 0.0 {
                slopes.push((pts[j].1 - pts[i].1) / dy);
            }
        }
    }
    let b = median(slopes)?;
    let a = median(pts.iter().map(|(y, x)| x - b * y).collect())?;
    Some((a, b))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let k = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    Some(*m)
}

/// The fan's geometry from its block mask and the pixels: edges refined to the pixel in each
/// row and fitted as lines (their crossing is the apex), arcs as the median radius of the top
/// and bottom edges of the middle columns.
fn fit_fan(gray: &Array2<f32>, mask: &Array2<u8>, b: Rect) -> Option<Fan> {
    let (h, w) = gray.dim();
    if b.x1 > w || b.y1 > h || b.height() < 16 || b.width() < 16 {
        return None;
    }
    let (mut left, mut right) = (Vec::new(), Vec::new());
    // A fan's sides move outwards with depth. A side point further in than the outermost one
    // above it (by more than a block) is where a shadow's black reaches the side (bone across
    // the field), not the fan's edge.
    let (mut outer_left, mut outer_right) = (f64::INFINITY, f64::NEG_INFINITY);
    let rows = (
        b.y0 + (EDGE_ROWS.0 * b.height() as f64) as usize,
        b.y0 + (EDGE_ROWS.1 * b.height() as f64) as usize,
    );
    for y in rows.0..rows.1 {
        let row = |x: usize| gray[[y, x]];
        let inside = |x: &usize| mask[[y, *x]] != 0;
        let (Some(first), Some(last)) =
            ((b.x0..b.x1).find(inside), (b.x0..b.x1).rev().find(inside))
        else {
            continue;
        };
        // Refine within a few blocks either side of the block edge (closing and row filling
        // can move it by more than one block).
        let lo = first.saturating_sub(EDGE_SEARCH).max(b.x0);
        // An edge on the rectangle's side is the rectangle's, not the fan's (a fan wider
        // than its region is cut there).
        if let Some(x) =
            edge_in(row, lo, lo, (first + EDGE_SEARCH).min(b.x1), true).filter(|x| *x > b.x0 + 1)
        {
            let x = x as f64;
            if x <= outer_left + BLOCK as f64 {
                left.push((y as f64, x));
            }
            outer_left = outer_left.min(x);
        }
        let hi = (last + EDGE_SEARCH + 1).min(b.x1);
        if let Some(x) = edge_in(
            row,
            hi - 1,
            last.saturating_sub(EDGE_SEARCH).max(b.x0),
            hi,
            false,
        )
        .filter(|x| *x + 2 < b.x1)
        {
            let x = x as f64 + 1.0;
            if x >= outer_right - BLOCK as f64 {
                right.push((y as f64, x));
            }
            outer_right = outer_right.max(x);
        }
    }
    let (al, bl) = fit_line(&left)?;
    let (ar, br) = fit_line(&right)?;
    // The edges must open downwards and meet above the middle of the fan.
    if br - bl < 0.05 {
        return None;
    }
    let ay = (al - ar) / (br - bl);
    let ax = al + bl * ay;
    if ay >= rows.0 as f64 {
        return None;
    }
    let (theta_left, theta_right) = (bl.atan(), br.atan());
    let span = theta_right - theta_left;
    let (mut near, mut far) = (Vec::new(), Vec::new());
    for x in b.x0..b.x1 {
        let col = |y: usize| gray[[y, x]];
        let top = (b.y0..b.y1).find(|y| mask[[*y, x]] != 0);
        let bottom = (b.y0..b.y1).rev().find(|y| mask[[*y, x]] != 0);
        let (Some(top), Some(bottom)) = (top, bottom) else {
            continue;
        };
        let t = (x as f64 + 0.5 - ax).atan2(top as f64 - ay);
        // Middle columns only: near the edges the arc meets the straight sides.
        if (t - theta_left) < 0.2 * span || (theta_right - t) < 0.2 * span {
            continue;
        }
        let lo = top.saturating_sub(EDGE_SEARCH).max(b.y0);
        // Row filling of the block mask squares off the arc: its top row spans the whole
        // fan, so the arc is looked for down to a third of the fan's height.
        let hi = (top + EDGE_SEARCH.max(b.height() / 3)).min(b.y1);
        if let Some(y) = edge_in(col, lo, lo, hi, true) {
            near.push((x as f64 + 0.5 - ax).hypot(y as f64 - ay));
        }
        // The block mask's bottom, refined to the last lit pixel near it (the run of lit
        // pixels that confirms an edge may reach above the search).
        let lo = bottom.saturating_sub(EDGE_SEARCH + EDGE_RUN).max(b.y0);
        let hi = (bottom + EDGE_SEARCH + 1).min(b.y1);
        let end = edge_in(col, hi - 1, lo, hi, false).unwrap_or(bottom);
        far.push((x as f64 + 0.5 - ax).hypot(end as f64 + 1.0 - ay));
    }
    let r_near = median(near)?;
    let mut r_far = deepest_cluster(far)?;
    // Where bone spans most of the field its shadow may be black to the bottom in nearly every
    // middle column; the deepest lit shell of the fan (the gap of a joint, clutter) then shows
    // where the image really ends.
    if let Some(r) = deepest_lit_shell(gray, b, [ax, ay], (al, bl), (ar, br)) {
        if r > r_far + FAR_ARC_SPREAD {
            r_far = r;
        }
    }
    (r_far > r_near).then_some(Fan {
        apex: [ax, ay],
        r_near,
        r_far,
        theta_left,
        theta_right,
    })
}

/// Far-arc radii within this of the deepest (px) count as the far arc (dark speckle in the
/// far field moves a column's last lit pixel by a few pixels).
const FAR_ARC_SPREAD: f64 = 2.0 * BLOCK as f64;
/// Fewest middle columns (and share of them) that must reach the far arc: one stray column
/// does not move it.
const FAR_ARC_MIN_COLUMNS: (usize, f64) = (3, 0.05);

/// The far arc's radius from the radii where the block mask ends in each middle column: the
/// median of the deepest cluster of them (at least [`FAR_ARC_MIN_COLUMNS`] within
/// [`FAR_ARC_SPREAD`]). A column under bone ends where its shadow turns black, above the
/// arc, so the plain median would put the arc under the bone wherever bone spans most of the
/// field.
fn deepest_cluster(mut radii: Vec<f64>) -> Option<f64> {
    radii.retain(|r| r.is_finite());
    radii.sort_by(|a, b| b.total_cmp(a));
    let n = radii.len();
    let k = FAR_ARC_MIN_COLUMNS
        .0
        .max((FAR_ARC_MIN_COLUMNS.1 * n as f64).ceil() as usize)
        .min(n.max(1));
    let start =
        (0..n.checked_sub(k - 1)?).find(|&i| radii[i] - radii[i + k - 1] <= FAR_ARC_SPREAD)?;
    let top = radii[start];
    median(
        radii[start..]
            .iter()
            .copied()
            .take_while(|r| top - r <= FAR_ARC_SPREAD)
            .collect(),
    )
}

/// Share of a one-pixel shell of the fan (and fewest pixels) that must be lit for
/// [`deepest_lit_shell`] to count it as image: beyond the far arc the surround is black
/// (0–3); a joint gap's beams under bone-wide shadow light a few percent of a shell.
const LIT_SHELL: (f64, usize) = (0.01, 3);

/// The outer radius (px from `apex`) of the deepest one-pixel shell between the fan's sides
/// (lines x = a + b·y) in which at least [`LIT_SHELL`] of the pixels are lit.
fn deepest_lit_shell(
    gray: &Array2<f32>,
    b: Rect,
    apex: [f64; 2],
    left: (f64, f64),
    right: (f64, f64),
) -> Option<f64> {
    let far = (b.y1 as f64 - apex[1])
        .hypot(
            (b.x0 as f64 - apex[0])
                .abs()
                .max((b.x1 as f64 - apex[0]).abs()),
        )
        .ceil();
    // An apex so far above the box (nearly parallel sides) that the shells would outnumber
    // a few times the box's perimeter: no shell count to trust, so the caller's estimate
    // stands (a capped last shell would hold every pixel beyond the cap).
    if !far.is_finite()
        || far <= 0.0
        || far > MAX_SHELLS_PER_PERIMETER * (b.width() + b.height()) as f64
    {
        return None;
    }
    let shells = far as usize + 1;
    let (mut total, mut lit) = (vec![0usize; shells], vec![0usize; shells]);
    for y in b.y0..b.y1 {
        let (py, fy) = (y as f64 + 0.5, y as f64 + 0.5 - apex[1]);
        if fy <= 0.0 {
            continue;
        }
        for x in b.x0..b.x1 {
            let px = x as f64 + 0.5;
            if px < left.0 + left.1 * py || px > right.0 + right.1 * py {
                continue;
            }
            let k = ((px - apex[0]).hypot(fy) as usize).min(shells - 1);
            total[k] += 1;
            lit[k] += usize::from(gray[[y, x]] > EDGE_LEVEL);
        }
    }
    // Outwards from the apex, up to the first run of unlit shells wider than a gap that
    // text or a scale beneath the fan would leave.
    let mut last = None;
    for k in 0..shells {
        if lit[k] >= LIT_SHELL.1 && lit[k] as f64 >= LIT_SHELL.0 * total[k] as f64 {
            last = Some(k);
        } else if last.is_some_and(|l| k - l > SHELL_GAP) {
            break;
        }
    }
    last.map(|k| k as f64 + 1.0)
}

/// The most shells [`deepest_lit_shell`] counts, per pixel of the box's half-perimeter.
const MAX_SHELLS_PER_PERIMETER: f64 = 8.0;

/// Unlit shells (px) that end the image in [`deepest_lit_shell`]: a dark stretch of the far
/// field is narrower; the black between a fan and a label under it is wider.
const SHELL_GAP: usize = 2 * BLOCK;

/// The first pixel row of a block mask (within `b`) narrower than the widest row above it
/// by more than two blocks: a shadow (or the fan's end); `b.y1` when there is none.
fn first_narrowing_row(mask: &Array2<u8>, b: Rect) -> usize {
    let mut widest = 0;
    for y in b.y0..b.y1 {
        let row = mask.row(y);
        let first = (b.x0..b.x1).find(|&x| row[x] != 0);
        let last = (b.x0..b.x1).rev().find(|&x| row[x] != 0);
        let width = match (first, last) {
            (Some(a), Some(l)) => l + 1 - a,
            _ => 0,
        };
        if width + 2 * BLOCK < widest {
            return y;
        }
        widest = widest.max(width);
    }
    b.y1
}

fn dilate(m: &Array2<bool>, r: usize) -> Array2<bool> {
    let (h, w) = m.dim();
    Array2::from_shape_fn((h, w), |(y, x)| {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
        let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(w));
        (y0..y1).any(|yy| (x0..x1).any(|xx| m[[yy, xx]]))
    })
}

fn erode(m: &Array2<bool>, r: usize) -> Array2<bool> {
    let (h, w) = m.dim();
    Array2::from_shape_fn((h, w), |(y, x)| {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
        let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(w));
        (y0..y1).all(|yy| (x0..x1).all(|xx| m[[yy, xx]]))
    })
}

/// The largest 4-connected component of `m`, or `None` if `m` is empty.
pub(crate) fn largest_component(m: &Array2<bool>) -> Option<Array2<bool>> {
    let (h, w) = m.dim();
    let mut label = Array2::<u32>::zeros((h, w));
    let mut best = (0u32, 0usize);
    let mut next = 0u32;
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if !m[[y, x]] || label[[y, x]] != 0 {
                continue;
            }
            next += 1;
            let mut size = 0usize;
            label[[y, x]] = next;
            stack.push((y, x));
            while let Some((cy, cx)) = stack.pop() {
                size += 1;
                let mut visit = |ny: usize, nx: usize| {
                    if m[[ny, nx]] && label[[ny, nx]] == 0 {
                        label[[ny, nx]] = next;
                        stack.push((ny, nx));
                    }
                };
                if cy > 0 {
                    visit(cy - 1, cx);
                }
                if cy + 1 < h {
                    visit(cy + 1, cx);
                }
                if cx > 0 {
                    visit(cy, cx - 1);
                }
                if cx + 1 < w {
                    visit(cy, cx + 1);
                }
            }
            if size > best.1 {
                best = (next, size);
            }
        }
    }
    (best.1 > 0).then(|| label.mapv(|l| l == best.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_fan_and_ignores_text() {
        let (h, w) = (200, 300);
        let mut g = Array2::<f32>::zeros((h, w));
        // A fan with apex at (150, 10), 40° half angle, radii 20..180.
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f32 - 150.0, y as f32 - 10.0);
                let r = (dx * dx + dy * dy).sqrt();
                let a = dx.atan2(dy).to_degrees();
                if (20.0..180.0).contains(&r) && a.abs() < 40.0 {
                    g[[y, x]] = 60.0 + ((x * 7 + y * 13) % 50) as f32;
                }
            }
        }
        // "Text" in the corner.
        for y in 5..12 {
            for x in 5..40 {
                if x % 3 != 0 {
                    g[[y, x]] = 255.0;
                }
            }
        }
        let r = detect_imaging_region(&g, None);
        assert_eq!(r.shape, RegionShape::Sector);
        assert_eq!(r.source, RegionSource::Detected);
        // The fan starts at row 25; the text (rows 5..12) must not pull the bounds up.
        assert!(r.bounds.y0 > 12 && r.bounds.x0 >= 30, "{:?}", r.bounds);
        assert!(r.contains(150, 100));
        assert!(!r.contains(20, 190));
        // The fan is fitted: apex, near radius and edge angles to within a pixel / a degree.
        let fan = r.fan.expect("a fitted fan");
        assert!((fan.apex[0] - 150.0).abs() < FIT_PX, "{fan:?}");
        assert!((fan.apex[1] - 10.0).abs() < FIT_PX, "{fan:?}");
        assert!((fan.r_near - 20.0).abs() < FIT_PX, "{fan:?}");
        assert!((fan.r_far - 180.0).abs() < FIT_PX, "{fan:?}");
        assert!((fan.theta_right.to_degrees() - 40.0).abs() < 1.0, "{fan:?}");
        assert!((fan.theta_left.to_degrees() + 40.0).abs() < 1.0, "{fan:?}");
    }

    /// A fitted fan's apex and radii must be this close to the drawn one, px (edges are found
    /// to the pixel in every row; the lines through them average that out).
    const FIT_PX: f64 = 1.0;

    /// Speckle-like texture (grey 60–109) for synthetic images.
    fn texture(x: usize, y: usize) -> f32 {
        60.0 + ((x * 7 + y * 13) % 50) as f32
    }

    /// A joint seen by a linear probe: tissue across the whole width at the top, bone at row
    /// `bone` on both sides of a gap (columns 130..170) with black shadows beneath.
    fn linear_joint(h: usize, w: usize, bone: usize) -> Array2<f32> {
        Array2::from_shape_fn((h, w), |(y, x)| {
            if y < bone || (130..170).contains(&x) {
                texture(x, y)
            } else if y < bone + 3 {
                250.0
            } else {
                0.0
            }
        })
    }

    #[test]
    fn a_linear_image_with_black_shadows_is_a_rectangle() {
        // The black corners under the bone fill more than a tenth of the bounding box, as a
        // fan's do, but the image is as wide at the skin as at its widest: no fan.
        let g = linear_joint(240, 300, 100);
        let r = detect_imaging_region(&g, None);
        assert_eq!(r.shape, RegionShape::Rectangle, "{:?}", r.bounds);
        assert!(r.mask.is_none() && r.contains(20, 200) && r.contains(280, 230));
        let declared = ImagingRegion {
            bounds: Rect::full(300, 240),
            shape: RegionShape::Rectangle,
            source: RegionSource::UltrasoundRegion,
            mask: None,
            fan: None,
        };
        let r = fan_within(&declared, &g, None);
        assert_eq!(r.shape, RegionShape::Rectangle);
        assert!(r.mask.is_none());
    }

    #[test]
    fn a_fan_with_bone_across_it_keeps_its_far_arc() {
        // A fan (apex (150, -60), half angle 30°, radii 70..300) with bone at radius 170 on
        // both sides of a narrow gap and black shadow beneath it to the far arc: the block
        // mask ends at the bone in nearly every column.
        let (h, w) = (245, 300);
        let g = Array2::from_shape_fn((h, w), |(y, x)| {
            let (dx, dy) = (x as f64 - 150.0, y as f64 + 60.0);
            let (r, a) = (dx.hypot(dy), dx.atan2(dy).to_degrees());
            if !(70.0..300.0).contains(&r) || a.abs() >= 30.0 {
                0.0
            } else if r < 170.0 || a.abs() < 2.5 {
                texture(x, y)
            } else if r < 173.0 {
                250.0
            } else {
                0.0
            }
        });
        let r = detect_imaging_region(&g, None);
        assert_eq!(r.shape, RegionShape::Sector);
        let fan = r.fan.expect("a fitted fan despite the shadow");
        assert!((fan.r_far - 300.0).abs() < 2.0, "{fan:?}");
        assert!((fan.apex[0] - 150.0).abs() < FIT_PX, "{fan:?}");
        assert!((fan.theta_left.to_degrees() + 30.0).abs() < 1.0, "{fan:?}");
        // The shadow beneath the bone, well inside the fan, is image.
        assert!(r.contains(100, 200) && r.contains(200, 200), "{fan:?}");
    }

    #[test]
    fn shells_are_not_counted_from_an_apex_far_above_the_box() {
        // Sides nearly parallel: the apex lies 100 000 px above a 100x80 box. Counting shells
        // from there would need 100 000 of them; the estimate is refused instead of capped.
        let g = Array2::from_elem((80, 100), 200.0f32);
        let b = Rect {
            x0: 0,
            y0: 0,
            x1: 100,
            y1: 80,
        };
        let apex = [50.0, -100_000.0];
        let (left, right) = ((-1.0, 0.0), (101.0, 0.0));
        assert_eq!(deepest_lit_shell(&g, b, apex, left, right), None);
        // From an apex just above the box the lit image ends at its bottom row.
        let near = deepest_lit_shell(&g, b, [50.0, -10.0], left, right).expect("shells");
        assert!(near >= 90.0 && near <= 50f64.hypot(90.0) + 1.0, "{near}");
    }

    /// A sector region declared by an ultrasound region over a `size`-square frame.
    fn declared_sector(fan: Fan, size: usize) -> ImagingRegion {
        ImagingRegion {
            bounds: Rect::full(size, size),
            shape: RegionShape::Sector,
            source: RegionSource::UltrasoundRegion,
            mask: None,
            fan: Some(fan),
        }
    }

    #[test]
    fn the_declared_face_moves_the_near_arc_only_when_it_agrees_with_the_image() {
        let fan = Fan {
            apex: [150.0, -100.0],
            r_near: 130.0,
            r_far: 400.0,
            theta_left: -0.5,
            theta_right: 0.5,
        };
        let region = declared_sector(fan, 300);
        let near = |r: &ImagingRegion| r.fan.map(|f| f.r_near);
        // Face 4 px (0.8 mm at 0.2 mm/px) above the first echo, on the centre beam: taken.
        // (Pixel (149.5, 25.5) has its centre at (150, 26): radius 126.)
        let moved = face_at_reference(region.clone(), (149.5, 25.5), 0.2);
        assert!(
            (near(&moved).unwrap_or(0.0) - 126.0).abs() < 1e-9,
            "{moved:?}"
        );
        let mask = moved.mask.as_deref().expect("re-rendered mask");
        assert_eq!(mask[[27, 150]], 1, "the near strip is inside the fan now");
        assert_eq!(mask[[24, 150]], 0, "above the face is not");
        // Face 15 px (3 mm) above: a dark near field (low gain); taken.
        let moved = face_at_reference(region.clone(), (149.5, 14.5), 0.2);
        assert!(
            (near(&moved).unwrap_or(0.0) - 115.0).abs() < 1e-9,
            "{moved:?}"
        );
        // Too far above (6.2 mm), at the apex, below the echo, or off the middle beams: kept.
        for face in [(149.5, -1.5), (149.5, -100.5), (149.5, 35.5), (250.0, 60.0)] {
            assert_eq!(
                near(&face_at_reference(region.clone(), face, 0.2)),
                Some(130.0),
                "{face:?}"
            );
        }
    }

    #[test]
    fn a_face_far_above_a_small_radius_is_not_taken() {
        // Radius 40 px at 0.1 mm/px (4 mm): 12 px (1.2 mm) above the arc is within 5 mm but
        // more than a quarter of the radius; 8 px is within both.
        let fan = Fan {
            apex: [100.0, 0.0],
            r_near: 40.0,
            r_far: 200.0,
            theta_left: -0.5,
            theta_right: 0.5,
        };
        let region = declared_sector(fan, 200);
        let near = |r: &ImagingRegion| r.fan.map(|f| f.r_near);
        assert_eq!(
            near(&face_at_reference(region.clone(), (99.5, 27.5), 0.1)),
            Some(40.0)
        );
        assert_eq!(
            near(&face_at_reference(region, (99.5, 31.5), 0.1)),
            Some(32.0)
        );
    }

    #[test]
    fn a_black_frame_is_the_whole_frame() {
        let g = Array2::<f32>::zeros((64, 64));
        assert_eq!(
            detect_imaging_region(&g, None).source,
            RegionSource::WholeFrame
        );
    }
}
