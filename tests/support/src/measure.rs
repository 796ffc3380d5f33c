//! What a process costs, read from `/proc`: CPU time, memory, and how often its threads woke up.
//! For the benchmarks, which judge the gateway by these, not by wall-clock alone.

/// User plus system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / per_second
}

/// How many times the process's threads have been switched in so far (voluntary and not): a
/// thread that sleeps and wakes on a timer counts once per wakeup.
pub fn context_switches(pid: u32) -> u64 {
    context_switches_by_thread(pid).iter().map(|(_, n)| n).sum()
}

/// [`context_switches`] per thread, by the thread's name.
pub fn context_switches_by_thread(pid: u32) -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let name =
                std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_owned();
            let switches = status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:")
                })
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .sum::<u64>();
            (format!("{name} ({})", task.file_name().to_string_lossy()), switches)
        })
        .collect()
}
