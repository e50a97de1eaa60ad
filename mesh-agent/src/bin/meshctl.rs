use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    mesh_agent::logging::init("warn");
    let cli = mesh_agent::cli::Cli::parse();
    if let Err(e) = mesh_agent::cli::run(cli).await {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
