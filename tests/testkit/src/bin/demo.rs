//! The quick start: `cargo run -p testkit --bin demo` (or `scripts/demo.sh`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = testkit::demo::DemoArgs::parse();
    testkit::demo::init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(testkit::demo::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
