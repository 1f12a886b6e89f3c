//! Only for `--features cuda`. candle-kernels asks the linker for `-lcudart`, and the CUDA runtime
//! from PyPI ships only `libcudart.so.13` and `libcudart_static.a`. When `PHIGEN_CUDART_STATIC`
//! names the static library (`scripts/build-cuda.sh` sets it), this writes `OUT_DIR/libcudart.so`,
//! a linker script that links it statically, so the binary needs no CUDA runtime where it runs
//! (only the driver's libcuda and cuBLAS / cuRAND). The CPU build does nothing here.
use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=PHIGEN_CUDART_STATIC");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Some(lib) = std::env::var_os("PHIGEN_CUDART_STATIC") {
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        let script = format!(
            "INPUT({} -lrt -lpthread -ldl)\n",
            PathBuf::from(lib).display()
        );
        std::fs::write(out.join("libcudart.so"), script).expect("OUT_DIR is writable");
        println!("cargo::rustc-link-search=native={}", out.display());
    }
}
