//! The kernel templates run on the CPU by the fiber emulator (`cuda/host_emu`, docs/kernels.md):
//! every family, forward, backward and optimizer, against a transcription of the reference, on
//! seeded and adversarial inputs. Full tier (`vpmoe_codegen::full_tier`): there it needs g++.

use std::process::Command;

#[test]
fn every_kernel_family_matches_the_reference_under_the_emulator() {
    if !vpmoe_codegen::full_tier("host emulator kernel suite") {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/host_emu");
    assert!(Command::new("g++").arg("--version").output().is_ok(), "the host emulator needs g++ on the PATH");
    let tmp = std::env::temp_dir().join(format!("vpmoe-emu-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new("sh").arg(dir.join("run.sh")).env("TMPDIR", &tmp).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&tmp);
    let failed: Vec<&str> = text.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty() && text.contains("emulator errors: 0, failures: 0"),
        "{}\n{}\nstderr:\n{}",
        failed.join("\n"),
        text.lines().last().unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );
}
