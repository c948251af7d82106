//! The `runcache` binary: see `runcache --help`.

#[tokio::main]
async fn main() {
    let args = std::env::args().skip(1).collect();
    if let Err(e) = runcache::cli::run(args).await {
        // Before logging is set up (a bad setting), stderr is the only channel: one line.
        eprintln!("runcache: {e:#}");
        std::process::exit(1);
    }
}
