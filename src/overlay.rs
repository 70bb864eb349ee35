//! Drawing on an RGB copy of a frame: label previews now, the needle path later.
//!
//! Colours are the Okabe–Ito palette, distinguishable with the common colour-vision
//! deficiencies. Text uses DejaVu Sans (bundled in `assets/fonts`, free licence).

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect as DrawRect;
use ndarray::Array2;

use crate::label::Label;

/// Errors of the overlay drawing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// The bundled font could not be loaded.
    #[error("the bundled font cannot be loaded: {0}")]
    Font(String),
}

/// Opacity of label fills in previews.
const FILL_ALPHA: f32 = 0.35;

static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The bundled font.
pub fn font() -> crate::Result<FontRef<'static>> {
    FontRef::try_from_slice(FONT_BYTES).map_err(|e| OverlayError::Font(e.to_string()).into())
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
            let code = labels[[y, x]];
            let Some(label) = Label::from_code(code).filter(|l| *l != Label::Background) else {
                continue;
            };
            let c = label.colour();
            let edge = [(0i64, -1i64), (0, 1), (-1, 0), (1, 0)]
                .iter()
                .any(|(dx, dy)| {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    nx < 0
                        || ny < 0
                        || nx >= w as i64
                        || ny >= h as i64
                        || labels[[ny as usize, nx as usize]] != code
                });
            let p = img.get_pixel_mut(x as u32, y as u32);
            for (v, ck) in p.0.iter_mut().zip(c) {
                *v = if edge {
                    ck
                } else {
                    ((1.0 - FILL_ALPHA) * *v as f32 + FILL_ALPHA * ck as f32) as u8
                };
            }
        }
    }
    let present = labels_present(labels);
    draw_legend(&mut img, &present)?;
    Ok(img)
}

/// The labels other than background that occur in `labels`, in code order.
pub fn labels_present(labels: &Array2<u8>) -> Vec<Label> {
    let mut seen = [false; Label::ALL.len()];
    for v in labels {
        if let Some(s) = seen.get_mut(*v as usize) {
            *s = true;
        }
    }
    Label::ALL
        .into_iter()
        .filter(|l| *l != Label::Background && seen[l.code() as usize])
        .collect()
}

/// Draws a legend of the given labels in the top-right corner.
pub fn draw_legend(img: &mut RgbImage, labels: &[Label]) -> crate::Result<()> {
    let font = font()?;
    let px = text_px(img.height());
    let scale = PxScale::from(px);
    let line = (px * 1.3) as u32;
    let names: Vec<&str> = if labels.is_empty() {
        vec!["no structures found"]
    } else {
        labels.iter().map(|l| l.name()).collect()
    };
    let text_w = names
        .iter()
        .map(|n| text_size(scale, &font, n).0)
        .max()
        .unwrap_or(0);
    let box_w = text_w + line + 12;
    let box_h = line * names.len() as u32 + 8;
    if box_w + 4 > img.width() || box_h + 4 > img.height() {
        return Ok(());
    }
    let x0 = img.width() - box_w - 4;
    let y0 = 4;
    draw_filled_rect_mut(
        img,
        DrawRect::at(x0 as i32, y0 as i32).of_size(box_w, box_h),
        Rgb([20, 20, 20]),
    );
    draw_hollow_rect_mut(
        img,
        DrawRect::at(x0 as i32, y0 as i32).of_size(box_w, box_h),
        Rgb([200, 200, 200]),
    );
    for (i, name) in names.iter().enumerate() {
        let ty = y0 + 4 + i as u32 * line;
        if let Some(l) = labels.get(i) {
            let c = l.colour();
            draw_filled_rect_mut(
                img,
                DrawRect::at(x0 as i32 + 4, ty as i32 + 2).of_size(line - 6, line - 6),
                Rgb(c),
            );
        }
        draw_text_mut(
            img,
            Rgb([240, 240, 240]),
            (x0 + line + 4) as i32,
            ty as i32,
            scale,
            &font,
            name,
        );
    }
    Ok(())
}

/// Needle path colour (white, drawn over a dark outline so it shows on any background).
const NEEDLE: Rgb<u8> = Rgb([255, 255, 255]);
const OUTLINE: Rgb<u8> = Rgb([0, 0, 0]);
/// Target crosshair (Okabe–Ito reddish purple).
const TARGET: Rgb<u8> = Rgb([204, 121, 167]);
/// Entry marker (Okabe–Ito sky blue).
const ENTRY: Rgb<u8> = Rgb([86, 180, 233]);
/// Banner for frames without a safe path.
const BANNER: Rgb<u8> = Rgb([180, 0, 0]);
/// Depth ticks along the needle, mm.
pub const TICK_MM: f64 = 5.0;

/// Draws contours of the labels (no fill) with a legend.
pub fn draw_contours(img: &mut RgbImage, labels: &Array2<u8>) -> crate::Result<()> {
    let (h, w) = labels.dim();
    for y in 0..h {
        for x in 0..w {
            let code = labels[[y, x]];
            let Some(label) = Label::from_code(code).filter(|l| *l != Label::Background) else {
                continue;
            };
            let edge = [(0i64, -1i64), (0, 1), (-1, 0), (1, 0)]
                .iter()
                .any(|(dx, dy)| {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    nx >= 0
                        && ny >= 0
                        && nx < w as i64
                        && ny < h as i64
                        && labels[[ny as usize, nx as usize]] != code
                });
            if edge {
                img.put_pixel(x as u32, y as u32, Rgb(label.colour()));
            }
        }
    }
    let present = labels_present(labels);
    draw_legend(img, &present)
}

/// Tint of the keep-out zones (Okabe–Ito vermillion), and its opacity: faint, so that the
/// tissue stays readable.
const ZONE: [f32; 3] = [213.0, 94.0, 0.0];
const ZONE_ALPHA: f32 = 0.22;

/// Tints the zones around bone, shadow, vessels and nerves that a needle must not enter (their
/// margins), outside the structures themselves.
pub fn draw_margin_zones(
    img: &mut RgbImage,
    labels: &Array2<u8>,
    margins: &crate::plan::Margins,
    mm_per_px: (f64, f64),
) {
    let mut done: Vec<f64> = Vec::new();
    for (_, m) in margins.by_label() {
        if m <= 0.0 || done.contains(&m) {
            continue;
        }
        done.push(m);
        // Every structure with this margin at once: one distance transform per margin.
        let with: Vec<u8> = margins
            .by_label()
            .iter()
            .filter(|(_, mm)| *mm == m)
            .map(|(l, _)| l.code())
            .collect();
        let mask = labels.mapv(|l| with.contains(&l));
        if !mask.iter().any(|v| *v) {
            continue;
        }
        let dist = crate::plan::distance_mm(&mask, mm_per_px);
        for ((y, x), d) in dist.indexed_iter() {
            if *d > 0.0 && *d < m {
                let p = img.get_pixel_mut(x as u32, y as u32);
                for c in 0..3 {
                    p.0[c] = (p.0[c] as f32 * (1.0 - ZONE_ALPHA) + ZONE[c] * ZONE_ALPHA) as u8;
                }
            }
        }
    }
}

fn thick_line(img: &mut RgbImage, a: (f32, f32), b: (f32, f32), colour: Rgb<u8>, half: i32) {
    for dx in -half..=half {
        for dy in -half..=half {
            imageproc::drawing::draw_line_segment_mut(
                img,
                (a.0 + dx as f32, a.1 + dy as f32),
                (b.0 + dx as f32, b.1 + dy as f32),
                colour,
            );
        }
    }
}

/// Draws the overlay of one frame: faint keep-out zones (the margins), label contours and
/// legend, the needle path with depth ticks
/// every 5 mm, the entry marker, the target crosshair, a text box, a scale bar, and a "NO SAFE
/// PATH" banner when there is none.
pub fn draw_plan(
    base: &Array2<f32>,
    labels: &Array2<u8>,
    plan: &crate::plan::NeedlePlan,
    mm_per_px: (f64, f64),
) -> crate::Result<RgbImage> {
    let mut img = gray_to_rgb_image(base);
    draw_margin_zones(&mut img, labels, &plan.margins_mm, mm_per_px);
    draw_contours(&mut img, labels)?;
    let font = font()?;
    let px = text_px(img.height());
    let scale = PxScale::from(px);
    if let (Some(e), Some(t)) = (plan.entry, plan.target) {
        let (a, b) = (
            (e.px[0] as f32, e.px[1] as f32),
            (t.px[0] as f32, t.px[1] as f32),
        );
        thick_line(&mut img, a, b, OUTLINE, 2);
        thick_line(&mut img, a, b, NEEDLE, 1);
        // Depth ticks every 5 mm along the needle, perpendicular to it.
        let len_mm = plan.length_mm.unwrap_or(0.0);
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len_px = (dx * dx + dy * dy).sqrt().max(1e-3);
        let (nx, ny) = (-dy / len_px, dx / len_px);
        let tick = (px * 0.5).max(4.0);
        let mut d = TICK_MM;
        while d < len_mm {
            let f = (d / len_mm) as f32;
            let c = (a.0 + f * dx, a.1 + f * dy);
            thick_line(
                &mut img,
                (c.0 - nx * tick, c.1 - ny * tick),
                (c.0 + nx * tick, c.1 + ny * tick),
                NEEDLE,
                0,
            );
            d += TICK_MM;
        }
        imageproc::drawing::draw_filled_circle_mut(
            &mut img,
            (a.0 as i32, a.1 as i32),
            (px * 0.35) as i32 + 2,
            ENTRY,
        );
        imageproc::drawing::draw_hollow_circle_mut(
            &mut img,
            (a.0 as i32, a.1 as i32),
            (px * 0.35) as i32 + 3,
            OUTLINE,
        );
    }
    if let Some(t) = plan.target {
        let (x, y) = (t.px[0] as f32, t.px[1] as f32);
        let r = (px * 0.6).max(6.0);
        thick_line(&mut img, (x - r, y), (x + r, y), TARGET, 1);
        thick_line(&mut img, (x, y - r), (x, y + r), TARGET, 1);
        imageproc::drawing::draw_hollow_circle_mut(
            &mut img,
            (x as i32, y as i32),
            (r * 0.6) as i32,
            TARGET,
        );
    }
    // Text box, bottom left above the scale bar.
    let lines: Vec<String> = if plan.is_ok() {
        vec![
            format!(
                "angle {:.0} deg, side {}",
                plan.angle_deg.unwrap_or(0.0),
                plan.side.map_or("-", |s| s.as_str())
            ),
            format!("target depth {:.1} mm", plan.depth_mm.unwrap_or(0.0)),
            format!("path length {:.1} mm", plan.length_mm.unwrap_or(0.0)),
            match plan.clearances_mm.nearest() {
                Some((label, d)) => format!("nearest {} {:.1} mm", label.name(), d.min(99.9)),
                None => "nothing to avoid in view".into(),
            },
            format!(
                "target: {}",
                plan.target_kind
                    .map_or("-", |k| k.as_str())
                    .replace('_', " ")
            ),
        ]
    } else {
        vec![format!(
            "target: {}",
            plan.target_kind
                .map_or("none", |k| k.as_str())
                .replace('_', " ")
        )]
    };
    let mut lines = lines;
    lines.extend(plan.notes.iter().filter(|n| n.len() < 40).cloned());
    if let Some(name) = &plan.preset {
        lines.insert(0, format!("preset: {name}"));
    }
    lines.push("research tool - not for clinical use".into());
    let line_h = (px * 1.25) as u32;
    let box_w = lines
        .iter()
        .map(|l| text_size(scale, &font, l).0)
        .max()
        .unwrap_or(0)
        + 10;
    let box_h = line_h * lines.len() as u32 + 8;
    let bar_h = line_h + 12;
    if box_w < img.width() && box_h + bar_h + 8 < img.height() {
        let y0 = img.height() - box_h - bar_h - 4;
        draw_filled_rect_mut(
            &mut img,
            DrawRect::at(4, y0 as i32).of_size(box_w, box_h),
            Rgb([20, 20, 20]),
        );
        for (i, l) in lines.iter().enumerate() {
            draw_text_mut(
                &mut img,
                Rgb([240, 240, 240]),
                9,
                (y0 + 4 + i as u32 * line_h) as i32,
                scale,
                &font,
                l,
            );
        }
    }
    // Scale bar: 10 mm (5 mm on narrow frames).
    let bar_mm = if img.width() as f64 * mm_per_px.0 > 30.0 {
        10.0
    } else {
        5.0
    };
    let bar_px = (bar_mm / mm_per_px.0).round() as u32;
    // Only where the bar and its label fit (a frame a few rows high has no room for them).
    if bar_px + 20 < img.width() && img.height() > 24 {
        let y = img.height() - 8;
        draw_filled_rect_mut(
            &mut img,
            DrawRect::at(8, y as i32 - 3).of_size(bar_px, 4),
            NEEDLE,
        );
        let label = format!("{bar_mm:.0} mm");
        draw_text_mut(
            &mut img,
            NEEDLE,
            (bar_px + 14) as i32,
            y as i32 - px as i32,
            scale,
            &font,
            &label,
        );
    }
    if !plan.is_ok() {
        let text = format!(
            "{}: {}",
            if plan.status == crate::plan::PlanStatus::NoCalibration {
                "NO CALIBRATION"
            } else {
                "NO SAFE PATH"
            },
            plan.reason.as_deref().unwrap_or("unknown")
        );
        let big = PxScale::from(px * 1.2);
        let bh = (px * 1.8) as u32;
        let iw = img.width();
        draw_filled_rect_mut(&mut img, DrawRect::at(0, 0).of_size(iw, bh), BANNER);
        // Shorten the reason until it fits the frame.
        let mut t = text.clone();
        while text_size(big, &font, &t).0 + 12 > iw && t.chars().count() > 14 {
            let mut chars: Vec<char> = t.trim_end_matches("...").chars().collect();
            chars.pop();
            t = chars.into_iter().collect::<String>() + "...";
        }
        draw_text_mut(
            &mut img,
            Rgb([255, 255, 255]),
            6,
            (px * 0.2) as i32,
            big,
            &font,
            &t,
        );
    }
    Ok(img)
}
