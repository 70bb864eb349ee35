//! The library's batch runner, as a front end other than the command line uses it: a task of
//! its own, progress through a callback, unique output folders, failures that do not stop the
//! batch, and a summary that records the configuration and the backend that actually ran.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sonoguide::batch::{self, BatchOptions, Event, FileReport, FileStatus, FileTask};
use sonoguide::{Backend, Compute, Pipeline};

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sample-data")
        .join(name)
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-batch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Counts each input's bytes into `<stem>.len`; fails on inputs whose name has "bad".
struct ByteCount {
    compute: Compute,
}

impl FileTask for ByteCount {
    fn done_marker(&self, stem: &str) -> Option<String> {
        Some(format!("{stem}.len"))
    }
    fn run(
        &self,
        input: &Path,
        dir: &Path,
        stem: &str,
        _frames: Option<(usize, usize)>,
    ) -> Result<FileReport, String> {
        if input.to_string_lossy().contains("bad") {
            return Err(format!("{}: refused by the test task", input.display()));
        }
        let n = std::fs::read(input).map_err(|e| e.to_string())?.len();
        std::fs::write(dir.join(format!("{stem}.len")), n.to_string()).unwrap();
        let mut r = FileReport::default();
        r.frames = 1;
        Ok(r)
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({"command": "byte-count"})
    }
    fn compute(&self) -> &Compute {
        &self.compute
    }
}

#[test]
fn a_task_of_its_own_runs_with_events_unique_names_and_failures_reported() {
    let root = tempdir("own");
    // Two inputs with one stem in different folders, and one that the task refuses.
    for (dir, name) in [("a", "scan.dcm"), ("b", "scan.dcm"), ("b", "bad.dcm")] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::copy(sample("linear_0001.dcm"), root.join(dir).join(name)).unwrap();
    }
    let out = root.join("out");
    let task = ByteCount {
        compute: Compute::new(Backend::Cpu).unwrap(),
    };
    let events = Mutex::new(Vec::new());
    let mut opts = BatchOptions::default();
    opts.jobs = 2;
    let report = batch::run(
        &[root.join("a"), root.join("b")],
        &out,
        &task,
        &opts,
        &|e| {
            let line = match e {
                Event::Started { total } => format!("started {total}"),
                Event::Finished { done, total, .. } => format!("finished {done}/{total}"),
                _ => "other".into(),
            };
            events.lock().unwrap().push(line);
        },
    )
    .unwrap();
    let events = events.into_inner().unwrap();
    assert_eq!(events[0], "started 3");
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events.contains(&"finished 3/3".to_string()));
    assert_eq!(report.count(FileStatus::Ok), 2);
    assert_eq!(report.count(FileStatus::Failed), 1);
    // The shared stem got two folders.
    assert!(out.join("scan/scan.len").is_file());
    assert!(out.join("scan_2/scan_2.len").is_file());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["config"]["command"], "byte-count");
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["backend"], "cpu");
    let failed: Vec<_> = summary["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["error"].as_str().unwrap().contains("bad.dcm"));

    // Resume: complete inputs are skipped, the failed one is tried again.
    opts.skip_existing = true;
    let again = batch::run(
        &[root.join("a"), root.join("b")],
        &out,
        &task,
        &opts,
        &|_| {},
    )
    .unwrap();
    assert_eq!(again.count(FileStatus::Skipped), 2);
    assert_eq!(again.count(FileStatus::Failed), 1);
}

#[test]
fn the_process_task_records_its_configuration_and_the_backend_that_ran() {
    let out = tempdir("process").join("out");
    let pipeline = Pipeline::builder()
        .backend(Backend::Cpu)
        .margin_mm(3.0)
        .build()
        .unwrap();
    let task = batch::ProcessTask::new(pipeline, false);
    let mut opts = BatchOptions::default();
    opts.frames = Some((0, 2));
    let report = batch::run(&[sample("cine_0005.dcm")], &out, &task, &opts, &|_| {}).unwrap();
    assert_eq!(report.count(FileStatus::Ok), 1);
    assert_eq!(report.backend, "cpu");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report.summary_path).unwrap()).unwrap();
    let config = &summary["config"];
    assert_eq!(config["command"], "process");
    assert_eq!(config["backend_requested"], "cpu");
    assert_eq!(config["plan"]["margin_mm"], 3.0);
    assert_eq!(config["filters"][0]["name"], "srad");
    assert_eq!(config["filters"][0]["parameters"]["iterations"], 15.0);
    // Two frames, each stage on the CPU.
    assert_eq!(summary["backends"]["despeckle"]["cpu"], 2);
    assert_eq!(summary["backends"]["features"]["cpu"], 2);
    assert_eq!(summary["backend"], "cpu");
    assert!(summary["sonoguide_version"].is_string());
}

#[test]
fn an_output_folder_that_cannot_be_made_is_a_batch_error() {
    let task = ByteCount {
        compute: Compute::new(Backend::Cpu).unwrap(),
    };
    let e = batch::run(
        &[sample("linear_0001.dcm")],
        Path::new("/proc/sonoguide/nope"),
        &task,
        &BatchOptions::default(),
        &|_| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            sonoguide::Error::Batch(batch::BatchError::OutputFolder { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("/proc/sonoguide/nope"));
}

/// Panics on inputs whose name has "boom": a stand-in for a bug in one file's processing.
struct Panicky;

impl FileTask for Panicky {
    fn done_marker(&self, _stem: &str) -> Option<String> {
        None
    }
    fn run(
        &self,
        input: &Path,
        dir: &Path,
        _stem: &str,
        _frames: Option<(usize, usize)>,
    ) -> Result<FileReport, String> {
        if input.to_string_lossy().contains("boom") {
            panic!("index out of bounds in a test task");
        }
        std::fs::write(dir.join("done"), b"1").unwrap();
        Ok(FileReport::default())
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({"command": "panicky"})
    }
    fn compute(&self) -> &Compute {
        static CPU: std::sync::OnceLock<Compute> = std::sync::OnceLock::new();
        CPU.get_or_init(|| Compute::new(Backend::Cpu).unwrap())
    }
}

#[test]
fn a_panic_in_one_file_is_its_internal_error_and_the_batch_goes_on() {
    let root = tempdir("panic");
    for name in ["a.dcm", "boom.dcm", "c.dcm"] {
        std::fs::copy(sample("linear_0001.dcm"), root.join(name)).unwrap();
    }
    let out = root.join("out");
    let report = batch::run(
        &[
            root.join("a.dcm"),
            root.join("boom.dcm"),
            root.join("c.dcm"),
        ],
        &out,
        &Panicky,
        &BatchOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(report.count(FileStatus::Ok), 2);
    let failed: Vec<_> = report.failures().collect();
    assert_eq!(failed.len(), 1);
    let e = failed[0].error.as_deref().unwrap();
    assert!(
        e.contains("boom.dcm") && e.contains("internal error"),
        "{e}"
    );
    assert!(out.join("a/done").is_file() && out.join("c/done").is_file());
}

/// Every output file under `dir`, relative, and whether any temporary is left.
fn listing(dir: &Path) -> (Vec<String>, Vec<String>) {
    let (mut files, mut temps) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if p.file_name().unwrap().to_string_lossy().ends_with(".tmp") {
                temps.push(rel);
            } else {
                files.push(rel);
            }
        }
    }
    (files, temps)
}

#[test]
fn kill_9_in_the_middle_then_resume_leaves_every_input_complete() {
    let root = tempdir("kill");
    let inputs = root.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    const INPUTS: usize = 4;
    const FRAMES: usize = 8; // cine_0005 has 8 frames
    for k in 0..INPUTS {
        std::fs::copy(
            sample("cine_0005.dcm"),
            inputs.join(format!("cine_{k}.dcm")),
        )
        .unwrap();
    }
    let out = root.join("out");
    let bin = env!("CARGO_BIN_EXE_sonoguide");
    let mut child = std::process::Command::new(bin)
        .args(["process", "--backend", "cpu", "--jobs", "1", "--out"])
        .arg(&out)
        .arg(&inputs)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the second input has started: it is then half done.
    let started = out.join("cine_1/frame_0000.overlay.png");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !started.exists() && std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("cine_3/cine_3.overlay.dcm").exists(),
        "the run was killed before its end (else this test proves nothing)"
    );

    let status = std::process::Command::new(bin)
        .args(["process", "--backend", "cpu", "--skip-existing", "--out"])
        .arg(&out)
        .arg(&inputs)
        .status()
        .unwrap();
    assert!(status.success());
    let (files, temps) = listing(&out);
    assert!(temps.is_empty(), "temporaries left: {temps:?}");
    for k in 0..INPUTS {
        let stem = format!("cine_{k}");
        let dcm = out.join(&stem).join(format!("{stem}.overlay.dcm"));
        let file = sonoguide::dicom::DicomFile::open(&dcm, &Default::default()).unwrap();
        assert_eq!(file.frame_count(), FRAMES, "{stem}");
        file.read_frame(FRAMES - 1).unwrap();
        for f in 0..FRAMES {
            for ext in ["overlay.png", "labels.png", "bone.json", "plan.json"] {
                let name = format!("{stem}/frame_{f:04}.{ext}");
                assert!(files.contains(&name), "{name} missing");
            }
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["failed"], 0);
    assert!(summary["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["status"] == "skipped"));
}
