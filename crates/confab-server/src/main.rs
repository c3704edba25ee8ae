//! The `confab` binary: `serve` (default), `migrate`, `seed-demo` and the
//! admin commands. All the work is in the library.

use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: with thousands of streams, glibc's
/// allocator took ≈ 15 % of the server's CPU in the sse-1k profile
/// (`_int_malloc`, `_int_free`, `malloc_consolidate`, …) and fragmented
/// across threads (BENCHMARKS.md, "Cheaper tokens").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    confab_server::cli::main()
}
