//! Measuring: machine load, CPU clocks of a process, and the summaries the tables print.

use crate::Cli;
use anyhow::Context;
use std::time::{Duration, Instant};

/// Waits until the 1-minute load average is below the threshold (bounded), and returns it.
pub(crate) async fn settle(cli: &Cli) -> Load {
    let deadline = Instant::now() + Duration::from_secs(cli.load_wait_secs);
    loop {
        let load = loadavg();
        if load < cli.load_below {
            return Load { value: load, settled: true };
        }
        if Instant::now() >= deadline {
            return Load { value: load, settled: false };
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) value: f64,
    pub(crate) settled: bool,
}

/// The machine's CPU time so far, in clock ticks from `/proc/stat`: all of it, and the part
/// the hypervisor gave to other guests (steal).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuClock {
    pub(crate) total: u64,
    pub(crate) steal: u64,
}

impl CpuClock {
    pub(crate) fn now() -> Option<CpuClock> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> =
            stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        Some(CpuClock { total: fields.iter().take(8).sum(), steal: *fields.get(7)? })
    }

    /// Percent of the machine's CPU time stolen since `self`; NaN when unknown.
    pub(crate) fn steal_percent_since(self) -> f64 {
        match CpuClock::now() {
            Some(now) if now.total > self.total => {
                100.0 * (now.steal - self.steal) as f64 / (now.total - self.total) as f64
            }
            _ => f64::NAN,
        }
    }
}

/// Steal time of each run: `0.0% 3.9% 0.2%`.
pub(crate) fn steals(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.1}%")).collect::<Vec<_>>().join(" ")
}

/// Load averages at the start of each run: `0.41 0.52 0.60`, with `!` after one that never settled.
pub(crate) fn loads(loads: &[Load]) -> String {
    loads.iter().map(|l| format!("{:.2}{}", l.value, if l.settled { "" } else { "!" })).collect::<Vec<_>>().join(" ")
}

/// `median (min-max)` of the values, formatted with `fmt`.
pub(crate) fn spread(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.len() == 1 {
        return fmt(v[0]);
    }
    format!("{} ({}-{})", fmt(median(&v)), fmt(v[0]), fmt(v[v.len() - 1]))
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

pub(crate) fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (user, sys) = cpu_user_sys(pid)?;
    Ok(user + sys)
}

/// utime and stime of a process, in seconds.
pub(crate) fn cpu_user_sys(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime / ticks, stime / ticks))
}

/// Context switches of every thread of a process (voluntary and not): each time it went to
/// sleep waiting for work or was preempted. A figure of wake-ups that, unlike CPU time,
/// does not depend on how fast the machine is.
pub(crate) fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

/// A `Vm*` figure of /proc/PID/status, in MiB.
pub(crate) fn vm_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("malformed status line")?.parse()?;
    Ok(kb / 1024.0)
}
