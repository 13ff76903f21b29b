//! Command-line flags: Flannel's names (and `FLANNELD_*` environment variables), plus a few of
//! ours, marked as such.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "flanneld-rs",
    version,
    about = "Flannel-compatible overlay network daemon (etcd mode)"
)]
pub struct Flags {
    /// Comma-separated list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix under which the config and subnet leases live.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,

    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,

    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,

    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD")]
    pub etcd_password: Option<String>,

    /// Interface (name or IP address) to use for inter-host communication. May be repeated;
    /// the first one found is used.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against interface IPs, then names, when --iface finds nothing.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,

    /// IP accessible by other nodes for inter-host communication (default: the interface's).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// Filename where env variables (subnet, MTU, ...) will be written to.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Subnet lease renewal margin, in minutes.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60)]
    pub subnet_lease_renew_margin: u64,

    /// Setup IP masquerade rule for traffic destined outside of the overlay network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true")]
    pub ip_masq: bool,

    /// The IP address on which to listen for the healthz server.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// The port on which to listen for the healthz server (0 disables it).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Log verbosity (Flannel's glog level): 0 info, 1-4 debug, 5+ trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// [flanneld-rs] Port for Prometheus /metrics on --healthz-ip (0 disables it; the healthz
    /// port serves /metrics too).
    #[arg(long, env = "FLANNELD_METRICS_PORT", default_value_t = 0)]
    pub metrics_port: u16,

    /// WireGuard private key file of the wireguard backend, created if missing (Flannel reads
    /// the same WIREGUARD_KEY_FILE variable). Default: `wgkey` beside --subnet-file, which is
    /// Flannel's /run/flannel/wgkey with the default --subnet-file.
    #[arg(long, env = "WIREGUARD_KEY_FILE")]
    pub wg_key_file: Option<PathBuf>,

    /// [flanneld-rs] TTL of the subnet lease in etcd, e.g. 24h, 90m, 30s (Flannel: fixed 24h).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,

    /// Seconds between checks that our routes, neighbours, FDB entries, device and rules are
    /// still in place; whatever was removed behind our back is restored (Flannel's flag).
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
}

impl Flags {
    /// Parses the process arguments. Go's flag package also accepts a single dash before long
    /// names (`-etcd-endpoints=…`), which Flannel's manifests use, so we accept it too.
    pub fn from_args() -> Self {
        Flags::parse_from(normalize_args(std::env::args()))
    }

    pub fn renew_margin(&self) -> Duration {
        Duration::from_secs(self.subnet_lease_renew_margin.saturating_mul(60))
    }

    /// The wireguard backend's key file: `--wg-key-file`, else `wgkey` beside the subnet file
    /// (Flannel's `/run/flannel/wgkey` with the default `--subnet-file`).
    pub fn wg_key_path(&self) -> Option<PathBuf> {
        self.wg_key_file
            .clone()
            .or_else(|| self.subnet_file.parent().map(|d| d.join("wgkey")))
    }
}

/// Rewrites `-long-name[=v]` into `--long-name[=v]`; leaves `-v`, `-v=N` and values alone.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            let name = a.strip_prefix('-').unwrap_or("");
            let name_len = name.split('=').next().map_or(0, str::len);
            if !a.starts_with("--")
                && name_len > 1
                && name.starts_with(|c: char| c.is_ascii_alphabetic())
            {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// `90` (seconds), `30s`, `15m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 15m or 24h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m or h)")),
    };
    if secs == 0 {
        return Err("the lease TTL must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let mut all = vec!["flanneld-rs".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Flags::try_parse_from(normalize_args(all)).expect("flags parse")
    }

    #[test]
    fn defaults_match_flannel() {
        let f = parse(&[]);
        assert_eq!(
            f.etcd_endpoints,
            vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.renew_margin(), Duration::from_secs(3600));
        assert!(!f.ip_masq);
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.subnet_lease_ttl, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn go_style_single_dash_and_bools() {
        let f = parse(&[
            "-etcd-endpoints=http://10.0.0.1:2379,http://10.0.0.2:2379",
            "-iface",
            "eth1",
            "--iface=10.1.2.3",
            "--ip-masq",
            "-v=2",
            "--subnet-lease-ttl=30s",
        ]);
        assert_eq!(f.etcd_endpoints.len(), 2);
        assert_eq!(f.iface, vec!["eth1", "10.1.2.3"]);
        assert!(f.ip_masq);
        assert_eq!(f.verbosity, 2);
        assert_eq!(f.subnet_lease_ttl, Duration::from_secs(30));
        assert!(!parse(&["--ip-masq=false"]).ip_masq);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn unknown_flag_is_an_error() {
        let args = normalize_args(["flanneld-rs".to_string(), "--no-such-flag".to_string()]);
        assert!(Flags::try_parse_from(args).is_err());
    }
}
