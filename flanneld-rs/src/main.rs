//! The flanneld-rs daemon binary: flags, logging, runtime; the rest lives in `daemon`.

use flanneld_rs::flags::{Command, Flags};
use flanneld_rs::{daemon, policy_cli, single, status};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let flags = Flags::from_args();
    if let Some(Command::Status { subnet_file, json }) = &flags.command {
        let socket = single::socket_path(subnet_file);
        return std::process::ExitCode::from(status::client::run(&socket, *json));
    }
    if let Some(Command::Policy(args)) = &flags.command {
        return std::process::ExitCode::from(policy_cli::run(&flags, args));
    }
    if let Err(why) = flags.check() {
        eprintln!("flanneld-rs: {why}");
        return std::process::ExitCode::FAILURE;
    }
    // -v raises our own crates' detail; the libraries (gRPC, HTTP/2) stay at info unless
    // RUST_LOG asks for them.
    let level = match flags.verbosity {
        0 => "info",
        1..=4 => "info,flanneld_rs=debug,subnet_manager=debug,encap=debug",
        _ => "info,flanneld_rs=trace,subnet_manager=trace,encap=trace",
    };
    // RUST_LOG, when set, wins over -v (e.g. RUST_LOG=subnet_manager=debug).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "flanneld-rs starting");

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(flags)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("fatal: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
