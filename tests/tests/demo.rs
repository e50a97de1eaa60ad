//! `cargo xtask demo` is the first thing a new user runs: CI runs it too, through the same
//! code path, so a broken demo (or a product regression it checks) fails the build.

use std::process::Command;

#[test]
fn the_demo_runs_every_step_and_cleans_up() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--", "demo"])
        .output()
        .expect("running cargo xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    for step in [
        "1. The nodes",
        "5. A rolling update",
        "6. Seed 001 with an image",
        "8. A secret",
        "10. The visualizer",
    ] {
        assert!(stdout.contains(step), "no step {step:?} in:\n{stdout}");
    }
    assert!(stdout.contains("everything it created is gone"), "{stdout}");
    assert!(!stdout.contains("Demo stopped"), "{stdout}");
}
