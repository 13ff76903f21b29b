//! Command-line flags: every flag of Flannel v0.28.9 with its meaning (and its `FLANNELD_*`
//! environment variable, used only where the flag is absent), plus a few of ours, marked as
//! such. Flannel's kube-mode flags are accepted so its manifests run unchanged; this daemon
//! runs etcd mode, so `--kube-subnet-mgr=true` is refused and the rest are ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, Subcommand};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "flanneld-rs",
    version,
    about = "Flannel-compatible overlay network daemon (etcd mode)"
)]
pub struct Flags {
    /// [flanneld-rs] Without a command the daemon runs; `status` asks a running one; `policy`
    /// manages NetworkPolicy records in etcd (the `--etcd-*` flags go before or after it).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Comma-separated list of etcd endpoints.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix under which the config and subnet leases live.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication.
    #[arg(long, global = true, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,

    /// SSL certification file used to secure etcd communication.
    #[arg(long, global = true, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,

    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, global = true, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,

    /// Username for BasicAuth to etcd.
    #[arg(long, global = true, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password for BasicAuth to etcd.
    #[arg(long, global = true, env = "FLANNELD_ETCD_PASSWORD")]
    pub etcd_password: Option<String>,

    /// Interface (name or IP address) to use for inter-host communication. May be repeated;
    /// the first one found is used. Never split on commas.
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,

    /// Regex matched against interface IPs, then names, when --iface finds nothing. May be
    /// repeated; never split on commas (`^ens[0-9]{1,2}$` is one regex).
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,

    /// An IP address: use the interface and source address the kernel would use to reach it
    /// (`ip route get <IP>`), when neither --iface nor --iface-regex finds one.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,

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

    /// Subnet lease renewal margin, in minutes, from 1 to 1439.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..1440))]
    pub subnet_lease_renew_margin: u64,

    /// Setup IP masquerade rule for traffic destined outside of the overlay network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ip_masq: bool,

    /// Masquerade without fully random source ports.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ip_masq_fully_random_disable: bool,

    /// Accept forwarded traffic from and to the Network (hosts whose FORWARD policy is DROP,
    /// as Docker sets it, would drop pods' cross-node traffic otherwise).
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = ArgAction::Set, num_args = 0..=1,
          default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub iptables_forward_rules: bool,

    /// Add a blackhole route for this node's lease subnet (v6 too), so traffic to its unused
    /// addresses is dropped here instead of sent upstream.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ip_blackhole_route: bool,

    /// The IP address on which to listen for the healthz server.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// The port on which to listen for the healthz server (0 disables it).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Log verbosity (Flannel's glog level): 0 info, 1-4 debug, 5+ trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// Flannel's per-file log levels (klog): accepted and ignored; RUST_LOG does this here.
    #[arg(long, env = "FLANNELD_VMODULE")]
    pub vmodule: Option<String>,

    /// Flannel's klog stack-trace trigger: accepted and ignored.
    #[arg(long = "log_backtrace_at", env = "FLANNELD_LOG_BACKTRACE_AT")]
    pub log_backtrace_at: Option<String>,

    /// Flannel's Kubernetes subnet manager: refused when true (this daemon runs etcd mode).
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub kube_subnet_mgr: bool,

    /// Kube mode only: accepted and ignored.
    #[arg(long, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// Kube mode only: accepted and ignored.
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,

    /// Kube mode only: accepted and ignored.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<String>,

    /// Kube mode only (the network config comes from etcd here): accepted and ignored.
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: String,

    /// Kube mode only: accepted and ignored.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", action = ArgAction::Set, num_args = 0..=1,
          default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub set_node_network_unavailable: bool,

    /// [flanneld-rs] Port for Prometheus /metrics on --healthz-ip (0 disables it; the healthz
    /// port serves /metrics too).
    #[arg(long, env = "FLANNELD_METRICS_PORT", default_value_t = 0)]
    pub metrics_port: u16,

    /// WireGuard private key file of the wireguard backend, created if missing (Flannel reads
    /// the same WIREGUARD_KEY_FILE variable). Default: `wgkey` beside --subnet-file, which is
    /// Flannel's /run/flannel/wgkey with the default --subnet-file.
    #[arg(long, env = "WIREGUARD_KEY_FILE")]
    pub wg_key_file: Option<PathBuf>,

    /// [flanneld-rs] TUN queues of the udp and wireguard datapaths, each with its own sender
    /// and receiver thread and socket; flows are spread over them by hash, so one flow never
    /// crosses queues. 0: one per core this process may run on (CPU affinity and quota).
    #[arg(long, env = "FLANNELD_DATAPATH_QUEUES", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=encap::Datapath::MAX_QUEUES as i64))]
    pub datapath_queues: u16,

    /// [flanneld-rs] After handling traffic, the udp and wireguard packet threads poll for
    /// this many microseconds before they sleep (0: never poll; at most 100000). Polling
    /// saves the wake-up a sleeping thread costs each packet (most of the userspace path's
    /// round-trip time) and spends CPU time while traffic is sparse.
    #[arg(long, env = "FLANNELD_BUSY_POLL_US", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub busy_poll_us: u32,

    /// [flanneld-rs] UDP port of the per-peer health probes, sent and answered on every
    /// address (0 turns probing and answering off).
    #[arg(long, env = "FLANNELD_HEALTH_PORT", default_value_t = 8286)]
    pub health_port: u16,

    /// [flanneld-rs] How often each peer is probed (jittered), e.g. 5s.
    #[arg(long, env = "FLANNELD_HEALTH_PROBE_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub health_probe_interval: Duration,

    /// [flanneld-rs] TTL of the subnet lease in etcd, e.g. 24h, 90m, 30s (Flannel: fixed 24h).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,

    /// Seconds between checks that our routes, neighbours, FDB entries, device, rules and
    /// blackhole route are still in place; whatever was removed behind our back is restored.
    /// 0 is taken as 1 (Flannel would spin).
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Show the running daemon's lease, devices, peers and environment checks (exit 1 when
    /// something needs attention, 2 when the daemon cannot be asked).
    Status {
        /// The daemon's --subnet-file: its socket is `<directory of subnet-file>/flanneld-rs.sock`.
        #[arg(long, default_value = "/run/flannel/subnet.env")]
        subnet_file: PathBuf,
        /// Print the report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// [flanneld-rs] NetworkPolicy, Namespace and Pod records in etcd, kubectl-style: apply,
    /// get, delete; and `explain`, which asks the running daemon why traffic is allowed.
    Policy(crate::policy_cli::PolicyArgs),
}

impl Flags {
    /// How to reach etcd: the daemon and `flanneld-rs policy` read the same flags.
    pub fn etcd_options(&self) -> subnet_manager::registry::EtcdOptions {
        subnet_manager::registry::EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            cafile: self.etcd_cafile.clone(),
            certfile: self.etcd_certfile.clone(),
            keyfile: self.etcd_keyfile.clone(),
        }
    }

    /// Parses the process arguments. Go's flag package also accepts a single dash before long
    /// names (`-etcd-endpoints=…`), which Flannel's manifests use, so we accept it too.
    pub fn from_args() -> Self {
        drop_empty_env();
        Flags::parse_from(normalize_args(std::env::args()))
    }

    /// Flag combinations that parse but that this daemon cannot honour.
    pub fn check(&self) -> Result<(), String> {
        if self.kube_subnet_mgr {
            return Err(
                "--kube-subnet-mgr=true: flanneld-rs runs Flannel's etcd mode only; \
                        drop the flag and point --etcd-endpoints at the cluster's etcd"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn renew_margin(&self) -> Duration {
        Duration::from_secs(self.subnet_lease_renew_margin.saturating_mul(60))
    }

    /// How the userspace datapath uses the cores: `--datapath-queues`, `--busy-poll-us`.
    pub fn datapath(&self) -> encap::Datapath {
        encap::Datapath {
            queues: std::num::NonZeroUsize::new(usize::from(self.datapath_queues)),
            busy_poll: Duration::from_micros(u64::from(self.busy_poll_us)),
        }
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

/// A probe interval: a duration of at least 1s.
fn parse_interval(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.replace("the lease TTL", "the interval"))
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

/// Whether an environment variable is one of ours that is set but empty: Go Flannel sets a
/// flag from its variable only when the value is not empty (`flagutil.SetFlagsFromEnv`), so
/// `FLANNELD_IFACE=` in an env file means "not given", never an interface named "".
fn empty_flag_var(name: &str, value: &std::ffi::OsStr) -> bool {
    value.is_empty() && (name.starts_with("FLANNELD_") || name == "WIREGUARD_KEY_FILE")
}

/// Removes our empty flag variables before parsing (called first thing in `main`, while the
/// process has one thread).
fn drop_empty_env() {
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(k, v)| k.to_str().is_some_and(|k| empty_flag_var(k, v)))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn empty_flag_variables_count_as_not_given() {
        use std::ffi::OsStr;
        assert!(empty_flag_var("FLANNELD_IFACE", OsStr::new("")));
        assert!(empty_flag_var("WIREGUARD_KEY_FILE", OsStr::new("")));
        assert!(!empty_flag_var("FLANNELD_IFACE", OsStr::new("eth0")));
        assert!(!empty_flag_var("HOME", OsStr::new("")));
    }

    use std::sync::Mutex;

    /// Parsing reads `FLANNELD_*` variables: tests that set some hold this while they do
    /// (and so do other modules' tests that parse flags).
    pub(crate) static ENV: Mutex<()> = Mutex::new(());

    fn try_parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let mut all = vec!["flanneld-rs".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Flags::try_parse_from(normalize_args(all))
    }

    fn parse(args: &[&str]) -> Flags {
        let _env = ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        try_parse(args).expect("flags parse")
    }

    /// Every flag of Flannel v0.28.9's flanneld, in its Go single-dash form as its manifests
    /// and units pass them (kube-subnet-mgr aside, which is refused by `check`).
    const FLANNEL_V0_28_9: &[&str] = &[
        "-etcd-endpoints=http://10.0.0.1:2379",
        "-etcd-prefix=/coreos.com/network",
        "-etcd-keyfile=/etc/k.pem",
        "-etcd-certfile=/etc/c.pem",
        "-etcd-cafile=/etc/ca.pem",
        "-etcd-username=u",
        "-etcd-password=p",
        "-iface=eth0",
        "-iface=10.0.0.9",
        "-iface-regex=^ens[0-9]{1,2}$",
        "-iface-regex=^eth[0-9]+,x$",
        "-iface-can-reach=10.0.0.1",
        "-subnet-file=/run/flannel/subnet.env",
        "-public-ip=10.0.0.9",
        "-public-ipv6=fd00::9",
        "-subnet-lease-renew-margin=60",
        "-ip-masq",
        "-ip-masq-fully-random-disable",
        "-kube-subnet-mgr=false",
        "-kube-api-url=https://10.96.0.1:443",
        "-kube-annotation-prefix=flannel.alpha.coreos.com",
        "-kubeconfig-file=/etc/kubeconfig",
        "-healthz-ip=0.0.0.0",
        "-healthz-port=8081",
        "-iptables-resync=5",
        "-iptables-forward-rules=false",
        "-ip-blackhole-route",
        "-net-config-path=/etc/kube-flannel/net-conf.json",
        "-set-node-network-unavailable=true",
        "-v=2",
        "-vmodule=main=3,subnet=2",
        "-log_backtrace_at=main.go:100",
    ];

    #[test]
    fn every_flannel_v0_28_9_flag_is_accepted_with_its_meaning() {
        let f = parse(FLANNEL_V0_28_9);
        assert_eq!(f.iface, vec!["eth0", "10.0.0.9"]);
        // Repeated, never split on commas.
        assert_eq!(f.iface_regex, vec!["^ens[0-9]{1,2}$", "^eth[0-9]+,x$"]);
        assert_eq!(f.iface_can_reach, Some("10.0.0.1".parse().expect("ip")));
        assert!(f.ip_masq && f.ip_masq_fully_random_disable && f.ip_blackhole_route);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.healthz_port, 8081);
        assert_eq!(f.verbosity, 2);
        assert_eq!(f.check(), Ok(()));
    }

    #[test]
    fn flannel_defaults_of_the_newer_flags() {
        let f = parse(&[]);
        assert!(f.iptables_forward_rules, "Flannel's default is true");
        assert!(!f.ip_masq_fully_random_disable && !f.ip_blackhole_route);
        assert_eq!(f.iptables_resync, 5);
        assert_eq!(f.iface_can_reach, None);
        assert!(!f.kube_subnet_mgr && f.set_node_network_unavailable);
        assert_eq!(f.kube_annotation_prefix, "flannel.alpha.coreos.com");
    }

    #[test]
    fn kube_subnet_mgr_is_refused_clearly() {
        let f = parse(&["--kube-subnet-mgr"]);
        let why = f.check().expect_err("refused");
        assert!(why.contains("etcd mode"), "{why}");
    }

    #[test]
    fn bools_take_gos_spellings() {
        for (v, want) in [
            ("1", true),
            ("t", true),
            ("TRUE", true),
            ("0", false),
            ("F", false),
        ] {
            assert_eq!(parse(&[&format!("--ip-masq={v}")]).ip_masq, want, "{v}");
        }
        assert!(try_parse(&["--ip-masq=maybe"]).is_err());
    }

    #[test]
    fn renew_margin_within_flannels_range() {
        let _env = ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(try_parse(&["--subnet-lease-renew-margin=0"]).is_err());
        assert!(try_parse(&["--subnet-lease-renew-margin=1440"]).is_err());
        assert!(try_parse(&["--subnet-lease-renew-margin=1439"]).is_ok());
    }

    #[test]
    fn environment_only_where_the_flag_is_absent() {
        let _env = ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Tests that parse flags hold ENV, so nothing else reads these variables meanwhile.
        std::env::set_var("FLANNELD_IFACE", "eth7,eth8");
        std::env::set_var("FLANNELD_IPTABLES_FORWARD_RULES", "false");
        let from_env = try_parse(&[]);
        let flag_wins = try_parse(&["--iface=eth1", "--iptables-forward-rules=true"]);
        std::env::remove_var("FLANNELD_IFACE");
        std::env::remove_var("FLANNELD_IPTABLES_FORWARD_RULES");
        let from_env = from_env.expect("parse");
        assert_eq!(from_env.iface, vec!["eth7,eth8"], "one value, not split");
        assert!(!from_env.iptables_forward_rules);
        let flag_wins = flag_wins.expect("parse");
        assert_eq!(flag_wins.iface, vec!["eth1"]);
        assert!(flag_wins.iptables_forward_rules);
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
