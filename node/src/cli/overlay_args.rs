//! `cpushare-node overlay ...` (run by `overlay_service::run_cli`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// Buyer: admit a seller's key to carry the guest with this MAC and IP
    /// (the first call starts the switch and the host tap).
    Admit {
        /// The seller's ed25519 public key (hex, see `cpushare-node id`).
        #[arg(long)]
        key: String,
        /// The guest's MAC address, e.g. 52:54:00:12:34:56.
        #[arg(long)]
        mac: String,
        /// The guest's overlay IPv4 address (handed out by the switch's DHCP).
        #[arg(long)]
        ip: Ipv4Addr,
        /// UDP address:port the switch binds, where sellers' sessions arrive (first
        /// call only) [default: 0.0.0.0:7451, or `listen` in the config file's
        /// [overlay] table, as for the flags below]. Not the daemon's libp2p
        /// `--listen` multiaddr. The reply names the address sellers should use.
        #[arg(long = "udp-listen", alias = "listen", value_name = "ADDR:PORT")]
        udp_listen: Option<SocketAddr>,
        /// Name of the buyer's host tap (first call only) [default: csovl0].
        #[arg(long)]
        tap: Option<String>,
        /// The buyer host's overlay address, /16 (first call only) [default: 10.77.0.1].
        #[arg(long)]
        host_ip: Option<Ipv4Addr>,
        /// After forwarding a frame, poll for its answer this many microseconds before
        /// sleeping (lower latency for up to one core while packets flow; 0 = off;
        /// first call only) [default: 200].
        #[arg(long)]
        busy_poll_us: Option<u64>,
        /// Let the guest use IPv6 (off by default). Its IPv6 source must be its
        /// link-local address (from --mac) or --ipv6-addr; IPv6 extension headers
        /// other than a leading hop-by-hop header (padding, router alert) and one
        /// fragment header are dropped. Buyer and seller must both give it.
        #[arg(long)]
        ipv6: bool,
        /// The guest's own IPv6 address (needs --ipv6).
        #[arg(long, requires = "ipv6", value_name = "ADDR")]
        ipv6_addr: Option<Ipv6Addr>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Buyer: remove an admitted guest (its session ends at once).
    Revoke {
        #[arg(long)]
        mac: String,
    },
    /// Seller: connect a guest port to a buyer. With --tap, a new tap is created in a
    /// new lease namespace (start the VMM with `cpushare-node vm run --tap NAME`, which
    /// opens it there); with --iface, an interface in a lease namespace this node
    /// created (`overlay netns add`, or a lease's) is used, e.g. a veth to a test
    /// namespace. Every flag is checked before anything is created.
    Attach {
        /// Create this tap for the guest.
        #[arg(long, conflicts_with = "iface")]
        tap: Option<String>,
        /// Use this interface in --netns, a lease namespace this node created.
        #[arg(long, requires = "netns")]
        iface: Option<String>,
        /// Lease namespace (created with --tap, default "cs-<tap>"; with --iface, one
        /// this node created).
        #[arg(long)]
        netns: Option<String>,
        /// The buyer's UDP endpoint, HOST:PORT: the address `overlay admit` printed
        /// on the buyer (its switch's UDP port, 7451 by default).
        #[arg(long)]
        buyer: String,
        /// The buyer's ed25519 public key (hex): the `public key:` line of
        /// `cpushare-node id` run on the buyer (`overlay admit` prints it too).
        #[arg(long)]
        buyer_key: String,
        /// The guest's MAC address.
        #[arg(long)]
        mac: String,
        /// The guest's overlay IPv4 address.
        #[arg(long)]
        ip: Ipv4Addr,
        /// The buyer host's overlay address [default: 10.77.0.1, or `buyer_ip` in the
        /// config file's [overlay] table, as for the flags below].
        #[arg(long)]
        buyer_ip: Option<Ipv4Addr>,
        /// Cap on the guest's sending rate in Mbit/s (egress token bucket; default from the lease defaults).
        #[arg(long)]
        max_mbit: Option<u64>,
        /// Cap on the guest's sending rate in frames per second.
        #[arg(long)]
        max_pps: Option<u64>,
        /// After forwarding a frame, poll for its answer this many microseconds before
        /// sleeping; answers from the buyer only while they come that fast (lower
        /// latency for up to one core while packets flow; 0 = off).
        #[arg(long)]
        busy_poll_us: Option<u64>,
        /// Let the guest use IPv6 (off by default). Its IPv6 source must be its
        /// link-local address (from --mac) or --ipv6-addr; IPv6 extension headers
        /// other than a leading hop-by-hop header (padding, router alert) and one
        /// fragment header are dropped. Buyer and seller must both give it.
        #[arg(long)]
        ipv6: bool,
        /// The guest's own IPv6 address (needs --ipv6).
        #[arg(long, requires = "ipv6", value_name = "ADDR")]
        ipv6_addr: Option<Ipv6Addr>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seller: create an empty lease namespace (no address, no route, IPv6 off) to
    /// plug a guest interface into (e.g. one end of a veth) before `attach --iface`;
    /// `detach` of the guest attached in it removes it.
    NetnsAdd {
        /// The namespace's name.
        name: String,
    },
    /// Seller: end a guest's session and remove what attach created.
    Detach {
        #[arg(long)]
        mac: String,
    },
    /// List sessions with traffic (by direction) and drop counters.
    Ls {
        #[arg(long)]
        json: bool,
    },
}
