//! `walbust demo`: the built binary, on the throwaway servers it starts itself.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_demo_lists_the_cache_prevents_a_stale_read_counts_pattern_deletes_and_busts_each_key_of_a_reset_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_walbust")).arg("demo").current_dir(ROOT).output().expect("walbust runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let (intro, writes) = stdout.split_once("\n-- ").expect("the demo shows its writes");

    // The cached keys, with their values, before any write.
    for (key, value) in [
        ("user:1:settings:timezone", "Europe/Paris"),
        ("user:2:settings:theme", "light"),
        ("plans_list_acme_stripe_page2", "Enterprise"),
        ("providers_list_initech", "paddle"),
    ] {
        let listed = intro.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [key, value]);
        assert!(listed, "{key} = {value} is not listed before the writes:\n{intro}");
    }

    // One stale read prevented: the old value before the write, a miss after it.
    let line = |label: &str| writes.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_default();
    let before = line("before the write");
    assert!(before.ends_with("GET user:2:settings:theme -> \"light\""), "{before}\n{stdout}");
    let after = line("after it");
    assert!(after.contains("GET user:2:settings:theme -> (nil)"), "{after}\n{stdout}");
    assert!(after.contains("reads \"dark\" from Postgres"), "{after}");

    // Every pattern delete says how many keys it removed.
    let patterns: Vec<&str> = writes.lines().filter(|l| l.contains("SCAN-UNLINK")).collect();
    assert!(patterns.len() >= 4, "{stdout}");
    for l in patterns {
        let count = l.rsplit_once('(').and_then(|(_, note)| note.split(' ').next()).and_then(|n| n.parse::<u64>().ok());
        assert!(count.is_some_and(|n| n > 0) && l.ends_with(" deleted)"), "no count of deleted keys: {l}");
    }

    // A reset of several rows in one transaction: each key busted once.
    let reset = writes.split("\n-- ").find(|w| w.contains("DELETE FROM user_settings")).expect("the reset");
    assert!(reset.contains("3 deletes on public.user_settings, 2 inserts on public.user_settings"), "{reset}");
    assert!(reset.contains("10 actions named, 4 sent to Redis"), "{reset}");
    let mut busted: Vec<&str> =
        reset.lines().filter_map(|l| l.trim().strip_prefix("UNLINK ")?.split_whitespace().next()).collect();
    busted.sort_unstable();
    assert_eq!(
        busted,
        ["user:1:settings:all", "user:1:settings:locale", "user:1:settings:theme", "user:1:settings:timezone"],
        "{reset}"
    );

    // What to try next: commands that run, and a README section that exists.
    let (_, next) = stdout.split_once("what to try next").expect("what to try next");
    let commands: Vec<&str> = next
        .lines()
        .filter(|l| l.trim_start().starts_with("target/"))
        .filter_map(|l| l.trim().split("  ").next())
        .collect();
    assert!(commands.len() >= 2, "{next}");
    for command in commands {
        let mut words = command.split_whitespace();
        let program = Path::new(ROOT).join(words.next().unwrap_or_default());
        let run = Command::new(program).args(words).current_dir(ROOT).output().expect("the suggested command runs");
        assert_eq!(run.status.code(), Some(0), "`{command}`: {}", String::from_utf8_lossy(&run.stderr));
    }
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    assert!(next.contains("\"Quick start against your own database\""), "{next}");
    assert!(readme.contains("\n## Quick start against your own database\n"), "the section the demo points to");
}
