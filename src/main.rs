use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use stitcher::cli::{Cli, Command};

/// malloc and free were a fifth of the pipeline's CPU under glibc's allocator (`perf`, docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing() {
    let filter = EnvFilter::try_from_env("STITCHER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("STITCHER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Demo(_)) {
        // The one-shot commands print to stdout like any Unix tool: `stitcher inspect ... | head` ends
        // quietly when head has read enough, instead of panicking on the closed pipe.
        // SAFETY: setting a signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => stitcher::commands::run(args).await,
            Command::Demo(args) => stitcher::demo::run(args).await,
            Command::Generate(args) => stitcher::commands::generate(args).await,
            Command::Inspect(args) => stitcher::commands::inspect(args),
            Command::Export(args) => stitcher::commands::export(args),
            Command::Erase(args) => stitcher::commands::erase(args).await,
            Command::Unlink(args) => stitcher::commands::unlink(args).await,
            Command::Unsuppress(args) => stitcher::commands::unsuppress(args).await,
            Command::Release(args) => stitcher::commands::release(args).await,
            Command::Bench(args) => stitcher::commands::bench(args).await,
            Command::Quality(args) => stitcher::commands::quality(args),
            Command::Backtest(args) => stitcher::commands::backtest(args),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
