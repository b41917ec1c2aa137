//! CPU time and memory of this process, for stats events (Linux `/proc`;
//! zeros elsewhere).

#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessUsage {
    /// User + system CPU time since the process started.
    pub cpu_seconds: f64,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

impl ProcessUsage {
    pub fn read() -> Self {
        let mut usage = Self::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| {
                    fields
                        .get(i)
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
                usage.cpu_seconds = (ticks(11) + ticks(12)) / hz;
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kb = |key: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            usage.rss_mb = kb("VmRSS:") / 1024.0;
            usage.peak_rss_mb = kb("VmHWM:") / 1024.0;
        }
        usage
    }
}
