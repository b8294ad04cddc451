//! No build step: this script exists so that the `syn` build-dependency in Cargo.toml (which
//! keeps proc-macro features the same with and without `mpi`) is part of the build.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
}
