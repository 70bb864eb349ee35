//! Commands that look at files and adapters: `info`, `frames`, `adapters`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sonoguide::dicom::{DicomFile, ReadOptions};

use crate::exit::{make_out_dir, print_json, Failure, Outcome};

/// `info`'s arguments.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// DICOM files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print a JSON array, one object per file.
    #[arg(long)]
    json: bool,
}

/// `frames`' arguments.
#[derive(clap::Args)]
pub struct FramesArgs {
    /// DICOM file.
    file: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Write the B-mode intensity (greyscale) instead of the displayed RGB.
    #[arg(long)]
    gray: bool,
}

/// `adapters`' arguments.
#[derive(clap::Args)]
pub struct AdaptersArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn info_json(path: &Path) -> Value {
    match sonoguide::dicom::info_report(path) {
        Ok(report) => serde_json::to_value(&report)
            .unwrap_or_else(|e| json!({"path": path, "error": e.to_string()})),
        Err(e) => json!({"path": path, "error": e.to_string()}),
    }
}

/// `sonoguide info`.
pub fn info(args: InfoArgs) -> Outcome {
    let reports: Vec<Value> = args.files.iter().map(|p| info_json(p)).collect();
    if args.json {
        print_json(&reports)?;
    } else {
        for r in &reports {
            print_info_text(r);
        }
    }
    let mut failed = false;
    for r in reports.iter().filter_map(|r| r.get("error")) {
        eprintln!("error: {}", r.as_str().unwrap_or("unknown"));
        failed = true;
    }
    if failed {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

fn print_info_text(r: &Value) {
    let s = |k: &str| {
        r.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("{}", s("path"));
    if r.get("error").is_some() {
        println!("  error: {}", s("error"));
        return;
    }
    println!("  SOP class            {}", s("sop_class_uid"));
    println!("  transfer syntax      {}", s("transfer_syntax_uid"));
    println!("  photometric          {}", s("photometric_interpretation"));
    println!(
        "  size                 {} x {} px, {} frame(s)",
        s("columns"),
        s("rows"),
        s("frames")
    );
    println!(
        "  bits allocated       {} ({} stored), {} sample(s) per pixel",
        s("bits_allocated"),
        s("bits_stored"),
        s("samples_per_pixel")
    );
    if let Some(regions) = r["ultrasound_regions"].as_array() {
        for (k, g) in regions.iter().enumerate() {
            println!(
                "  region {k}             ({},{})-({},{}) format {} type {} units {}/{} delta {}/{} ref ({},{}) mm/px {}/{}",
                g["min_x0"], g["min_y0"], g["max_x1"], g["max_y1"], g["spatial_format"], g["data_type"],
                g["units_x"], g["units_y"], g["physical_delta_x"], g["physical_delta_y"],
                g["reference_pixel_x0"], g["reference_pixel_y0"], g["mm_per_px_x"], g["mm_per_px_y"]
            );
        }
    }
    let ir = &r["imaging_region"];
    println!(
        "  imaging region       ({},{})-({},{}) {} from {}, mm/px {} x {}",
        ir["x0"],
        ir["y0"],
        ir["x1"],
        ir["y1"],
        ir["shape"],
        ir["source"],
        ir["mm_per_px_x"],
        ir["mm_per_px_y"]
    );
    if let Some(f) = ir.get("fan").filter(|f| !f.is_null()) {
        println!(
            "  fan                  apex {} near radius {:.1} px, far {:.1} px, edges {} deg",
            f["apex_px"],
            f["r_near_px"].as_f64().unwrap_or(f64::NAN),
            f["r_far_px"].as_f64().unwrap_or(f64::NAN),
            f["edges_deg"]
        );
    }
    match r["calibration_reason"].as_str() {
        Some(reason) => println!("  calibration          {} ({reason})", s("calibration")),
        None => println!("  calibration          {}", s("calibration")),
    }
}

/// `sonoguide frames`.
pub fn frames(args: FramesArgs) -> Outcome {
    let FramesArgs { file, out, gray } = args;
    let dicom = DicomFile::open(&file, &ReadOptions::default())?;
    make_out_dir(&out)?;
    let (w, h) = (dicom.info().columns as usize, dicom.info().rows as usize);
    let mut failed = 0;
    for i in 0..dicom.frame_count() {
        let path = out.join(format!("frame_{i:04}.png"));
        let result = dicom
            .decode_display(i)
            .map_err(sonoguide::Error::from)
            .and_then(|(rgb, intensity)| {
                if gray {
                    let g = intensity.mapv(|v| v.round().clamp(0.0, 255.0) as u8);
                    sonoguide::imageio::write_gray_png(&path, &g)
                } else {
                    let buf: Vec<u8> = match rgb {
                        Some(rgb) => rgb.iter().copied().collect(),
                        None => intensity
                            .iter()
                            .flat_map(|v| [v.round().clamp(0.0, 255.0) as u8; 3])
                            .collect(),
                    };
                    sonoguide::imageio::write_rgb_png(&path, w, h, &buf)
                }
            });
        if let Err(e) = result {
            eprintln!("error: {e}");
            failed += 1;
        }
    }
    eprintln!(
        "{}: wrote {} of {} frame(s) to {}",
        file.display(),
        dicom.frame_count() - failed,
        dicom.frame_count(),
        out.display()
    );
    if failed > 0 {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

/// `sonoguide adapters`.
pub fn adapters(args: AdaptersArgs) -> Outcome {
    let list = sonoguide::gpu::list_adapters();
    if args.json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no GPU adapters (the CPU backend will be used)");
    }
    for a in &list {
        println!(
            "{} [{} {}] driver {}; max storage binding {} MiB{}",
            a.name,
            a.backend,
            a.device_type,
            a.driver,
            a.max_storage_buffer_binding_size >> 20,
            if a.hardware {
                ""
            } else {
                " (software: used only with --backend gpu)"
            }
        );
    }
    Ok(())
}
