//! `sonoguide serve`: the OpenIGTLink server until SIGINT or SIGTERM.

use std::time::Duration;

use crate::args::BackendOpt;
use crate::exit::Outcome;

/// `serve`'s arguments.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Port (OpenIGTLink's is 18944; 0 picks a free one).
    #[arg(long, default_value_t = 18944)]
    port: u16,
    #[command(flatten)]
    backend: BackendOpt,
    /// Connections served at once; one beyond it gets a STATUS "busy" and is closed.
    #[arg(long, default_value_t = sonoguide::igtl::DEFAULT_MAX_CONNECTIONS,
          value_parser = positive_count)]
    max_connections: usize,
    /// Bytes buffered for one connection, MiB (a message declaring more closes it).
    #[arg(long, value_parser = positive_count)]
    max_connection_mib: Option<usize>,
    /// Seconds one message may take to arrive (a peer that starts one and stalls is dropped).
    #[arg(long, value_parser = seconds)]
    read_timeout: Option<Duration>,
    /// Seconds a connection may stay silent between messages.
    #[arg(long, value_parser = seconds)]
    idle_timeout: Option<Duration>,
    /// Seconds a peer may take to read the replies to one frame.
    #[arg(long, value_parser = seconds)]
    write_timeout: Option<Duration>,
    #[command(flatten)]
    plan: crate::plan_args::PlanArgs,
}

fn positive_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive whole number")),
    }
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

/// `sonoguide serve`.
pub fn serve(args: ServeArgs) -> Outcome {
    use sonoguide::igtl::Event;
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = args.backend.get();
    args.plan.apply(&mut config)?;
    let pipeline = std::sync::Arc::new(sonoguide::Pipeline::new(config)?);
    let mut limits = sonoguide::igtl::ServerConfig::default();
    limits.max_connections = args.max_connections;
    if let Some(mib) = args.max_connection_mib {
        limits.max_connection_bytes = (mib as u64).saturating_mul(1 << 20);
    }
    limits.read_timeout = args.read_timeout.unwrap_or(limits.read_timeout);
    limits.idle_timeout = args.idle_timeout.unwrap_or(limits.idle_timeout);
    limits.write_timeout = args.write_timeout.unwrap_or(limits.write_timeout);
    let server = sonoguide::igtl::Server::bind(
        &format!("{}:{}", args.bind, args.port),
        pipeline.clone(),
        limits,
    )?;
    let stop = server.stop_flag();
    if let Err(e) =
        ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::Relaxed))
    {
        eprintln!("warning: no signal handler ({e}); stop with SIGKILL");
    }
    eprintln!(
        "sonoguide serve on {} ({}); research tool, not a medical device",
        pipeline.despeckler().device_name(),
        pipeline.despeckler().backend_name()
    );
    let c = server.config();
    eprintln!(
        "limits: {} connections, {} MiB buffered per connection, timeouts: read {:.1} s, \
         idle {:.1} s, write {:.1} s",
        c.max_connections,
        c.max_connection_bytes >> 20,
        c.read_timeout.as_secs_f64(),
        c.idle_timeout.as_secs_f64(),
        c.write_timeout.as_secs_f64()
    );
    server.run(&|event| match event {
        Event::Listening(a) => eprintln!("listening on {a}"),
        Event::Connected(a) => eprintln!("{a}: connected"),
        Event::Disconnected(a) => eprintln!("{a}: disconnected"),
        Event::Answered {
            peer, latency_ms, ..
        } => eprintln!("{peer}: answered in {latency_ms:.1} ms"),
        Event::Refused { peer, reason } => eprintln!("{peer}: closed: {reason}"),
        Event::Rejected { peer, reason } => eprintln!("{peer}: rejected: {reason}"),
        Event::Failed {
            peer,
            device,
            code,
            reason,
        } => eprintln!("{peer}: STATUS {code} for {device:?}: {reason}"),
        Event::Ignored { peer, kind } => eprintln!("{peer}: ignored a {kind} message"),
        _ => {}
    });
    let mut l = server.latencies_ms();
    if l.is_empty() {
        eprintln!("stopped");
        return Ok(());
    }
    l.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "stopped: {} frame(s), latency median {:.1} ms, 99th percentile {:.1} ms",
        l.len(),
        l[l.len() / 2],
        l[((l.len() - 1) as f64 * 0.99) as usize]
    );
    Ok(())
}
