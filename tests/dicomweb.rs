//! DICOMweb against a real PACS: Orthanc with its DICOMweb plugin (Debian packages `orthanc`
//! and `orthanc-dicomweb`), started here as a foreground process on 127.0.0.1 with its own
//! configuration and stopped at the end. The sample data goes in through Orthanc's REST API;
//! `process URL --store` must put an overlay series and a SEG series back into each study;
//! wrong credentials and an unreachable server end with exit 3; `watch` processes a newly
//! stored instance within the issue's 10 s, exactly once, and a restarted watch redoes nothing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The issue's bound on how soon `watch` must have processed a new instance.
const WATCH_DEADLINE: Duration = Duration::from_secs(10);
/// How long Orthanc may take to start answering (it creates its database first).
const ORTHANC_START: Duration = Duration::from_secs(30);
const USER: &str = "sono";
const PASSWORD: &str = "guide-test";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sonoguide"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Orthanc, killed on drop.
struct Orthanc {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Orthanc {
    fn start(test: &str) -> Option<Orthanc> {
        let exe = common::find_tool(test, "Orthanc", "Debian package orthanc")
            .or_else(|| Some(PathBuf::from("/usr/sbin/Orthanc")).filter(|p| p.is_file()))?;
        let plugin = Path::new("/usr/share/orthanc/plugins/libOrthancDicomWeb.so");
        if !plugin.is_file() {
            common::missing_tool(
                test,
                "the Orthanc DICOMweb plugin (Debian package orthanc-dicomweb)",
            );
            return None;
        }
        let dir =
            std::env::temp_dir().join(format!("sonoguide-orthanc-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("db")).unwrap();
        let port = free_port();
        let config = serde_json::json!({
            "Name": "sonoguide-test",
            "StorageDirectory": dir.join("db"),
            "IndexDirectory": dir.join("db"),
            "HttpPort": port,
            "DicomServerEnabled": false,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": true,
            "RegisteredUsers": { USER: PASSWORD },
            "Plugins": [plugin],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let config_path = dir.join("orthanc.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
        let child = Command::new(exe)
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let orthanc = Orthanc { child, port, dir };
        let start = Instant::now();
        while orthanc.get("/system").is_err() {
            assert!(
                start.elapsed() < ORTHANC_START,
                "Orthanc did not answer: {}",
                std::fs::read_to_string(orthanc.dir.join("orthanc.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(orthanc)
    }

    fn url(&self) -> String {
        format!("dicomweb+http://127.0.0.1:{}/dicom-web", self.port)
    }

    fn auth() -> String {
        // "sono:guide-test" in base64.
        "Basic c29ubzpndWlkZS10ZXN0".to_string()
    }

    fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        let mut r = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .header("Authorization", Self::auth())
            .call()
            .map_err(|e| e.to_string())?;
        let s = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
        serde_json::from_str(&s).map_err(|e| e.to_string())
    }

    /// Stores a file through Orthanc's own REST API (not DICOMweb).
    fn upload(&self, file: &Path) {
        let bytes = std::fs::read(file).unwrap();
        let mut r = ureq::post(&format!("http://127.0.0.1:{}/instances", self.port))
            .header("Authorization", Self::auth())
            .send(&bytes[..])
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(v["Status"], "Success", "{v}");
    }

    /// (Modality, Series Description) of every series of `study`, through QIDO-RS.
    fn series_of(&self, study: &str) -> Vec<(String, String)> {
        let v = self
            .get(&format!(
                "/dicom-web/studies/{study}/series?includefield=0008103E"
            ))
            .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let f = |tag: &str| s[tag]["Value"][0].as_str().unwrap_or("").to_string();
                (f("00080060"), f("0008103E"))
            })
            .collect()
    }
}

fn uid(path: &Path, tag: dicom_core::Tag) -> String {
    dicom_object::open_file(path)
        .unwrap()
        .element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-dicomweb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn process_store_round_trip_and_server_errors() {
    let Some(orthanc) = Orthanc::start("dicomweb-process") else {
        return;
    };
    for f in samples() {
        orthanc.upload(&f);
    }
    let studies: std::collections::BTreeSet<String> = samples()
        .iter()
        .map(|f| uid(f, dicom_dictionary_std::tags::STUDY_INSTANCE_UID))
        .collect();
    let study = studies.iter().next().unwrap().clone();
    let out = temp("process");
    let o = bin()
        .args([
            "process",
            &orthanc.url(),
            "--study",
            &study,
            "--store",
            "--backend",
            "cpu",
        ])
        .args(["--user", USER, "--out"])
        .arg(&out)
        .env("SONOGUIDE_DICOMWEB_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // Every ultrasound instance of the study was processed, and the study now holds an
    // overlay series and a SEG series per processed instance.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let processed = summary["files"].as_array().unwrap().len();
    let in_study = samples()
        .iter()
        .filter(|f| uid(f, dicom_dictionary_std::tags::STUDY_INSTANCE_UID) == study)
        .count();
    assert_eq!(processed, in_study, "{err}");
    let series = orthanc.series_of(&study);
    let count = |modality: &str, description: &str| {
        series
            .iter()
            .filter(|(m, d)| m == modality && d == description)
            .count()
    };
    assert_eq!(
        count("SEG", "sonoguide segmentation (research tool)"),
        processed,
        "{series:?}"
    );
    assert_eq!(
        count("US", "sonoguide overlay (research tool)"),
        processed,
        "{series:?}"
    );

    // Wrong password, unreachable server: exit 3, naming the server and the problem.
    let o = bin()
        .args([
            "process",
            &orthanc.url(),
            "--user",
            USER,
            "--password",
            "wrong",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("authentication refused (HTTP 401)")
            && err.contains(&orthanc.port.to_string()),
        "{err}"
    );
    let dead = free_port();
    let o = bin()
        .args([
            "process",
            &format!("dicomweb+http://127.0.0.1:{dead}/dicom-web"),
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("unreachable") && err.contains(&dead.to_string()),
        "{err}"
    );
    // A malformed address, or a URL mixed with files: usage errors (exit 2).
    for args in [
        vec!["process", "dicomweb+ftp://x", "--out"],
        vec![
            "process",
            "dicomweb+http://127.0.0.1:1/x",
            "sample-data",
            "--out",
        ],
    ] {
        let o = bin().args(&args).arg(&out).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

fn read_state(out: &Path) -> serde_json::Value {
    std::fs::read_to_string(out.join("watch-state.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::json!({"instances": {}}))
}

#[test]
fn watch_processes_a_new_instance_once_and_resumes() {
    let Some(orthanc) = Orthanc::start("dicomweb-watch") else {
        return;
    };
    let first = &samples()[0];
    orthanc.upload(first);
    let out = temp("watch");
    let log_path = out.with_extension("log");
    let spawn = |once: bool| {
        let log = std::fs::File::create(&log_path).unwrap();
        let mut c = bin();
        c.args([
            "watch",
            &orthanc.url(),
            "--interval-s",
            "1",
            "--backend",
            "cpu",
        ])
        .args(["--user", USER, "--store", "--out"])
        .arg(&out)
        .env("SONOGUIDE_DICOMWEB_PASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .stderr(log);
        if once {
            c.arg("--once");
        }
        c.spawn().unwrap()
    };
    let mut watch = spawn(false);
    let first_uid = uid(first, dicom_dictionary_std::tags::SOP_INSTANCE_UID);
    let start = Instant::now();
    while read_state(&out)["instances"][&first_uid]["status"] != "done" {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the first instance was never done"
        );
        assert!(watch.try_wait().unwrap().is_none(), "watch exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A new instance, from a phantom made now.
    let ph = temp("phantom");
    let o = bin()
        .args(["phantom", "--seed", "4242", "--out"])
        .arg(&ph)
        .output()
        .unwrap();
    assert!(o.status.success());
    let new = std::fs::read_dir(&ph)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dcm"))
        .unwrap();
    let new_uid = uid(&new, dicom_dictionary_std::tags::SOP_INSTANCE_UID);
    orthanc.upload(&new);
    let stored_at = Instant::now();
    while read_state(&out)["instances"][&new_uid]["status"] != "done" {
        assert!(
            stored_at.elapsed() < WATCH_DEADLINE,
            "not processed within {WATCH_DEADLINE:?}: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Three more polls: nothing is processed again (its own outputs, stored back, neither).
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status();
    let start = Instant::now();
    while watch.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "watch did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut log = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    for u in [&first_uid, &new_uid] {
        assert_eq!(log.matches(&format!("processed {u}")).count(), 1, "{log}");
        assert_eq!(read_state(&out)["instances"][u]["attempts"], 1);
        assert_eq!(read_state(&out)["instances"][u]["stored"], true);
    }
    assert!(!log.contains("failed"), "{log}");
    assert_eq!(
        read_state(&out)["instances"].as_object().unwrap().len(),
        2,
        "{log}"
    );
    // A restarted watch remembers: one pass processes nothing.
    let mut again = spawn(true);
    assert!(again.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("processed"), "{log}");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&ph);
    let _ = std::fs::remove_file(&log_path);
}

/// A hostile DICOMweb peer on 127.0.0.1: answers each connection with `answer(request line)`
/// (raw bytes, then closes), or stalls when it returns `None`.
fn hostile_server(answer: fn(&str) -> Option<Vec<u8>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                match answer(&first) {
                    Some(bytes) => {
                        let _ = stream.write_all(&bytes);
                    }
                    None => std::thread::sleep(Duration::from_secs(30)),
                }
            });
        }
    });
    port
}

fn http(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

const ONE_INSTANCE: &str = r#"[{"0020000D":{"vr":"UI","Value":["1.2"]},"0020000E":{"vr":"UI","Value":["1.2.3"]},"00080018":{"vr":"UI","Value":["../../1.2.3.4"]}}]"#;

#[test]
fn hostile_dicomweb_peers_get_clear_errors_and_no_hang() {
    let out = temp("hostile");
    let run = |port: u16| {
        let start = Instant::now();
        let o = bin()
            .args([
                "process",
                &format!("dicomweb+http://127.0.0.1:{port}/dw"),
                "--timeout-s",
                "3",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            start.elapsed(),
        )
    };
    // Not JSON where a DICOM JSON array is promised.
    let port = hostile_server(|_| Some(http("200 OK", "application/dicom+json", b"<html>hello")));
    let (code, err, _) = run(port);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not a DICOM JSON array") && err.contains(&port.to_string()),
        "{err}"
    );
    // A retrieval whose multipart never closes, and a UID that tries to climb out of the cache
    // folder: that instance fails, named; nothing is written outside OUT.
    let port = hostile_server(|line| {
        Some(if line.contains("/instances?") {
            http("200 OK", "application/dicom+json", ONE_INSTANCE.as_bytes())
        } else {
            http(
                "200 OK",
                "multipart/related; type=\"application/dicom\"; boundary=xyz",
                b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDICM but never closed",
            )
        })
    });
    let (code, err, _) = run(port);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("closing boundary"), "{err}");
    assert!(!out.parent().unwrap().join("1.2.3.4.dcm").exists());
    // A body far larger than it sends (the client must not allocate what is claimed): a bad
    // answer, named.
    let port = hostile_server(|_| {
        Some(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 100000000000\r\n\r\n[".to_vec())
    });
    let (code, err, _) = run(port);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("reading the answer"), "{err}");
    // A peer that accepts and never answers: the time limit ends it (3 s here).
    let port = hostile_server(|_| None);
    let (code, err, took) = run(port);
    assert_eq!(code, Some(3), "{err}");
    assert!(took < Duration::from_secs(25), "{took:?}");
    let _ = std::fs::remove_dir_all(&out);
}
