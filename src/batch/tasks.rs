//! The batch tasks of the `despeckle` and `segment` commands.

use std::path::Path;

use serde_json::json;

use super::{BackendCounts, FileReport, FileTask};
use crate::segment::SegmentParams;
use crate::{Despeckler, Filter};

/// The filters and their parameters, for the summary's configuration.
pub(super) fn filters_json(filters: &[Filter]) -> serde_json::Value {
    filters
        .iter()
        .map(|f| {
            let parameters: serde_json::Map<String, serde_json::Value> = f
                .parameters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({"name": f.name(), "parameters": parameters})
        })
        .collect()
}

/// The configuration of a command that despeckles with one filter.
fn chain_config(command: &str, despeckler: &Despeckler, filter: &Filter) -> serde_json::Value {
    json!({
        "command": command,
        "backend_requested": super::backend_name(despeckler.backend()),
        "filters": filters_json(std::slice::from_ref(filter)),
    })
}

/// Opens `input` and runs `per_frame` on each of its frames (or those in `frames`).
fn each_frame(
    input: &Path,
    frames: Option<(usize, usize)>,
    mut per_frame: impl FnMut(&crate::Frame) -> crate::Result<()>,
) -> Result<usize, String> {
    let (file, start, end) = super::open_frames(input, frames)?;
    for k in start..end {
        let frame = file.read_frame(k).map_err(|e| e.to_string())?;
        per_frame(&frame).map_err(|e| e.to_string())?;
    }
    Ok(end - start)
}

/// Despeckles every frame's B-mode intensity: `frame_NNNN.png` (greyscale).
#[derive(Debug)]
pub struct DespeckleTask {
    despeckler: Despeckler,
    filter: Filter,
}

impl DespeckleTask {
    /// The task with this despeckler and filter.
    pub fn new(despeckler: Despeckler, filter: Filter) -> DespeckleTask {
        DespeckleTask { despeckler, filter }
    }
}

impl FileTask for DespeckleTask {
    fn done_marker(&self, _stem: &str) -> Option<String> {
        // No single file marks a complete input: resuming redoes it.
        None
    }

    fn run(
        &self,
        input: &Path,
        dir: &Path,
        _stem: &str,
        frames: Option<(usize, usize)>,
    ) -> Result<FileReport, String> {
        let mut backends = BackendCounts::default();
        let n = each_frame(input, frames, |frame| {
            let (filtered, ran) = self
                .despeckler
                .run_reporting(&frame.intensity, std::slice::from_ref(&self.filter))?;
            backends.add("despeckle", ran);
            let g = filtered.mapv(|v| v.round().clamp(0.0, 255.0) as u8);
            crate::imageio::write_gray_png(&dir.join(format!("frame_{:04}.png", frame.index)), &g)
        })?;
        Ok(FileReport {
            frames: n,
            backends,
            detail: Some(format!(
                "{n} frame(s) despeckled with {} on {}",
                self.filter.name(),
                self.despeckler.device_name()
            )),
            ..FileReport::default()
        })
    }

    fn config(&self) -> serde_json::Value {
        chain_config("despeckle", &self.despeckler, &self.filter)
    }

    fn compute(&self) -> &crate::Compute {
        self.despeckler.compute()
    }
}

/// Segments every frame: `frame_NNNN.labels.png`, `frame_NNNN.labels_preview.png` and
/// `frame_NNNN.bone.json`.
#[derive(Debug)]
pub struct SegmentTask {
    despeckler: Despeckler,
    filter: Filter,
    params: SegmentParams,
}

impl SegmentTask {
    /// The task with this despeckler, filter and segmentation settings.
    pub fn new(despeckler: Despeckler, filter: Filter, params: SegmentParams) -> SegmentTask {
        SegmentTask {
            despeckler,
            filter,
            params,
        }
    }
}

impl FileTask for SegmentTask {
    fn done_marker(&self, _stem: &str) -> Option<String> {
        None
    }

    fn run(
        &self,
        input: &Path,
        dir: &Path,
        _stem: &str,
        frames: Option<(usize, usize)>,
    ) -> Result<FileReport, String> {
        let mut backends = BackendCounts::default();
        let mut with_bone = 0;
        let n = each_frame(input, frames, |frame| {
            let (despeckled, features, (despeckle_ran, features_ran), _) =
                crate::pipeline::despeckle_and_features(
                    &self.despeckler,
                    frame,
                    std::slice::from_ref(&self.filter),
                    &self.params,
                )?;
            backends.add("despeckle", despeckle_ran);
            backends.add("features", features_ran);
            let seg =
                crate::segment::segment_from_features(frame, &despeckled, &features, &self.params)?;
            let name = format!("frame_{:04}", frame.index);
            crate::imageio::write_gray_png(&dir.join(format!("{name}.labels.png")), &seg.labels)?;
            let preview = crate::overlay::label_preview(&despeckled, &seg.labels)?;
            crate::imageio::write_rgb_png(
                &dir.join(format!("{name}.labels_preview.png")),
                preview.width() as usize,
                preview.height() as usize,
                preview.as_raw(),
            )?;
            crate::imageio::write_json(&dir.join(format!("{name}.bone.json")), &seg.bone_json())?;
            if !seg.bone_polylines_px.is_empty() {
                with_bone += 1;
            }
            Ok(())
        })?;
        Ok(FileReport {
            frames: n,
            backends,
            detail: Some(format!("{n} frame(s) segmented, bone found in {with_bone}")),
            ..FileReport::default()
        })
    }

    fn config(&self) -> serde_json::Value {
        chain_config("segment", &self.despeckler, &self.filter)
    }

    fn compute(&self) -> &crate::Compute {
        self.despeckler.compute()
    }
}
