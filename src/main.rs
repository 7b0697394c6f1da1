//! The `t2i` binary: parse flags, set up logging, run the subcommand, map errors to exit codes
//! (0 success, 1 failure, 2 bad usage: invalid flag values, missing or unsupported model files).

use std::process::ExitCode;

use clap::Parser;

use t2i_worker::cli::{Cli, Command, UsageError};

/// candle allocates a fresh buffer for every op; with glibc's malloc, large blocks are mmap'd and
/// unmapped each time, so the kernel zeroes and faults in every page again (a third of CPU time in
/// a profile of the VAE decoder). mimalloc keeps and reuses freed memory.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pin_thread_count();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's first line says what is wrong; its usage footer is noise in logs.
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log.as_deref(), &cli.log_format);
    if matches!(
        cli.command,
        Command::Generate(_) | Command::Bench(_) | Command::Worker(_)
    ) {
        keep_freed_memory();
    }
    let result = match cli.command {
        // Local, synchronous work: the model runs on this thread (and candle's own pool).
        Command::Generate(args) => t2i_worker::generate::run(args),
        Command::Bench(args) => t2i_worker::bench::run(args),
        Command::Schemas(args) => t2i_worker::schemas::write(&args.out),
        Command::Healthcheck(args) => t2i_worker::healthcheck::run(args),
        // Everything that talks to the broker runs on the process's one runtime.
        command => run_async(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain, no backtrace.
            eprintln!("error: {err:#}");
            if err.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The broker-facing subcommands, on one multi-threaded tokio runtime; the long-running ones
/// stop on SIGINT/SIGTERM.
fn run_async(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Clients (cancel, enqueue) keep the default: a signal ends them at once.
        let shutdown = t2i_worker::shutdown::on_signals;
        match command {
            Command::Worker(args) => {
                let cfg = t2i_worker::config::worker_config(&args)?;
                t2i_worker::worker::run(cfg, shutdown()).await
            }
            Command::Cancel(args) => t2i_worker::cancel::run(args).await,
            Command::Batch(cmd) => t2i_worker::batch::run(cmd).await,
            Command::Enqueue(args) => t2i_worker::enqueue::run(args).await,
            Command::Webhooks(args) => t2i_worker::webhooks::run(args, shutdown()).await,
            Command::Gateway(args) => t2i_worker::gateway::run(args, shutdown()).await,
            Command::Generate(_)
            | Command::Bench(_)
            | Command::Schemas(_)
            | Command::Healthcheck(_) => {
                unreachable!("synchronous subcommands are dispatched in main")
            }
        }
    })
}

/// mimalloc 3 hands freed memory back to the OS `purge_delay` after it is freed (1 s by default), so
/// the next large tensor of the following step or image faults in and zeroes fresh pages again
/// (`clear_page_erms` in `perf`; about 5% of a UNet step's wall time at 256² and 512², `t2i bench`).
/// A render's peak memory is needed again by the next render, so keep it; only in the subcommands
/// that render: elsewhere (a data set streamed from the store, say) kept memory only grows, e.g.
/// `t2i batch manifest` of 4,000 / 40,000 stored results peaked at 53–57 / 65–69 MiB with it and at
/// 46–50 / 56 MiB without, two runs of each binary alternated on one batch.
/// An explicit `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the 16th option; -1: never purge).
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: mimalloc's options are plain integers it reads on each use; setting one is
        // thread-safe and valid at any time.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
        };
    }
}

/// candle 0.11 re-derives its thread count on every CPU matmul and, without `RAYON_NUM_THREADS`,
/// re-reads /proc/cpuinfo each time (`num_cpus::get_physical`): 15% of the time of a small-image batch
/// in a profile. Fix the count once, to the value candle would have chosen.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: called first thing in main, before any thread exists, so nothing reads the
        // environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string())
        };
    }
}

/// `--log`/`T2I_LOG` first, then `RUST_LOG` (what operators and the tracing ecosystem reach for),
/// then `info`; an empty or unparsable filter falls back to `info` rather than silence.
fn log_filter(flag: Option<&str>, rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    flag.or(rust_log)
        .filter(|f| !f.trim().is_empty())
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"))
}

fn init_logging(flag: Option<&str>, format: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(flag, rust_log.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format.eq_ignore_ascii_case("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn the_flag_wins_then_rust_log_then_info() {
        let f = |flag, env| log_filter(flag, env).to_string();
        assert_eq!(f(Some("warn"), Some("debug")), "warn");
        assert_eq!(f(None, Some("t2i_worker=debug")), "t2i_worker=debug");
        assert_eq!(f(None, None), "info");
        assert_eq!(f(None, Some("")), "info");
        assert_eq!(f(Some("=[bad"), None), "info");
    }
}
