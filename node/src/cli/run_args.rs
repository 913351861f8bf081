//! `cpushare-node run ...` (run by `market::cli::run`).

use clap::Args;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image id (hex) in this buyer's store, or a file to import first.
    #[arg(long)]
    pub image: String,
    /// How many guests to keep running.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// vCPUs each guest gets (sellers offering fewer are passed over).
    #[arg(long = "min-vcpus", default_value_t = 1)]
    pub vcpus: u32,
    /// Memory each guest gets, MiB.
    #[arg(long = "min-mem-mib", default_value_t = 256)]
    pub memory_mib: u64,
    /// Disk each guest may use, MiB (at least the image's size).
    #[arg(long, default_value_t = 1024)]
    pub disk_mib: u64,
    /// Highest price per guest-minute, in credits (e.g. 0.05).
    #[arg(long)]
    pub max_price: Option<String>,
    /// Highest round trip to a seller, as measured by this buyer (libp2p ping).
    #[arg(long)]
    pub max_latency_ms: Option<u32>,
    /// Only sellers whose measurement is on the trusted list and not revoked.
    #[arg(long)]
    pub trusted_only: bool,
    /// End the guests after this long: seconds, or with a unit (90s, 10m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<u64>,
    /// Return once every guest runs; the daemon keeps them (see `leases`, `stop`).
    #[arg(long)]
    pub detach: bool,
    /// Give up when no offer matches for this many seconds.
    #[arg(long, default_value_t = 20)]
    pub offer_wait_s: u64,
    /// Print the final summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--duration`: seconds, or a number with a unit (90s, 10m, 2h).
fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let (num, mul) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .map(|v| v * mul)
        .ok_or_else(|| format!("{s:?} is not a duration like 90, 90s, 10m or 2h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
