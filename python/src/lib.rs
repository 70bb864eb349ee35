//! Python bindings: `sonoguide.Pipeline` over numpy arrays and `sonoguide.read_dicom`.
//!
//! The GIL is released while Rust works (`Python::detach`); every Rust error becomes a
//! `sonoguide.SonoguideError` carrying the Rust error's message.

use std::sync::Mutex;

use numpy::{IntoPyArray, PyReadonlyArray2};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use sonoguide::frame::CalibrationSource;
use std::path::PathBuf;

use sonoguide::batch::{self, BatchOptions, FileTask, ProcessTask};
use sonoguide::dicomweb::{Auth, DicomWebClient, DicomWebError, InstanceRef, Limits, Query};
use sonoguide::{Calibration, Frame, Pipeline, PipelineConfig, Session};

pyo3::create_exception!(
    _sonoguide,
    SonoguideError,
    PyException,
    "An error from sonoguide; the message is the Rust error's."
);

pyo3::create_exception!(
    _sonoguide,
    ServerError,
    SonoguideError,
    "A DICOMweb server could not be reached or refused the credentials."
);

fn web_err(e: DicomWebError) -> PyErr {
    match e {
        DicomWebError::Auth { .. } | DicomWebError::Unreachable { .. } => {
            ServerError::new_err(e.to_string())
        }
        e => err(e),
    }
}

/// A DICOMweb client; credentials from SONOGUIDE_DICOMWEB_PASSWORD (with `user`) or
/// SONOGUIDE_DICOMWEB_TOKEN, as on the command line.
fn web_client(url: &str, user: Option<String>, timeout_s: f64) -> PyResult<DicomWebClient> {
    let auth = match (user, std::env::var("SONOGUIDE_DICOMWEB_TOKEN").ok()) {
        (Some(user), _) => Auth::Basic {
            user,
            password: std::env::var("SONOGUIDE_DICOMWEB_PASSWORD").unwrap_or_default(),
        },
        (None, Some(token)) => Auth::Bearer(token),
        (None, None) => Auth::None,
    };
    if !(timeout_s.is_finite() && timeout_s > 0.0 && timeout_s <= 86_400.0) {
        return Err(err(format!(
            "timeout_s {timeout_s} must be between 0 and 86400"
        )));
    }
    let mut limits = Limits::default();
    limits.timeout = std::time::Duration::from_secs_f64(timeout_s);
    DicomWebClient::new(url, auth, limits).map_err(err)
}

/// QIDO-RS: (study, series, instance) UIDs of the matching instances, sonoguide's own
/// derived series left out.
#[pyfunction]
#[pyo3(signature = (url, study=None, since=None, modality=Some("US".to_string()), user=None, timeout_s=120.0))]
fn dicomweb_search(
    py: Python<'_>,
    url: &str,
    study: Option<String>,
    since: Option<String>,
    modality: Option<String>,
    user: Option<String>,
    timeout_s: f64,
) -> PyResult<Vec<(String, String, String)>> {
    let client = web_client(url, user, timeout_s)?;
    let mut q = Query::default();
    q.study = study;
    q.since = since;
    q.modality = modality.filter(|m| !m.is_empty());
    let found = py.detach(|| client.search_instances(&q)).map_err(web_err)?;
    Ok(found
        .into_iter()
        .filter(|i| !i.is_sonoguide_output())
        .map(|i| (i.study, i.series, i.instance))
        .collect())
}

/// WADO-RS into `cache` (kept for a resumed run); the file's path.
#[pyfunction]
#[pyo3(signature = (url, study, series, instance, cache, user=None, timeout_s=120.0))]
#[allow(clippy::too_many_arguments)]
fn dicomweb_retrieve(
    py: Python<'_>,
    url: &str,
    study: &str,
    series: &str,
    instance: &str,
    cache: PathBuf,
    user: Option<String>,
    timeout_s: f64,
) -> PyResult<PathBuf> {
    let client = web_client(url, user, timeout_s)?;
    let r = InstanceRef::new(study, series, instance);
    std::fs::create_dir_all(&cache).map_err(|e| err(format!("{}: {e}", cache.display())))?;
    py.detach(|| batch::remote::retrieve(&client, &cache, &r))
        .map_err(web_err)
}

/// STOW-RS: stores the overlay DICOM and SEG of `stem` (in `folder`) into `study`; how many
/// objects the server acknowledged.
#[pyfunction]
#[pyo3(signature = (url, folder, stem, study, user=None, timeout_s=120.0))]
fn dicomweb_store(
    py: Python<'_>,
    url: &str,
    folder: PathBuf,
    stem: &str,
    study: &str,
    user: Option<String>,
    timeout_s: f64,
) -> PyResult<usize> {
    let client = web_client(url, user, timeout_s)?;
    py.detach(|| batch::remote::store(&client, &folder, stem, study))
        .map_err(err)
}

fn err(e: impl std::fmt::Display) -> PyErr {
    SonoguideError::new_err(e.to_string())
}

/// A JSON value as Python objects (dict, list, str, float, int, bool, None).
fn to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        serde_json::Value::Null => py.None().into_bound(py),
        serde_json::Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(f)) => f.into_pyobject(py)?.into_any(),
            _ => py.None().into_bound(py),
        },
        serde_json::Value::String(s) => s.into_pyobject(py)?.into_any(),
        serde_json::Value::Array(a) => {
            let list = PyList::empty(py);
            for x in a {
                list.append(to_py(py, x)?)?;
            }
            list.into_any()
        }
        serde_json::Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

fn spacing(spacing_mm: Option<(f64, f64)>) -> PyResult<Calibration> {
    Ok(match spacing_mm {
        None => Calibration::Missing,
        Some((x, y)) => {
            if let Some(reason) = sonoguide::frame::check_spacing_mm(x, y) {
                return Err(err(format!("spacing_mm: {reason}")));
            }
            Calibration::Ok {
                mm_per_px_x: x,
                mm_per_px_y: y,
                reference_px: None,
                source: CalibrationSource::Given,
            }
        }
    })
}

/// The pipeline configuration the constructors' arguments ask for.
fn config_from(
    preset: Option<&str>,
    backend: &str,
    filter: Option<&str>,
    margin_mm: Option<f64>,
) -> PyResult<PipelineConfig> {
    let mut config = PipelineConfig::default();
    config.backend = match backend {
        "auto" => sonoguide::Backend::Auto,
        "gpu" => sonoguide::Backend::Gpu,
        "cpu" => sonoguide::Backend::Cpu,
        other => {
            return Err(err(format!(
                "backend {other:?}: expected \"auto\", \"gpu\" or \"cpu\""
            )))
        }
    };
    if let Some(f) = filter {
        config.filters = vec![sonoguide::Filter::default_for(f).map_err(err)?];
    }
    if let Some(name) = preset {
        let presets = sonoguide::plan::preset::builtin().map_err(err)?;
        let p = sonoguide::plan::preset::find(&presets, name).map_err(err)?;
        p.apply(&mut config.plan);
    }
    if let Some(m) = margin_mm {
        config.plan.set_margins_mm(m);
    }
    config.validate().map_err(err)?;
    Ok(config)
}

/// The `process` job, one file at a time, for runners that spread files themselves (the Ray
/// cluster runner): each file's outputs exactly as `sonoguide process` writes them.
#[pyclass(name = "Batch", module = "sonoguide._sonoguide", frozen)]
struct PyBatch {
    task: ProcessTask,
}

#[pymethods]
impl PyBatch {
    #[new]
    #[pyo3(signature = (preset=None, backend="auto", filter=None, margin_mm=None, seg=true))]
    fn new(
        py: Python<'_>,
        preset: Option<&str>,
        backend: &str,
        filter: Option<&str>,
        margin_mm: Option<f64>,
        seg: bool,
    ) -> PyResult<PyBatch> {
        let config = config_from(preset, backend, filter, margin_mm)?;
        let pipeline = py.detach(|| Pipeline::new(config)).map_err(err)?;
        Ok(PyBatch {
            task: ProcessTask::new(pipeline, false).with_seg(seg),
        })
    }

    /// The configuration as `summary.json` records it (JSON text).
    fn config_json(&self) -> String {
        self.task.config().to_string()
    }

    /// (backend, device name) the despeckling runs on.
    #[getter]
    fn device(&self) -> (String, String) {
        let c = self.task.compute();
        (c.backend_name().to_string(), c.device_name())
    }

    /// Processes `path` into `out/<stem>`; (the file's `summary.json` entry, its frames per
    /// backend per stage), both as JSON text. Failures are in the entry, not raised.
    #[pyo3(signature = (path, out, stem, skip_existing=false))]
    fn run_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        out: PathBuf,
        stem: &str,
        skip_existing: bool,
    ) -> PyResult<(String, String)> {
        let mut opts = BatchOptions::default();
        opts.skip_existing = skip_existing;
        let task = &self.task;
        let summary = py.detach(|| batch::run_file(task, &path, &out, stem, &opts));
        Ok((
            serde_json::to_string(&summary).map_err(err)?,
            serde_json::to_string(summary.backends()).map_err(err)?,
        ))
    }
}

/// The work list of a batch: (files, their output stems, the `summary.json` entries of the
/// inputs that could not be listed, as JSON text).
#[pyfunction]
#[pyo3(signature = (inputs, out, recursive=false))]
fn plan_inputs(
    inputs: Vec<PathBuf>,
    out: PathBuf,
    recursive: bool,
) -> PyResult<(Vec<PathBuf>, Vec<String>, Vec<String>)> {
    let (files, stems, missing) = batch::plan_inputs(&inputs, &out, recursive);
    let missing = missing
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    Ok((files, stems, missing))
}

/// The pipeline: despeckle, segment and plan one frame at a time.
#[pyclass(name = "Pipeline", module = "sonoguide._sonoguide", frozen)]
struct PyPipeline {
    pipeline: Pipeline,
    /// The plan smoothing of a stream (`process(..., stream=True)`).
    session: Mutex<Session>,
}

#[pymethods]
impl PyPipeline {
    #[new]
    #[pyo3(signature = (preset=None, backend="auto", filter=None, margin_mm=None))]
    fn new(
        py: Python<'_>,
        preset: Option<&str>,
        backend: &str,
        filter: Option<&str>,
        margin_mm: Option<f64>,
    ) -> PyResult<PyPipeline> {
        let config = config_from(preset, backend, filter, margin_mm)?;
        let pipeline = py.detach(|| Pipeline::new(config)).map_err(err)?;
        Ok(PyPipeline {
            pipeline,
            session: Mutex::new(Session::new()),
        })
    }

    /// The backend the despeckling runs on ("gpu" or "cpu") and the device's name.
    #[getter]
    fn device(&self) -> (String, String) {
        let c = self.pipeline.despeckler().compute();
        (c.backend_name().to_string(), c.device_name())
    }

    /// Processes one greyscale frame (2-D uint8 or float32, 0–255). `spacing_mm` is
    /// (x, y) millimetres per pixel; without it the plan says `no_calibration`. With
    /// `stream=True` the plan is smoothed over the frames of this pipeline's stream. With
    /// `overlay=False` no overlay is drawn (the result's `overlay` is None).
    #[pyo3(signature = (image, spacing_mm=None, stream=false, overlay=true))]
    fn process<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        spacing_mm: Option<(f64, f64)>,
        stream: bool,
        overlay: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let calibration = spacing(spacing_mm)?;
        let intensity = if let Ok(a) = image.extract::<PyReadonlyArray2<'py, u8>>() {
            a.as_array().mapv(f32::from)
        } else if let Ok(a) = image.extract::<PyReadonlyArray2<'py, f32>>() {
            a.as_array().to_owned()
        } else {
            let shape = image
                .getattr("shape")
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into());
            let dtype = image
                .getattr("dtype")
                .map(|s| s.to_string())
                .unwrap_or_else(|_| type_name(image));
            return Err(err(format!(
                "image: expected a 2-D numpy array of uint8 or float32, got {dtype} of shape {shape}"
            )));
        };
        let (h, w) = intensity.dim();
        // The frame's checks (finite, 0–255, sizes) run in Pipeline::process.
        let mut frame = Frame::from_gray8(
            w.max(1),
            h.max(1),
            &vec![0; w.max(1) * h.max(1)],
            calibration,
        )
        .map_err(err)?;
        frame.intensity = intensity;
        let pipeline = &self.pipeline;
        let session = &self.session;
        let draw = overlay;
        let (result, overlay, overlay_ms) = py
            .detach(|| -> sonoguide::Result<_> {
                let r = if stream {
                    let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
                    pipeline.process_in(&mut s, &frame)?
                } else {
                    pipeline.process(&frame)?
                };
                let start = std::time::Instant::now();
                let overlay = if draw {
                    Some(sonoguide::overlay::draw_plan(
                        &r.despeckled,
                        &r.segmentation.labels,
                        &r.plan,
                        r.segmentation.mm_per_px,
                    )?)
                } else {
                    None
                };
                Ok((r, overlay, start.elapsed().as_secs_f64() * 1000.0))
            })
            .map_err(err)?;
        let out = PyDict::new(py);
        out.set_item("labels", result.segmentation.labels.into_pyarray(py))?;
        out.set_item("despeckled", result.despeckled.into_pyarray(py))?;
        match overlay {
            Some(img) => {
                let (ow, oh) = img.dimensions();
                let a =
                    ndarray::Array3::from_shape_vec((oh as usize, ow as usize, 3), img.into_raw())
                        .map_err(err)?;
                out.set_item("overlay", a.into_pyarray(py))?;
            }
            None => out.set_item("overlay", py.None())?,
        }
        let plan = serde_json::to_value(&result.plan).map_err(err)?;
        out.set_item("plan", to_py(py, &plan)?)?;
        let mut timings = serde_json::to_value(result.timings).map_err(err)?;
        if let Some(t) = timings.as_object_mut() {
            t.insert("overlay_ms".into(), serde_json::json!(overlay_ms));
        }
        out.set_item("timings", to_py(py, &timings)?)?;
        Ok(out)
    }
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The frames of a DICOM file, one dict each: `index`, `image` (float32, 0–255),
/// `spacing_mm` ((x, y) or None), `calibration` (status), `calibration_source`, `region`
/// ((x0, y0, x1, y1), end exclusive).
#[pyclass(module = "sonoguide._sonoguide")]
struct DicomFrames {
    file: sonoguide::dicom::DicomFile,
    next: usize,
}

#[pymethods]
impl DicomFrames {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __len__(&self) -> usize {
        self.file.frame_count()
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        if self.next >= self.file.frame_count() {
            return Ok(None);
        }
        let k = self.next;
        self.next += 1;
        let file = &self.file;
        let frame = py.detach(|| file.read_frame(k)).map_err(err)?;
        let d = PyDict::new(py);
        d.set_item("index", k)?;
        let r = frame.region.bounds;
        d.set_item("region", (r.x0, r.y0, r.x1, r.y1))?;
        d.set_item("calibration", frame.calibration.status())?;
        match &frame.calibration {
            Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                source,
                ..
            } => {
                d.set_item("spacing_mm", (*mm_per_px_x, *mm_per_px_y))?;
                let s = serde_json::to_value(source).map_err(err)?;
                d.set_item("calibration_source", to_py(py, &s)?)?;
            }
            _ => {
                d.set_item("spacing_mm", py.None())?;
                d.set_item("calibration_source", py.None())?;
            }
        }
        d.set_item("image", frame.intensity.into_pyarray(py))?;
        Ok(Some(d))
    }
}

/// Opens a DICOM file; iterate over the result for its frames.
#[pyfunction]
fn read_dicom(py: Python<'_>, path: std::path::PathBuf) -> PyResult<DicomFrames> {
    let file = py
        .detach(|| {
            sonoguide::dicom::DicomFile::open(&path, &sonoguide::dicom::ReadOptions::default())
        })
        .map_err(err)?;
    Ok(DicomFrames { file, next: 0 })
}

#[pymodule]
fn _sonoguide(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPipeline>()?;
    m.add_class::<DicomFrames>()?;
    m.add_class::<PyBatch>()?;
    m.add_function(wrap_pyfunction!(plan_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(dicomweb_search, m)?)?;
    m.add_function(wrap_pyfunction!(dicomweb_retrieve, m)?)?;
    m.add_function(wrap_pyfunction!(dicomweb_store, m)?)?;
    m.add("ServerError", m.py().get_type::<ServerError>())?;
    m.add_function(wrap_pyfunction!(read_dicom, m)?)?;
    m.add("SonoguideError", m.py().get_type::<SonoguideError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
