//! The `meswitch` binary: every error ends as one `error: ...` line and a
//! non-zero exit status.

use std::process::ExitCode;

fn main() -> ExitCode {
    match meswitch_server::cli::main(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the error's context chain on one line.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}
