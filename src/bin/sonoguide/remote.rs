//! DICOMweb: `process dicomweb+http://HOST/ROOT` (retrieve, process, and with `--store` send
//! the overlay and SEG back into each study) and `watch URL` (poll for new ultrasound
//! instances and process each once, remembering what was done in OUT/watch-state.json).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sonoguide::batch::remote::{self, WatchState};
use sonoguide::batch::{self, FileStatus};
use sonoguide::dicomweb::{Auth, DicomWebClient, DicomWebError, InstanceRef, Limits, Query};

use crate::exit::{Failure, Outcome};

/// Where and how to reach a DICOMweb server.
#[derive(clap::Args, Clone)]
pub struct RemoteArgs {
    /// DICOMweb input: only this study.
    #[arg(long)]
    study: Option<String>,
    /// DICOMweb input: only studies from this date on (YYYYMMDD).
    #[arg(long)]
    since: Option<String>,
    /// DICOMweb input: only this modality.
    #[arg(long, default_value = "US")]
    modality: String,
    /// DICOMweb: send the overlay DICOM and the SEG back into each study (STOW-RS).
    #[arg(long)]
    store: bool,
    /// DICOMweb: user for HTTP Basic authentication (the password from
    /// SONOGUIDE_DICOMWEB_PASSWORD or --password).
    #[arg(long)]
    user: Option<String>,
    /// DICOMweb: password for --user (prefer the environment variable: a command line is
    /// visible to other users of the machine).
    #[arg(long, env = "SONOGUIDE_DICOMWEB_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// DICOMweb: bearer token.
    #[arg(long, env = "SONOGUIDE_DICOMWEB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// DICOMweb: seconds allowed for one request.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
}

impl RemoteArgs {
    fn client(&self, url: &str) -> Result<DicomWebClient, Failure> {
        let auth = match (&self.user, &self.password, &self.token) {
            (Some(_), _, Some(_)) => {
                return Err(Failure::Usage(
                    "give either --user (Basic) or a token, not both".into(),
                ))
            }
            (Some(user), password, None) => Auth::Basic {
                user: user.clone(),
                password: password.clone().unwrap_or_default(),
            },
            (None, _, Some(token)) => Auth::Bearer(token.clone()),
            (None, _, None) => Auth::None,
        };
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= 86_400.0) {
            return Err(Failure::Usage(format!(
                "--timeout-s {} must be between 0 and 86400",
                self.timeout_s
            )));
        }
        if let Some(d) = &self.since {
            if d.len() != 8 || !d.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Failure::Usage(format!("--since {d}: expected YYYYMMDD")));
            }
        }
        let mut limits = Limits::default();
        limits.timeout = Duration::from_secs_f64(self.timeout_s);
        DicomWebClient::new(url, auth, limits).map_err(|e| Failure::Usage(e.to_string()))
    }

    fn query(&self) -> Query {
        let mut q = Query::default();
        q.study = self.study.clone();
        q.since = self.since.clone();
        q.modality = Some(self.modality.clone()).filter(|m| !m.is_empty());
        q
    }
}

/// The one DICOMweb URL among `inputs`, if any (a URL cannot be mixed with files).
pub fn url_input(inputs: &[PathBuf]) -> Result<Option<String>, Failure> {
    let urls: Vec<String> = inputs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|s| DicomWebClient::is_url(s))
        .collect();
    match (urls.len(), inputs.len()) {
        (0, _) => Ok(None),
        (1, 1) => Ok(urls.into_iter().next()),
        _ => Err(Failure::Usage(
            "a DICOMweb address must be the only input".into(),
        )),
    }
}

/// A server error as a failure: refused credentials and an unreachable server have their own
/// exit code.
fn server_failure(e: DicomWebError) -> Failure {
    match e {
        DicomWebError::Auth { .. } | DicomWebError::Unreachable { .. } => {
            Failure::Server(e.to_string())
        }
        e => Failure::Failed(e.to_string()),
    }
}

/// `process URL`: every matching instance, through the same batch as files.
pub fn process(
    url: &str,
    remote: &RemoteArgs,
    out: &Path,
    run: impl Fn(&[PathBuf]) -> Result<batch::BatchReport, Failure>,
) -> Outcome {
    let client = remote.client(url)?;
    crate::exit::make_out_dir(out)?;
    let cache = out.join(".dicomweb");
    crate::exit::make_out_dir(&cache)?;
    let found = client
        .search_instances(&remote.query())
        .map_err(server_failure)?;
    let wanted: Vec<&InstanceRef> = found.iter().filter(|i| !i.is_sonoguide_output()).collect();
    eprintln!("{}: {} instance(s) to process", client.base(), wanted.len());
    let mut failures = Vec::new();
    let mut paths = Vec::new();
    let mut study_of = BTreeMap::new();
    for i in wanted {
        match remote::retrieve(&client, &cache, i) {
            Ok(p) => {
                study_of.insert(p.clone(), i.study.clone());
                paths.push(p);
            }
            Err(e @ DicomWebError::Auth { .. }) => return Err(server_failure(e)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let report = run(&paths)?;
    if remote.store {
        for f in report.files.iter().filter(|f| f.status == FileStatus::Ok) {
            let (Some(dir), Some(study)) = (&f.output, study_of.get(&f.path)) else {
                continue;
            };
            let stem = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match remote::store(&client, dir, &stem, study) {
                Ok(n) => eprintln!("stored {n} object(s) for {stem} into study {study}"),
                Err(e) => failures.push(format!("storing the outputs of {stem}: {e}")),
            }
        }
    }
    let failed_inputs = report.failures().count();
    if failures.is_empty() && failed_inputs == 0 {
        return Ok(());
    }
    if !failures.is_empty() {
        eprintln!("DICOMweb failures:");
        for f in &failures {
            eprintln!("  {f}");
        }
    }
    Err(Failure::Reported)
}

/// `watch`'s arguments.
#[derive(clap::Args)]
pub struct WatchArgs {
    /// The DICOMweb server: dicomweb+http://HOST/ROOT (or https).
    url: String,
    /// Output folder; OUT/watch-state.json remembers what was done.
    #[arg(long)]
    out: PathBuf,
    /// Seconds between polls.
    #[arg(long, default_value_t = 2.0)]
    interval_s: f64,
    /// Attempts per instance before it is given up (recorded as failed).
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Poll once, process what is new, and exit.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(flatten)]
    pipeline: crate::batch::PipelineArgs,
}

/// `sonoguide watch`.
pub fn watch(args: WatchArgs) -> Outcome {
    if !(args.interval_s.is_finite() && args.interval_s > 0.0 && args.interval_s <= 86_400.0) {
        return Err(Failure::Usage(format!(
            "--interval-s {} must be between 0 and 86400",
            args.interval_s
        )));
    }
    let client = args.remote.client(&args.url)?;
    let task = args.pipeline.task()?;
    crate::exit::make_out_dir(&args.out)?;
    let cache = args.out.join(".dicomweb");
    crate::exit::make_out_dir(&cache)?;
    let state_path = args.out.join("watch-state.json");
    let mut state = WatchState::load(&state_path).map_err(Failure::Usage)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed));
    }
    let query = args.remote.query();
    let mut backoff = 1u32;
    eprintln!("watching {} every {} s", client.base(), args.interval_s);
    while !stop.load(Ordering::Relaxed) {
        match client.search_instances(&query) {
            Ok(found) => {
                backoff = 1;
                for i in found.iter().filter(|i| !i.is_sonoguide_output()) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let record = state
                        .instances
                        .get(&i.instance)
                        .cloned()
                        .unwrap_or_default();
                    if record.status == "done" || record.attempts >= args.max_attempts {
                        continue;
                    }
                    let record = remote::process_one(
                        &client,
                        &cache,
                        &args.out,
                        &task,
                        i,
                        args.remote.store,
                        record,
                    );
                    eprintln!(
                        "{} {}: {}{}",
                        if record.status == "done" {
                            "processed"
                        } else {
                            "failed"
                        },
                        i.instance,
                        record.status,
                        record
                            .error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    );
                    state.instances.insert(i.instance.clone(), record);
                    state.save(&state_path).map_err(Failure::Failed)?;
                }
            }
            Err(e @ DicomWebError::Auth { .. }) => return Err(server_failure(e)),
            Err(e) if args.once => return Err(server_failure(e)),
            Err(e) => {
                // The server may come back: wait longer each time, up to a minute.
                eprintln!("warning: {e}; retrying");
                backoff = (backoff * 2).min(60);
            }
        }
        if args.once {
            break;
        }
        let wait =
            Duration::from_secs_f64(args.interval_s).max(Duration::from_secs(backoff as u64 - 1));
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let failed = state
        .instances
        .values()
        .filter(|r| r.status != "done")
        .count();
    if failed > 0 {
        eprintln!("{failed} instance(s) failed; see {}", state_path.display());
    }
    Ok(())
}
