use std::process::ExitCode;

use clap::Parser;

// Generation allocates many small strings per record; mimalloc is measurably faster than glibc's here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = phigen::cli::Cli::parse();
    phigen::cli::init_logging(&cli);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts on any supported OS");
    match runtime.block_on(phigen::cli::run(cli)) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            eprintln!("error: {e:#}");
            phigen::cli::error_exit_code(&e)
        }
    }
}
