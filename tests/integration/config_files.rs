//! The command line against config files that are missing, hostile or odd: every failure
//! is quick, exits 2 and prints `error:` with the reason. No servers are needed.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs walbust with `args`, killing it if it has not finished within 60 s.
pub(super) fn walbust(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning walbust");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("waiting for walbust").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("walbust {args:?} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("walbust output")
}

pub(super) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_missing_config_prints_one_error_line_with_the_os_reason_once_under_every_subcommand() {
    for command in [
        &["run"][..],
        &["check"],
        &["check", "--online"],
        &["status"],
        &["health"],
        &["setup"],
        &["setup", "--apply"],
        &["record", "--output", "/dev/null"],
        &["invalidate", "--key", "k"],
    ] {
        let mut args = command.to_vec();
        args.extend(["--config", "/missing/config.toml"]);
        let out = walbust(&args);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).trim_end(),
            "error: cannot read config file /missing/config.toml: No such file or directory (os error 2)",
            "{command:?}"
        );
        assert!(out.stdout.is_empty(), "{command:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn an_unreachable_redis_under_invalidate_names_the_os_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\n\
             [redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n"
        ),
    )
    .unwrap();
    let out = walbust(&["invalidate", "--config", config.to_str().unwrap(), "--key", "k"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with(&format!("error: redis at redis://127.0.0.1:{port}/0 failed")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
}

#[test]
fn check_and_run_both_reject_redis_settings_that_would_fail_forever() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/r.toml"), "[[rule]]\nname = \"r\"\ntable = \"t\"\nkeys = [\"k\"]\n").unwrap();
    let config = dir.path().join("config.toml");
    for (redis, expected) in [
        ("url = \"redis://127.0.0.1:notaport/0\"", "invalid redis url"),
        ("url = \"rediss://127.0.0.1:1/0#insecure\"", "asks for #insecure TLS"),
        ("url = \"redis://127.0.0.1:1/0\"\nca_file = \"config.toml\"", "is set but the redis url is not rediss://"),
        ("url = \"rediss://127.0.0.1:1/0\"\nca_file = \"config.toml\"", "holds no PEM certificate"),
    ] {
        let text = format!(
            "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\n[redis]\n{redis}\n[metrics]\nlisten = \"off\"\n"
        );
        std::fs::write(&config, text).unwrap();
        for command in ["check", "run"] {
            let out = walbust(&[command, "--config", config.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(2), "{command} with {redis}: {}", stderr(&out));
            assert!(stderr(&out).contains(expected), "{command} with {redis}: {}", stderr(&out));
        }
    }
}

#[test]
fn a_fifo_or_device_as_config_fails_at_once_instead_of_hanging_or_reading_forever() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a path in our own temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, what) in [(fifo.as_path(), "a FIFO"), (Path::new("/dev/zero"), "a device")] {
        let out = walbust(&["run", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert_eq!(
            stderr(&out).trim_end(),
            format!(
                "error: config file {} is {what}, not a regular file; give the path of a regular file",
                path.display()
            )
        );
    }
}

#[test]
fn a_password_in_replay_redis_on_the_command_line_is_warned_about_and_the_env_var_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("empty.jsonl");
    std::fs::write(&recording, "").unwrap();
    let rules = dir.path().join("r.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"r\"\ntable = \"t\"\nkeys = [\"k\"]\n").unwrap();
    let args = ["replay", "--rules", rules.to_str().unwrap(), recording.to_str().unwrap(), "--apply"];
    let url = "redis://:S3cr3t@127.0.0.1:1/0";
    let on_command_line = walbust(&[&args[..], &["--redis", url]].concat());
    let text = stderr(&on_command_line);
    assert!(text.contains("warning: --redis holds a password, which every local user can read with ps"), "{text}");
    assert!(text.contains("hint: give the url in WALBUST_REDIS_URL instead"), "{text}");
    assert!(!text.contains("S3cr3t"), "{text}");
    let from_env = Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(args)
        .env("WALBUST_REDIS_URL", url)
        .stdin(Stdio::null())
        .output()
        .expect("walbust");
    let text = stderr(&from_env);
    assert!(!text.contains("warning: --redis") && !text.contains("S3cr3t"), "{text}");
    assert!(!text.contains("required"), "the env var stands in for --redis: {text}");
}

#[test]
fn offline_check_passes_without_the_password_file_or_secret_variables_and_run_fails_on_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/r.toml"), "[[rule]]\nname = \"r\"\ntable = \"t\"\nkeys = [\"k\"]\n").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\npassword_file = \"missing\"\n\
         [redis]\nurl = \"redis://:${WALBUST_TEST_UNSET_SECRET}@127.0.0.1:1/0\"\n[metrics]\nlisten = \"off\"\n",
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let out = walbust(&["check", "--deny-warnings", "--config", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("`WALBUST_TEST_UNSET_SECRET` is not set (not needed offline)"), "{}", stderr(&out));
    for args in [&["run", "--config", path][..], &["check", "--online", "--config", path]] {
        let out = walbust(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("cannot use password_file `missing`"), "{args:?}: {}", stderr(&out));
    }
}
