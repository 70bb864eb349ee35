//! Drawing on an RGB copy of a frame: label previews now, the needle path later.
//!
//! Colours are the Okabe–Ito palette, distinguishable with the common colour-vision
//! deficiencies. Text uses DejaVu Sans (bundled in `assets/fonts`, free licence).

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect as DrawRect;
use ndarray::Array2;

use crate::phantom::label;

/// Label names, indexed by label value.
pub const LABEL_NAMES: [&str; 6] = ["background", "tendon", "bone surface", "acoustic shadow", "joint space / effusion", "vessel"];

/// Okabe–Ito colours, indexed by label value (background unused).
pub const LABEL_COLOURS: [[u8; 3]; 6] = [[0, 0, 0], [230, 159, 0], [240, 228, 66], [0, 114, 178], [0, 158, 115], [213, 94, 0]];

/// Opacity of label fills in previews.
const FILL_ALPHA: f32 = 0.35;

static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The bundled font.
pub fn font() -> crate::Result<FontRef<'static>> {
    FontRef::try_from_slice(FONT_BYTES).map_err(|e| crate::Error::InvalidParameter { name: "font", reason: e.to_string() })
}

/// An RGB image of a greyscale frame (0–255, clamped).
pub fn gray_to_rgb_image(gray: &Array2<f32>) -> RgbImage {
    let (h, w) = gray.dim();
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let g = gray[[y as usize, x as usize]].round().clamp(0.0, 255.0) as u8;
        Rgb([g, g, g])
    })
}

/// Text size in px for a frame of this height (legible on small and large frames).
pub fn text_px(height: u32) -> f32 {
    (height as f32 / 32.0).clamp(10.0, 22.0)
}

/// The frame with labels filled translucently, their contours drawn, and a legend.
pub fn label_preview(gray: &Array2<f32>, labels: &Array2<u8>) -> crate::Result<RgbImage> {
    let mut img = gray_to_rgb_image(gray);
    let (h, w) = labels.dim();
    for y in 0..h {
        for x in 0..w {
            let l = labels[[y, x]] as usize;
            if l == 0 || l >= LABEL_COLOURS.len() {
                continue;
            }
            let c = LABEL_COLOURS[l];
            let edge = [(0i64, -1i64), (0, 1), (-1, 0), (1, 0)].iter().any(|(dx, dy)| {
                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 || labels[[ny as usize, nx as usize]] as usize != l
            });
            let p = img.get_pixel_mut(x as u32, y as u32);
            for k in 0..3 {
                p.0[k] = if edge { c[k] } else { ((1.0 - FILL_ALPHA) * p.0[k] as f32 + FILL_ALPHA * c[k] as f32) as u8 };
            }
        }
    }
    let present: Vec<usize> = (1..LABEL_NAMES.len()).filter(|l| labels.iter().any(|v| *v as usize == *l)).collect();
    draw_legend(&mut img, &present)?;
    Ok(img)
}

/// Draws a legend of the given labels in the top-right corner.
pub fn draw_legend(img: &mut RgbImage, labels: &[usize]) -> crate::Result<()> {
    let font = font()?;
    let px = text_px(img.height());
    let scale = PxScale::from(px);
    let line = (px * 1.3) as u32;
    let names: Vec<&str> = if labels.is_empty() { vec!["no structures found"] } else { labels.iter().map(|l| LABEL_NAMES[*l]).collect() };
    let text_w = names.iter().map(|n| text_size(scale, &font, n).0).max().unwrap_or(0);
    let box_w = text_w + line + 12;
    let box_h = line * names.len() as u32 + 8;
    if box_w + 4 > img.width() || box_h + 4 > img.height() {
        return Ok(());
    }
    let x0 = img.width() - box_w - 4;
    let y0 = 4;
    draw_filled_rect_mut(img, DrawRect::at(x0 as i32, y0 as i32).of_size(box_w, box_h), Rgb([20, 20, 20]));
    draw_hollow_rect_mut(img, DrawRect::at(x0 as i32, y0 as i32).of_size(box_w, box_h), Rgb([200, 200, 200]));
    for (i, name) in names.iter().enumerate() {
        let ty = y0 + 4 + i as u32 * line;
        if let Some(l) = labels.get(i) {
            let c = LABEL_COLOURS[*l];
            draw_filled_rect_mut(img, DrawRect::at(x0 as i32 + 4, ty as i32 + 2).of_size(line - 6, line - 6), Rgb(c));
        }
        draw_text_mut(img, Rgb([240, 240, 240]), (x0 + line + 4) as i32, ty as i32, scale, &font, name);
    }
    let _ = label::BACKGROUND;
    Ok(())
}
