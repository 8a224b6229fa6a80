use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    chat_cli::cli::run(chat_cli::cli::Cli::parse()).await
}
