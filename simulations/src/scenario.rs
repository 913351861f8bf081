//! Scenario files (TOML): what to simulate. See simulations/scenarios/*.toml and
//! docs/SIMULATIONS.md for every field.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, SimError};

/// A way of distributing the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Policy {
    /// The node as shipped: super-seeding buyer (`Seeder`), rarest-first sellers.
    #[serde(rename = "shipped")]
    Shipped,
    /// The buyer is an ordinary seed showing everything; sellers rarest-first.
    #[serde(rename = "rarest-first")]
    RarestFirst,
    /// As `rarest-first` but sellers choose chunks at random.
    #[serde(rename = "random")]
    Random,
    /// No swarm: the buyer uploads the whole image to every seller at once.
    #[serde(rename = "naive")]
    Naive,
}

impl Policy {
    /// Name used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Shipped => "shipped",
            Policy::RarestFirst => "rarest-first",
            Policy::Random => "random",
            Policy::Naive => "naive",
        }
    }

    /// Every policy, in table order.
    pub const ALL: [Policy; 4] = [
        Policy::Shipped,
        Policy::RarestFirst,
        Policy::Random,
        Policy::Naive,
    ];
}

/// The whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Sellers fetching the image.
    pub sellers: usize,
    /// Neighbours per seller (besides the buyer). At least sellers-1 gives a full
    /// mesh, as in the real 8-seller benchmark.
    #[serde(default = "default_degree")]
    pub degree: usize,
    #[serde(default = "default_policies")]
    pub policies: Vec<Policy>,
    pub image: ImageSpec,
    pub buyer: BuyerSpec,
    /// The sellers' link mix; shares are normalised.
    pub links: Vec<LinkProfile>,
    #[serde(default)]
    pub latency: LatencySpec,
    /// Payload fraction of a link's rate (1448/1514 = 0.956 for TCP/IPv4 on
    /// Ethernet with timestamps); 1.0 models payload-only links.
    #[serde(default = "default_goodput")]
    pub goodput: f64,
    /// Simulated seconds after which a run stops, finished or not.
    #[serde(default = "default_max_time")]
    pub max_time_s: f64,
    /// Wall-clock seconds after which each run stops where it is (absent: none).
    #[serde(default)]
    pub max_wall_s: Option<f64>,
    /// Sellers report a reply's bytes arriving to their scheduler, as the node
    /// does (false: the scheduler sees only whole chunks, as before).
    #[serde(default = "default_true")]
    pub progress_reports: bool,
    /// Sellers answer Busy to requests that would wait long in their upload
    /// queue, as the node does (false: they queue everything, as before).
    #[serde(default = "default_true")]
    pub admission: bool,
    pub churn: Option<ChurnSpec>,
    pub update: Option<UpdateSpec>,
    pub sweep: Option<SweepSpec>,
    pub leases: Option<LeaseSpec>,
}

/// The image and how it is cut.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Size in MB (10^6 bytes) ...
    pub size_mb: Option<f64>,
    /// ... or in MiB.
    pub size_mib: Option<f64>,
    /// Fixed chunk size in KiB; absent: FastCDC-like 16..256 KiB, 64 KiB average
    /// (the shipped chunker's range).
    pub chunk_kib: Option<u32>,
}

/// The buyer's link.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuyerSpec {
    pub up_mbit: f64,
    pub down_mbit: f64,
    #[serde(default = "default_buyer_latency")]
    pub latency_ms: f64,
}

/// One kind of seller link.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    pub name: String,
    pub share: f64,
    pub up_mbit: f64,
    pub down_mbit: f64,
}

/// One-way access latency of each seller, uniform in [min, max]; a message
/// between two nodes takes the sum of theirs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpec {
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Default for LatencySpec {
    fn default() -> Self {
        LatencySpec {
            min_ms: 5.0,
            max_ms: 40.0,
        }
    }
}

/// Sellers coming and going.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnSpec {
    /// Arrivals spread uniformly over [0, join_spread_s] instead of all at 0.
    #[serde(default)]
    pub join_spread_s: f64,
    /// Fraction of sellers that leave once, at a uniform time in the window.
    #[serde(default)]
    pub leave_fraction: f64,
    #[serde(default)]
    pub leave_from_s: f64,
    #[serde(default)]
    pub leave_to_s: f64,
    /// Mean time away (exponential); 0: a leaver never comes back.
    #[serde(default)]
    pub downtime_s: f64,
    /// Scheduled departures: at `at_s`, `count` random online sellers leave.
    #[serde(default)]
    pub events: Vec<ChurnEvent>,
}

/// A scheduled mass departure.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnEvent {
    pub at_s: f64,
    pub count: usize,
}

/// Image update: version 2 differs from version 1 (which every seller holds) in
/// these fractions of its chunks; one run per fraction.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSpec {
    pub changed: Vec<f64>,
}

/// Repeat the scenario at these seller counts (time and buyer bytes vs N).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub sellers: Vec<usize>,
}

/// Lease scenario: a buyer keeping `guests` guests running on a churning
/// population, driving market::Fleet and market::SellerLease.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSpec {
    pub guests: usize,
    pub duration_min: f64,
    /// Mean seller session before it goes away (exponential), minutes.
    pub mean_session_min: f64,
    /// Mean time a gone seller stays away, minutes.
    pub mean_away_min: f64,
    /// Image fetch + boot time of a new guest, seconds.
    #[serde(default = "default_boot")]
    pub boot_s: f64,
    /// Fraction of departures that are clean (seller ends the lease) rather than
    /// silent (kill -9, cable pulled).
    #[serde(default)]
    pub clean_fraction: f64,
    /// Fraction of receipts/acks lost on the way.
    #[serde(default)]
    pub loss: f64,
}

fn default_true() -> bool {
    true
}

fn default_seed() -> u64 {
    1
}
fn default_degree() -> usize {
    40
}
fn default_goodput() -> f64 {
    1.0
}
fn default_max_time() -> f64 {
    1e6
}
fn default_buyer_latency() -> f64 {
    10.0
}
fn default_boot() -> f64 {
    60.0
}
fn default_policies() -> Vec<Policy> {
    Policy::ALL.to_vec()
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::ReadScenario {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_from(&text, path)
    }

    /// Parses scenario text (tests).
    pub fn parse(text: &str) -> Result<Scenario> {
        Self::parse_from(text, Path::new("<text>"))
    }

    fn parse_from(text: &str, path: &Path) -> Result<Scenario> {
        let sc: Scenario = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: ")
            });
            SimError::ParseScenario {
                path: path.to_owned(),
                detail: format!("{at}{}", e.message()),
            }
        })?;
        sc.check()?;
        Ok(sc)
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(SimError::Invalid(m.to_owned()));
        if self.sellers == 0 {
            return bad("sellers must be at least 1");
        }
        if self.image_bytes() == 0 {
            return bad("image: give size_mb or size_mib (exactly one, above 0)");
        }
        if self.image.size_mb.is_some() == self.image.size_mib.is_some() {
            return bad("image: give exactly one of size_mb and size_mib");
        }
        if self.links.is_empty() || self.links.iter().map(|l| l.share).sum::<f64>() <= 0.0 {
            return bad("links: at least one profile with a positive share");
        }
        let pos = |x: f64| x.is_finite() && x > 0.0;
        if !self
            .links
            .iter()
            .all(|l| pos(l.up_mbit) && pos(l.down_mbit) && l.share >= 0.0)
            || !pos(self.buyer.up_mbit)
            || !pos(self.buyer.down_mbit)
        {
            return bad("every link needs positive up_mbit and down_mbit");
        }
        if !(self.goodput > 0.0 && self.goodput <= 1.0) {
            return bad("goodput must be in (0, 1]");
        }
        if self.latency.min_ms < 0.0 || self.latency.max_ms < self.latency.min_ms {
            return bad("latency: need 0 <= min_ms <= max_ms");
        }
        if let Some(k) = self.image.chunk_kib {
            if k == 0 || k > 64 * 1024 {
                return bad("image.chunk_kib must be in 1..=65536");
            }
        }
        Ok(())
    }

    /// Image size in bytes.
    pub fn image_bytes(&self) -> u64 {
        match (self.image.size_mb, self.image.size_mib) {
            (Some(mb), _) => (mb * 1e6) as u64,
            (None, Some(mib)) => (mib * 1024.0 * 1024.0) as u64,
            _ => 0,
        }
    }
}

/// Mbit/s to bytes/s.
pub fn mbit(x: f64) -> f64 {
    x * 1e6 / 8.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_toml_is_one_line_that_says_where() {
        let err = Scenario::parse("name = \"x\"\nsellers = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("line 2:"), "{err}");
        assert!(err.contains("expected usize"), "{err}");
    }
}
