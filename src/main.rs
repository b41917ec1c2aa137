fn main() -> std::process::ExitCode {
    stepaudio_live::cli::main()
}
