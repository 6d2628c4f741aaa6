//! certdeploy: crash-safe certificate deployment worker.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use certdeploy::{Cli, EXIT_FAILED, EXIT_OK, EXIT_USAGE, cli, harden_process, init_logging};
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    init_logging(cli.log_format);
    if let Err(e) = harden_process() {
        eprintln!("certdeploy: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    #[cfg(feature = "failpoints")]
    let _scenario = {
        // Crash tests: a failpoint that panics must kill the process.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            prev(info);
            std::process::abort();
        }));
        fail::FailScenario::setup()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("certdeploy: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(cli::dispatch(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}
