//! CPU accounting shared by the benchmarks: how much CPU this process and the whole machine
//! used, so that figures taken while the machine was busy can be flagged.

use std::time::Duration;

/// CPU time of this process so far (user + system, all threads), from `/proc/self/stat`;
/// `None` where that is unavailable. Resolution: 10 ms (USER_HZ = 100).
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq, softirq, steal), from
/// `/proc/stat`; `None` where that is unavailable.
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(Duration::from_millis(busy * 10))
}
