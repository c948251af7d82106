//! The `runcache` binary: see `runcache --help`.

/// mimalloc instead of glibc's malloc: the hit path allocates small, short-lived buffers on two
/// worker threads, where glibc's arena locks and `malloc_consolidate` showed up in profiles
/// (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args = std::env::args().skip(1).collect();
    if let Err(e) = runcache::cli::run(args).await {
        // Before logging is set up (a bad setting), stderr is the only channel: one line.
        eprintln!("runcache: {e:#}");
        std::process::exit(1);
    }
}
