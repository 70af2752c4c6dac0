//! This process's resident memory, CPU time and start time, read from `/proc/self` as
//! Prometheus client libraries' process collectors do. `prometheus-client` has none built
//! in, and three numbers from two files do not warrant another dependency. On systems
//! without `/proc` every reading is `None`, and the metrics built on them are left out.

use std::sync::OnceLock;

/// What `/proc/self/stat` says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStat {
    /// Resident set size in bytes.
    pub resident_bytes: u64,
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Clock ticks from boot to the process's start.
    start_ticks: u64,
}

/// Clock ticks per second and the page size, from `sysconf`.
fn units() -> Option<(f64, u64)> {
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    (ticks > 0 && page > 0).then_some((ticks as f64, page as u64))
}

/// Parses the text of `/proc/<pid>/stat` (see proc(5)). The command name in parentheses
/// may hold spaces and parentheses itself, so fields are counted after its last `)`.
pub fn parse_stat(text: &str, ticks_per_second: f64, page_size: u64) -> Option<ProcessStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; proc(5) numbers utime 14, stime 15,
    // starttime 22 and rss 24.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let (utime, stime, start_ticks) = (field(14)?, field(15)?, field(22)?);
    let rss_pages = fields.get(24 - 3)?.parse::<i64>().ok()?.max(0) as u64;
    Some(ProcessStat {
        resident_bytes: rss_pages * page_size,
        cpu_seconds: (utime + stime) as f64 / ticks_per_second,
        start_ticks,
    })
}

/// This process's stat now, or `None` without `/proc`.
pub fn stat() -> Option<ProcessStat> {
    let (ticks, page) = units()?;
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?, ticks, page)
}

/// The `btime` line of `/proc/stat`: the boot time in Unix seconds.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|t| t.trim().parse().ok())
}

/// When this process started, in Unix seconds; read once.
pub fn start_time_seconds() -> Option<f64> {
    static START: OnceLock<Option<f64>> = OnceLock::new();
    *START.get_or_init(|| {
        let (ticks, _) = units()?;
        let boot = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
        Some(boot as f64 + stat()?.start_ticks as f64 / ticks)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let text = "4242 (walbust (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 123456 \
                    104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(text, 100.0, 4096).expect("parses");
        assert_eq!(s.resident_bytes, 2560 * 4096);
        assert!((s.cpu_seconds - 3.0).abs() < 1e-9, "{}", s.cpu_seconds);
        assert_eq!(s.start_ticks, 123456);
        assert_eq!(parse_stat("4242 (cut", 100.0, 4096), None);
        assert_eq!(parse_stat("4242 (short) S 1 2", 100.0, 4096), None);
    }

    #[test]
    fn this_process_has_memory_cpu_time_and_a_start_time_in_the_past() {
        let s = stat().expect("/proc/self/stat on Linux");
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        let started = start_time_seconds().expect("a start time");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(started <= now + 1.0 && started > now - 86_400.0, "{started} vs {now}");
        assert_eq!(boot_time("cpu 1 2\nbtime 1700000000\nprocesses 5\n"), Some(1_700_000_000));
    }
}
