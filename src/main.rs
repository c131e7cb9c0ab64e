//! `nixpush`: everything lives in the library; see `nixpush::cli`.

fn main() -> std::process::ExitCode {
    nixpush::cli::main()
}
