//! `vpmoe-rt launch --nproc N -- <command> …`: N ranks of this program on one machine, with the
//! variables torchrun would set, without torchrun.

use anyhow::{bail, Context, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Runs `args` (a vpmoe-rt command line) as ranks `0..nproc` of one job and waits for all of
/// them; fails naming every rank that did not exit cleanly.
pub fn launch(nproc: usize, port: Option<u16>, args: &[String]) -> Result<()> {
    if nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if args.is_empty() {
        bail!("launch needs the command each rank runs, e.g. `vpmoe-rt launch --nproc 2 -- train --backend cpu`");
    }
    let port = match port {
        Some(p) => p,
        // A port that was free a moment ago (rank 0 binds it again at once).
        None => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    let exe = std::env::current_exe().context("finding this program to launch its ranks")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..nproc {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push((rank, child));
    }
    // Wait for every rank. Once one fails, the others normally stop at their next collective,
    // naming it; any still running after GRACE (stuck before the rendezvous, say) are killed.
    const GRACE: Duration = Duration::from_secs(30);
    let (mut failed, mut first_failure) = (Vec::new(), None::<Instant>);
    let mut live: Vec<(usize, Child)> = children;
    while !live.is_empty() {
        let mut still = Vec::new();
        for (rank, mut child) in live {
            match child.try_wait().with_context(|| format!("waiting for rank {rank}"))? {
                Some(status) if status.success() => {}
                Some(status) => {
                    failed.push(format!("rank {rank} ({status})"));
                    first_failure.get_or_insert_with(Instant::now);
                }
                None if first_failure.is_some_and(|t| t.elapsed() > GRACE) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push(format!(
                        "rank {rank} (still running {} s after the first failure: killed)",
                        GRACE.as_secs()
                    ));
                }
                None => still.push((rank, child)),
            }
        }
        live = still;
        std::thread::sleep(Duration::from_millis(50));
    }
    if !failed.is_empty() {
        bail!("{} of {nproc} ranks failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
