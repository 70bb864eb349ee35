//! `sonoguide serve`: the OpenIGTLink server until SIGINT or SIGTERM.

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
}

/// `sonoguide serve`.
pub fn serve(args: ServeArgs) -> Outcome {
    use sonoguide::igtl::Event;
    let mut config = sonoguide::PipelineConfig::default();
    config.backend = args.backend.get();
    let pipeline = std::sync::Arc::new(sonoguide::Pipeline::new(config)?);
    let server = sonoguide::igtl::Server::bind(
        &format!("{}:{}", args.bind, args.port),
        pipeline.clone(),
        Default::default(),
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
    server.run(&|event| match event {
        Event::Listening(a) => eprintln!("listening on {a}"),
        Event::Connected(a) => eprintln!("{a}: connected"),
        Event::Disconnected(a) => eprintln!("{a}: disconnected"),
        Event::Answered {
            peer, latency_ms, ..
        } => eprintln!("{peer}: answered in {latency_ms:.1} ms"),
        Event::Refused { peer, reason } => eprintln!("{peer}: closed: {reason}"),
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
