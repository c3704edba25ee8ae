//! The `confab` binary: `serve` (default), `migrate`, `seed-demo` and the
//! admin commands. All the work is in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    confab_server::cli::main()
}
