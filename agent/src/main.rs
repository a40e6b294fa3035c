//! `clusteragent`: the daemon on every host, and the one-process tools beside it.

fn main() -> std::process::ExitCode {
    clusteragent::cli::main()
}
