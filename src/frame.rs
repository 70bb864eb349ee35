//! One ultrasound frame as the pipeline sees it: B-mode intensity, the displayed colours, a
//! colour mask, the imaging region, and the physical calibration.

use ndarray::Array2;
use serde::Serialize;

/// Errors of frame construction from caller-given pixels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The pixels, size or image given do not make a frame.
    #[error("invalid frame ({name}): {reason}")]
    Invalid {
        /// What was wrong: `pixels`, `image`.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

/// Chroma (max − min of R, G, B, on 0–255) above which a pixel counts as colour: Doppler flow or a
/// coloured annotation. Grey B-mode pixels of lossy JPEG cines carry chroma noise of a few levels
/// (the corpus YBR cine peaks near 10), so the threshold sits well above that.
pub const COLOUR_CHROMA_THRESHOLD: u8 = 40;

/// An axis-aligned pixel rectangle, `x0..x1` by `y0..y1` (end exclusive), in full-frame
/// column/row coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rect {
    /// First column.
    pub x0: usize,
    /// First row.
    pub y0: usize,
    /// One past the last column.
    pub x1: usize,
    /// One past the last row.
    pub y1: usize,
}

impl Rect {
    /// The whole of a `width` × `height` image.
    pub fn full(width: usize, height: usize) -> Self {
        Rect {
            x0: 0,
            y0: 0,
            x1: width,
            y1: height,
        }
    }
    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.x1.saturating_sub(self.x0)
    }
    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.y1.saturating_sub(self.y0)
    }
    /// Whether pixel (x, y) lies inside.
    pub fn contains(&self, x: usize, y: usize) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

/// Where the imaging region came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionSource {
    /// An item of the Sequence of Ultrasound Regions (0018,6011).
    UltrasoundRegion,
    /// Found from the pixels (no usable region in the header).
    Detected,
    /// The whole frame (nothing better was found).
    WholeFrame,
}

/// The shape of the imaging area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionShape {
    /// A rectangle (linear array).
    Rectangle,
    /// A fan (curved or phased array): only the pixels of `mask` are image.
    Sector,
}

/// The part of the frame that holds the B-mode image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagingRegion {
    /// Bounding rectangle in full-frame pixels.
    pub bounds: Rect,
    /// Rectangle or fan.
    pub shape: RegionShape,
    /// Where the region came from.
    pub source: RegionSource,
    /// For a sector: 1 inside the fan, 0 outside (full-frame size). `None` for a rectangle.
    /// Shared: every frame of a file has the same region, so reading a frame does not copy it.
    pub mask: Option<std::sync::Arc<Array2<u8>>>,
    /// For a sector whose edges and arcs were fitted: its geometry (the skin line is the near
    /// arc, depth runs along the beam). `None` for a rectangle or a fan of no clear shape.
    pub fan: Option<Fan>,
}

/// The geometry of a convex (or phased) array's fan, in full-frame pixels: the centre of its
/// arcs (the apex, usually above the image), the radii of the near arc (the probe face, where
/// the skin is) and of the far arc, and the angles of its two straight edges measured from
/// straight down (radians, left negative).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fan {
    /// Centre of the arcs (column, row).
    pub apex: [f64; 2],
    /// Radius of the near arc, px.
    pub r_near: f64,
    /// Radius of the far arc, px.
    pub r_far: f64,
    /// Angle of the left edge from straight down, radians (negative).
    pub theta_left: f64,
    /// Angle of the right edge, radians.
    pub theta_right: f64,
}

impl Fan {
    /// Radius and angle (from straight down, left negative) of pixel position (x, y).
    pub fn polar(&self, x: f64, y: f64) -> (f64, f64) {
        let (dx, dy) = (x - self.apex[0], y - self.apex[1]);
        (dx.hypot(dy), dx.atan2(dy))
    }
    /// The pixel position at radius `r` and angle `theta`.
    pub fn point(&self, r: f64, theta: f64) -> [f64; 2] {
        [
            self.apex[0] + r * theta.sin(),
            self.apex[1] + r * theta.cos(),
        ]
    }
    /// Whether (x, y) lies inside the fan.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let (r, t) = self.polar(x, y);
        r >= self.r_near && r <= self.r_far && t >= self.theta_left && t <= self.theta_right
    }
}

impl ImagingRegion {
    /// Whether pixel (x, y) is part of the image.
    pub fn contains(&self, x: usize, y: usize) -> bool {
        if !self.bounds.contains(x, y) {
            return false;
        }
        match &self.mask {
            Some(m) => m.get((y, x)).is_some_and(|v| *v != 0),
            None => true,
        }
    }
}

/// Where a calibration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationSource {
    /// Physical deltas of an ultrasound region.
    UltrasoundRegion,
    /// Pixel Spacing (0028,0030).
    PixelSpacing,
    /// Imager Pixel Spacing (0018,1164).
    ImagerPixelSpacing,
    /// Set by the caller (raw buffers, phantoms).
    Given,
}

/// Physical size of a pixel, when it is known and believable.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Calibration {
    /// Usable millimetres per pixel.
    Ok {
        /// Millimetres per pixel along a row (lateral).
        mm_per_px_x: f64,
        /// Millimetres per pixel down a column (axial, depth).
        mm_per_px_y: f64,
        /// The pixel whose physical coordinate is (0, 0): depth 0 at the transducer face.
        /// Full-frame column and row.
        reference_px: Option<(f64, f64)>,
        /// Where it came from.
        source: CalibrationSource,
    },
    /// The file gives no calibration.
    Missing,
    /// The file gives one, but it cannot be used (zero, negative, non-finite, wrong units …).
    Unusable {
        /// Why it was refused.
        reason: String,
    },
}

impl Calibration {
    /// `"ok"`, `"missing"` or `"unusable"`.
    pub fn status(&self) -> &'static str {
        match self {
            Calibration::Ok { .. } => "ok",
            Calibration::Missing => "missing",
            Calibration::Unusable { .. } => "unusable",
        }
    }

    /// Millimetres per pixel (x, y), if usable.
    pub fn mm_per_px(&self) -> Option<(f64, f64)> {
        match self {
            Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                ..
            } => Some((*mm_per_px_x, *mm_per_px_y)),
            _ => None,
        }
    }

    /// Converts a full-frame pixel position to millimetres: x lateral from the reference
    /// pixel, y depth from the transducer face (the reference row, or `top_row` if the file
    /// gives no reference pixel).
    pub fn px_to_mm(&self, x: f64, y: f64, top_row: f64) -> Option<(f64, f64)> {
        match self {
            Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                reference_px,
                ..
            } => {
                let (rx, ry) = reference_px.unwrap_or((0.0, top_row));
                Some(((x - rx) * mm_per_px_x, (y - ry) * mm_per_px_y))
            }
            _ => None,
        }
    }

    /// Inverse of [`Calibration::px_to_mm`].
    pub fn mm_to_px(&self, x_mm: f64, y_mm: f64, top_row: f64) -> Option<(f64, f64)> {
        match self {
            Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                reference_px,
                ..
            } => {
                let (rx, ry) = reference_px.unwrap_or((0.0, top_row));
                Some((x_mm / mm_per_px_x + rx, y_mm / mm_per_px_y + ry))
            }
            _ => None,
        }
    }
}

/// Checks a pair of millimetre-per-pixel values and returns why they are unusable, if they are.
pub fn check_spacing_mm(x: f64, y: f64) -> Option<String> {
    // Ultrasound pixels range from a few micrometres (high-frequency probes, zoomed) to about a
    // millimetre (deep abdominal scans); outside 1 µm..10 mm a value is a header error.
    const MIN_MM: f64 = 1e-3;
    const MAX_MM: f64 = 10.0;
    for (axis, v) in [("x", x), ("y", y)] {
        if !v.is_finite() {
            return Some(format!("mm per pixel along {axis} is not finite ({v})"));
        }
        if v <= 0.0 {
            return Some(format!("mm per pixel along {axis} is not positive ({v})"));
        }
        if !(MIN_MM..=MAX_MM).contains(&v) {
            return Some(format!("mm per pixel along {axis} is implausible ({v} mm)"));
        }
    }
    None
}

/// One frame of ultrasound, ready for the kernels.
#[derive(Debug, Clone)]
pub struct Frame {
    /// B-mode intensity, `[row, column]`, 0–255 (luma of the displayed RGB for colour
    /// sources; 16-bit greyscale is scaled by its bits stored).
    pub intensity: Array2<f32>,
    /// Displayed RGB, `[row, column, channel]`, where the source is colour.
    pub rgb: Option<ndarray::Array3<u8>>,
    /// 1 where the pixel's chroma marks Doppler flow or a coloured annotation; such pixels are
    /// kept out of segmentation. `None` for greyscale sources.
    pub colour_mask: Option<Array2<u8>>,
    /// The imaging region.
    pub region: ImagingRegion,
    /// Physical calibration.
    pub calibration: Calibration,
    /// Zero-based frame number within its source.
    pub index: usize,
}

impl Frame {
    /// Checks the invariants every part of the pipeline relies on: a non-empty intensity of
    /// finite values; RGB, colour mask and fan mask of the frame's size; an imaging region that
    /// is non-empty and inside the frame; a usable calibration's spacing finite and plausible.
    /// Every constructor checks them, and the pipeline checks again on entry, because the
    /// fields are public and a caller may change them.
    pub fn validate(&self) -> Result<(), FrameError> {
        self.check_layout()?;
        let bad = |name: &'static str, reason: String| Err(FrameError::Invalid { name, reason });
        let w = self.intensity.ncols();
        // Fast path: a finite sum means finite values (0–255 over any frame size cannot
        // overflow f32); only otherwise look for the culprit.
        let first_bad = if self.intensity.sum().is_finite() {
            None
        } else {
            self.intensity
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
        };
        if let Some((i, v)) = first_bad {
            return bad(
                "intensity",
                format!("{v} at column {}, row {}", i % w, i / w),
            );
        }
        Ok(())
    }

    /// The structural half of [`Frame::validate`], in constant time: sizes, region and masks
    /// agree and the spacing is plausible; the pixel values are not looked at. For stages
    /// after the pipeline's entry, where the full check has run on this frame already.
    pub fn check_layout(&self) -> Result<(), FrameError> {
        let bad = |name: &'static str, reason: String| Err(FrameError::Invalid { name, reason });
        let (h, w) = self.intensity.dim();
        if h == 0 || w == 0 {
            return bad("intensity", format!("empty ({w}x{h})"));
        }
        if let Some(rgb) = &self.rgb {
            if rgb.dim() != (h, w, 3) {
                return bad("rgb", format!("{:?} for a {w}x{h} frame", rgb.dim()));
            }
        }
        if let Some(m) = &self.colour_mask {
            if m.dim() != (h, w) {
                return bad("colour_mask", format!("{:?} for a {w}x{h} frame", m.dim()));
            }
        }
        let b = self.region.bounds;
        if b.x0 >= b.x1 || b.y0 >= b.y1 || b.x1 > w || b.y1 > h {
            return bad(
                "region",
                format!(
                    "({},{})-({},{}) is empty or outside the {w}x{h} frame",
                    b.x0, b.y0, b.x1, b.y1
                ),
            );
        }
        if let Some(m) = &self.region.mask {
            if m.dim() != (h, w) {
                return bad("region mask", format!("{:?} for a {w}x{h} frame", m.dim()));
            }
        }
        if let Calibration::Ok {
            mm_per_px_x,
            mm_per_px_y,
            ..
        } = &self.calibration
        {
            if let Some(reason) = check_spacing_mm(*mm_per_px_x, *mm_per_px_y) {
                return bad("calibration", reason);
            }
        }
        Ok(())
    }

    /// Width in pixels (columns).
    pub fn width(&self) -> usize {
        self.intensity.ncols()
    }
    /// Height in pixels (rows).
    pub fn height(&self) -> usize {
        self.intensity.nrows()
    }

    /// Builds a frame from an 8-bit greyscale buffer (row-major), with the whole frame as a
    /// rectangular imaging region and the given calibration.
    pub fn from_gray8(
        width: usize,
        height: usize,
        pixels: &[u8],
        calibration: Calibration,
    ) -> crate::Result<Frame> {
        if width == 0 || height == 0 || pixels.len() != width * height {
            return Err(crate::frame::FrameError::Invalid {
                name: "pixels",
                reason: format!(
                    "{} bytes do not make a {width}x{height} greyscale frame",
                    pixels.len()
                ),
            }
            .into());
        }
        let intensity =
            Array2::from_shape_fn((height, width), |(y, x)| pixels[y * width + x] as f32);
        Frame {
            intensity,
            rgb: None,
            colour_mask: None,
            region: ImagingRegion {
                bounds: Rect::full(width, height),
                shape: RegionShape::Rectangle,
                source: RegionSource::WholeFrame,
                mask: None,
                fan: None,
            },
            calibration,
            index: 0,
        }
        .validated()
    }

    /// The frame if it is valid.
    fn validated(self) -> crate::Result<Frame> {
        self.validate()?;
        Ok(self)
    }

    /// Builds a frame from a 16-bit greyscale buffer (row-major), scaled to 0–255 by
    /// `bits_stored`, with `mm_per_px` (x, y) as its calibration (depth 0 at the top row).
    pub fn from_gray16(
        width: usize,
        height: usize,
        pixels: &[u16],
        bits_stored: u32,
        mm_per_px: (f64, f64),
    ) -> crate::Result<Frame> {
        if width == 0
            || height == 0
            || pixels.len() != width * height
            || !(1..=16).contains(&bits_stored)
        {
            return Err(crate::frame::FrameError::Invalid {
                name: "pixels",
                reason: format!(
                    "{} samples of {bits_stored} bits do not make a {width}x{height} frame",
                    pixels.len()
                ),
            }
            .into());
        }
        let max = ((1u32 << bits_stored) - 1) as f32;
        let mut f = Frame::from_gray8(width, height, &vec![0u8; width * height], given(mm_per_px))?;
        f.intensity = Array2::from_shape_fn((height, width), |(y, x)| {
            (pixels[y * width + x] as f32).min(max) / max * 255.0
        });
        f.validated()
    }

    /// Builds a frame from an `image` crate image (colour images keep their RGB and get a
    /// colour mask), calibrated at `mm_per_px` (x, y).
    pub fn from_image(img: &image::DynamicImage, mm_per_px: (f64, f64)) -> crate::Result<Frame> {
        let rgb = img.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let grey = img.color().channel_count() < 3;
        let grey8: Vec<u8> = rgb
            .pixels()
            .map(|p| luma(p.0[0], p.0[1], p.0[2]).round().clamp(0.0, 255.0) as u8)
            .collect();
        let mut f = Frame::from_gray8(w, h, &grey8, given(mm_per_px))?;
        if !grey {
            let arr = ndarray::Array3::from_shape_vec((h, w, 3), rgb.into_raw()).map_err(|e| {
                crate::frame::FrameError::Invalid {
                    name: "image",
                    reason: e.to_string(),
                }
            })?;
            f.intensity = Array2::from_shape_fn((h, w), |(y, x)| {
                luma(arr[[y, x, 0]], arr[[y, x, 1]], arr[[y, x, 2]])
            });
            f.colour_mask = Some(Array2::from_shape_fn((h, w), |(y, x)| {
                u8::from(
                    chroma(arr[[y, x, 0]], arr[[y, x, 1]], arr[[y, x, 2]])
                        > COLOUR_CHROMA_THRESHOLD,
                )
            }));
            f.rgb = Some(arr);
        }
        f.validated()
    }

    /// The intensity as 8-bit grey (rounded, clamped).
    pub fn gray8(&self) -> Vec<u8> {
        self.intensity
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect()
    }

    /// The displayed image as 8-bit RGB, row-major: the source colours, or grey repeated.
    pub fn rgb8(&self) -> Vec<u8> {
        match &self.rgb {
            Some(rgb) => rgb.iter().copied().collect(),
            None => self.gray8().iter().flat_map(|g| [*g, *g, *g]).collect(),
        }
    }
}

/// A calibration given by the caller (checked: unusable values are marked so).
fn given(mm_per_px: (f64, f64)) -> Calibration {
    match check_spacing_mm(mm_per_px.0, mm_per_px.1) {
        None => Calibration::Ok {
            mm_per_px_x: mm_per_px.0,
            mm_per_px_y: mm_per_px.1,
            reference_px: None,
            source: CalibrationSource::Given,
        },
        Some(reason) => Calibration::Unusable { reason },
    }
}

/// ITU-R BT.601 luma of an 8-bit RGB triple, on 0–255.
pub fn luma(r: u8, g: u8, b: u8) -> f32 {
    0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32
}

/// Chroma of an RGB triple: max − min of its channels.
pub fn chroma(r: u8, g: u8, b: u8) -> u8 {
    r.max(g).max(b) - r.min(g).min(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_checks_refuse_bad_values() {
        assert!(check_spacing_mm(0.1, 0.1).is_none());
        assert!(check_spacing_mm(0.0, 0.1).is_some());
        assert!(check_spacing_mm(-0.1, 0.1).is_some());
        assert!(check_spacing_mm(f64::NAN, 0.1).is_some());
        assert!(check_spacing_mm(0.1, 1e6).is_some());
    }

    #[test]
    fn px_mm_round_trip() {
        let c = Calibration::Ok {
            mm_per_px_x: 0.2,
            mm_per_px_y: 0.25,
            reference_px: Some((100.0, 20.0)),
            source: CalibrationSource::Given,
        };
        let (xm, ym) = c.px_to_mm(150.0, 60.0, 0.0).unwrap();
        assert!((xm - 10.0).abs() < 1e-9 && (ym - 10.0).abs() < 1e-9);
        let (x, y) = c.mm_to_px(xm, ym, 0.0).unwrap();
        assert!((x - 150.0).abs() < 1e-9 && (y - 60.0).abs() < 1e-9);
    }
}
