//! Colour Doppler: coloured flow inside the imaging region marks a vessel.
//!
//! A colour pixel (chroma above [`crate::frame::COLOUR_CHROMA_THRESHOLD`]) inside the imaging
//! region is flow in the colour box (colour flow or power Doppler): scanners draw their
//! coloured annotations outside the image, or as thin graphics that the minimum area drops.
//! Flow is labelled vessel, which the planner avoids with the vessel margin; a coloured
//! annotation inside the image would be avoided too (the safe side of a mistake).

use ndarray::Array2;

use super::components::components;
use crate::frame::Frame;
use crate::label::Label;

/// Smallest patch of flow labelled vessel, mm²: a 0.8 mm disc, under the lumen of the
/// smallest named vessels an MSK injection avoids (digital and genicular arteries, 1–2 mm);
/// smaller patches are colour noise ("flash") or annotation strokes.
pub const MIN_FLOW_AREA_MM2: f64 = 0.5;

/// Labels the colour flow of `frame` inside its imaging region as vessel in `labels`
/// (full-frame), at `mm` (x, y) per pixel. Returns the pixels labelled.
pub fn label_flow(frame: &Frame, mm: (f64, f64), labels: &mut Array2<u8>) -> usize {
    let Some(colour) = &frame.colour_mask else {
        return 0;
    };
    let b = frame.region.bounds;
    let mut flow = Array2::from_elem(labels.dim(), false);
    let mut any = false;
    for y in b.y0..b.y1 {
        for x in b.x0..b.x1 {
            if colour[[y, x]] != 0 && frame.region.contains(x, y) {
                flow[[y, x]] = true;
                any = true;
            }
        }
    }
    if !any {
        return 0;
    }
    let min_px = (MIN_FLOW_AREA_MM2 / (mm.0 * mm.1)).ceil() as usize;
    let mut n = 0;
    for c in components(&flow) {
        if c.area() < min_px.max(1) {
            continue;
        }
        for p in c.pixels {
            labels[p] = Label::Vessel.code();
            n += 1;
        }
    }
    n
}
