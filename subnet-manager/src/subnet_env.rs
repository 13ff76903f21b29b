//! `subnet.env`: the file through which the daemon tells the CNI plugin its lease, MTU and ip-masq
//! setting (see the contract's `subnet.env` section).
//!
//! The daemon renders and writes it atomically; the CNI plugin (ours, or Flannel's Go one reading a
//! file we wrote) parses it. Parsing is as tolerant as Flannel's plugin (blank lines, comments and
//! unknown keys are ignored) and a little more (whitespace, CRLF, quotes, `export `), but every
//! value it does read must be valid: a bad value is an error naming the key and line, never a guess.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::{Ipv4Net, Ipv6Net};

const NETWORK: &str = "FLANNEL_NETWORK";
const SUBNET: &str = "FLANNEL_SUBNET";
const IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
const IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
const MTU: &str = "FLANNEL_MTU";
const IPMASQ: &str = "FLANNEL_IPMASQ";

/// The contents of `subnet.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole overlay network (`FLANNEL_NETWORK`), absent on IPv6-only nodes.
    pub network: Option<Ipv4Net>,
    /// The lease's first address with the lease prefix (`FLANNEL_SUBNET`), e.g. 10.244.3.1/24.
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    /// Like `subnet`, e.g. fc00:0:0:3::1/64.
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    /// Whether flanneld masquerades itself (so the CNI bridge must not).
    pub ipmasq: bool,
}

/// MTUs a reader accepts (and the daemon writes): from IPv4's minimum (RFC 791) to the largest
/// a bridge or veth takes. 0 or 4294967295 would otherwise reach the bridge plugin unchecked.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// Each variant's message already includes its cause, so none is exposed as `source()`:
/// `anyhow`'s `{:#}` would print the OS error a second time.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("line {line}: invalid {key} value {value:?}: {reason}")]
    InvalidValue {
        line: usize,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("missing {}", .keys.join(", "))]
    Missing { keys: Vec<&'static str> },
    #[error("{}: {error}", .path.display())]
    Parse {
        path: PathBuf,
        error: Box<SubnetEnvError>,
    },
    #[error("cannot read {}: {error}", .path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("cannot write {} ({step}): {error}", .path.display())]
    Write {
        path: PathBuf,
        step: &'static str,
        error: io::Error,
    },
}

impl SubnetEnvError {
    /// The file does not exist (yet): the daemon may still be starting, so a reader may retry.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SubnetEnvError::Read { error, .. } if error.kind() == io::ErrorKind::NotFound)
    }

    /// Required keys are missing: a file another writer has not finished, worth a retry too.
    pub fn is_incomplete(&self) -> bool {
        match self {
            SubnetEnvError::Missing { .. } => true,
            SubnetEnvError::Parse { error, .. } => error.is_incomplete(),
            _ => false,
        }
    }
}

/// Makes temp file names unique among writers in one process; the pid separates processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl SubnetEnv {
    /// The file's text: the contract's lines in the contract's order, absent values left out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.network {
            out.push_str(&format!("{NETWORK}={n}\n"));
        }
        if let Some(s) = self.subnet {
            out.push_str(&format!("{SUBNET}={s}\n"));
        }
        if let Some(n) = self.ipv6_network {
            out.push_str(&format!("{IPV6_NETWORK}={n}\n"));
        }
        if let Some(s) = self.ipv6_subnet {
            out.push_str(&format!("{IPV6_SUBNET}={s}\n"));
        }
        out.push_str(&format!("{MTU}={}\n", self.mtu));
        out.push_str(&format!("{IPMASQ}={}\n", self.ipmasq));
        out
    }

    /// Parses the file's text. Requires what Flannel's CNI plugin requires: a network and a
    /// subnet (IPv4 or IPv6), FLANNEL_MTU and FLANNEL_IPMASQ; all missing keys are named at once.
    pub fn parse(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut network = None;
        let mut subnet = None;
        let mut ipv6_network = None;
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;
        // Later lines win, as in Flannel's plugin.
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let Some((key, value)) = split_line(raw) else {
                continue;
            };
            match key {
                NETWORK => network = Some(parse_net(line, NETWORK, value)?),
                SUBNET => subnet = Some(parse_net(line, SUBNET, value)?),
                IPV6_NETWORK => ipv6_network = Some(parse_net(line, IPV6_NETWORK, value)?),
                IPV6_SUBNET => ipv6_subnet = Some(parse_net(line, IPV6_SUBNET, value)?),
                MTU => mtu = Some(parse_mtu(line, value)?),
                IPMASQ => ipmasq = Some(parse_bool(line, value)?),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        if network.is_none() && ipv6_network.is_none() {
            missing.push("FLANNEL_NETWORK (or FLANNEL_IPV6_NETWORK)");
        }
        if subnet.is_none() && ipv6_subnet.is_none() {
            missing.push("FLANNEL_SUBNET (or FLANNEL_IPV6_SUBNET)");
        }
        if mtu.is_none() {
            missing.push(MTU);
        }
        if ipmasq.is_none() {
            missing.push(IPMASQ);
        }
        match (mtu, ipmasq) {
            (Some(mtu), Some(ipmasq)) if missing.is_empty() => Ok(SubnetEnv {
                network,
                subnet,
                ipv6_network,
                ipv6_subnet,
                mtu,
                ipmasq,
            }),
            _ => Err(SubnetEnvError::Missing { keys: missing }),
        }
    }

    /// The lease subnets a previous run recorded, read as Flannel reads them to ask for its old
    /// subnet again: FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET alone (later lines win), whatever
    /// the rest of the file holds, so a hand-edited MTU or IPMASQ line does not cost the node
    /// its subnet (and its pods their addresses). A bad value of either is an error naming it.
    pub fn previous_leases(
        text: &str,
    ) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), SubnetEnvError> {
        let (mut v4, mut v6) = (None, None);
        for (idx, raw) in text.lines().enumerate() {
            match split_line(raw) {
                Some((SUBNET, value)) => v4 = Some(parse_net::<Ipv4Net>(idx + 1, SUBNET, value)?),
                Some((IPV6_SUBNET, value)) => {
                    v6 = Some(parse_net::<Ipv6Net>(idx + 1, IPV6_SUBNET, value)?)
                }
                _ => {}
            }
        }
        Ok((v4.map(|s| s.trunc()), v6.map(|s| s.trunc())))
    }

    /// Reads and parses the file; errors name the path.
    pub fn read(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text = fs::read_to_string(path).map_err(|error| SubnetEnvError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        SubnetEnv::parse(&text).map_err(|e| SubnetEnvError::Parse {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// Replaces the file atomically, so a reader sees either the old or the new file, never a
    /// half-written one, even across a crash (temp file in the same directory, fsync, rename,
    /// fsync of the directory).
    pub fn write_atomic(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let err = |step: &'static str| {
            move |error| SubnetEnvError::Write {
                path: path.to_path_buf(),
                step,
                error,
            }
        };
        // Refused here too: a file every reader rejects would only move the failure to pods.
        if !MTU_RANGE.contains(&self.mtu) {
            return Err(err("checking values")(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{MTU} {} outside {}..={}",
                    self.mtu,
                    MTU_RANGE.start(),
                    MTU_RANGE.end()
                ),
            )));
        }
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
            .map_err(err("checking path"))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err("creating parent directory"))?;

        let (tmp_path, mut file) =
            create_temp(dir, &name.to_string_lossy()).map_err(err("creating temp file"))?;
        let written = (|| {
            file.write_all(self.render().as_bytes())?;
            // The mode given at open is reduced by the umask; the contract wants exactly 0644.
            file.set_permissions(Permissions::from_mode(0o644))?;
            file.sync_all()
        })();
        drop(file);
        if let Err(e) = written.and_then(|()| fs::rename(&tmp_path, path)) {
            let _ = fs::remove_file(&tmp_path);
            return Err(err("writing temp file and renaming it")(e));
        }
        // Makes the rename itself durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("syncing directory"))
    }

    /// The IPv4 lease (the subnet truncated to its network, e.g. 10.244.3.0/24).
    pub fn leased_ipv4(&self) -> Option<Ipv4Net> {
        self.subnet.map(|s| s.trunc())
    }

    /// The IPv6 lease (the subnet truncated to its network, e.g. fc00:0:0:3::/64).
    pub fn leased_ipv6(&self) -> Option<Ipv6Net> {
        self.ipv6_subnet.map(|s| s.trunc())
    }

    /// FLANNEL_SUBNET for an IPv4 lease: its first address with its prefix (10.244.3.0/24 gives
    /// 10.244.3.1/24).
    pub fn subnet_for_lease(lease: Ipv4Net) -> Ipv4Net {
        let first = Ipv4Addr::from(u32::from(lease.network()).wrapping_add(1));
        Ipv4Net::new(first, lease.prefix_len()).unwrap_or(lease)
    }

    /// FLANNEL_IPV6_SUBNET for an IPv6 lease, like `subnet_for_lease`.
    pub fn ipv6_subnet_for_lease(lease: Ipv6Net) -> Ipv6Net {
        let first = Ipv6Addr::from(u128::from(lease.network()).wrapping_add(1));
        Ipv6Net::new(first, lease.prefix_len()).unwrap_or(lease)
    }
}

/// Splits `KEY=VALUE`, tolerating what shell-style env files contain. Returns `None` for lines
/// that carry no assignment (blank, comment, or a bare word): Flannel ignores those too.
fn split_line(raw: &str) -> Option<(&str, &str)> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let line = line.strip_prefix("export ").unwrap_or(line);
    let (key, value) = line.split_once('=')?;
    let value = value.trim();
    let value = strip_quotes(value, '"')
        .or_else(|| strip_quotes(value, '\''))
        .unwrap_or(value);
    Some((key.trim(), value))
}

fn strip_quotes(value: &str, q: char) -> Option<&str> {
    value.strip_prefix(q)?.strip_suffix(q)
}

fn invalid(line: usize, key: &'static str, value: &str, reason: impl ToString) -> SubnetEnvError {
    SubnetEnvError::InvalidValue {
        line,
        key,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn parse_net<T>(line: usize, key: &'static str, value: &str) -> Result<T, SubnetEnvError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    if value.contains(',') {
        // Newer Flannel can list several networks; one node's lease here has exactly one, and
        // keeping only the first would silently drop routes.
        return Err(invalid(
            line,
            key,
            value,
            "lists of networks are not supported",
        ));
    }
    value
        .parse()
        .map_err(|e| invalid(line, key, value, format!("not a CIDR ({e})")))
}

fn parse_mtu(line: usize, value: &str) -> Result<u32, SubnetEnvError> {
    // u32::from_str would also take "+1450"; Flannel takes digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(line, MTU, value, "not a decimal number"));
    }
    let range = || format!("outside {}..={}", MTU_RANGE.start(), MTU_RANGE.end());
    let mtu: u32 = value
        .parse()
        .map_err(|_| invalid(line, MTU, value, range()))?;
    if !MTU_RANGE.contains(&mtu) {
        return Err(invalid(line, MTU, value, range()));
    }
    Ok(mtu)
}

fn parse_bool(line: usize, value: &str) -> Result<bool, SubnetEnvError> {
    // Flannel's plugin reads anything but "true" as false; a typo like "True" would then flip
    // masquerading silently, so anything else is an error here.
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(line, IPMASQ, value, "expected true or false")),
    }
}

/// Creates a fresh temp file next to the target (same filesystem, so the rename is atomic).
fn create_temp(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    let pid = std::process::id();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{pid}.{n}.tmp"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // A leftover from a crashed earlier process with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The contract's example, as Go flanneld v0.20 writes it.
    const GO_FLANNEL_V4: &str = "FLANNEL_NETWORK=10.244.0.0/16\n\
                                 FLANNEL_SUBNET=10.244.3.1/24\n\
                                 FLANNEL_MTU=1450\n\
                                 FLANNEL_IPMASQ=false\n";
    const GO_FLANNEL_DUAL: &str = "FLANNEL_NETWORK=10.244.0.0/16\n\
                                   FLANNEL_SUBNET=10.244.3.1/24\n\
                                   FLANNEL_IPV6_NETWORK=fc00::/48\n\
                                   FLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
                                   FLANNEL_MTU=1450\n\
                                   FLANNEL_IPMASQ=true\n";

    #[test]
    fn previous_leases_read_the_subnet_lines_alone() {
        let ok = |t: &str| SubnetEnv::previous_leases(t).unwrap();
        let v4: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let v6: Ipv6Net = "fc00:0:0:3::/64".parse().unwrap();
        assert_eq!(ok(GO_FLANNEL_V4), (Some(v4), None));
        assert_eq!(ok(GO_FLANNEL_DUAL), (Some(v4), Some(v6)));
        // A hand-edited rest of the file, which the full parse refuses, changes nothing.
        let edited = "FLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=\nFLANNEL_IPMASQ=True\n";
        assert!(SubnetEnv::parse(edited).is_err());
        assert_eq!(ok(edited), (Some(v4), None));
        assert_eq!(ok("FLANNEL_MTU=1450\n"), (None, None));
        let bad = SubnetEnv::previous_leases("FLANNEL_SUBNET=10.244.3.1\n").unwrap_err();
        assert!(bad.to_string().contains("FLANNEL_SUBNET"), "{bad}");
    }

    fn v4() -> SubnetEnv {
        SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.3.1/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ipmasq: false,
        }
    }

    fn dual() -> SubnetEnv {
        SubnetEnv {
            ipv6_network: Some("fc00::/48".parse().unwrap()),
            ipv6_subnet: Some("fc00:0:0:3::1/64".parse().unwrap()),
            ipmasq: true,
            ..v4()
        }
    }

    #[test]
    fn render_matches_contract_byte_for_byte() {
        assert_eq!(v4().render(), GO_FLANNEL_V4);
        assert_eq!(dual().render(), GO_FLANNEL_DUAL);
    }

    #[test]
    fn render_ipv6_only_leaves_out_ipv4_lines() {
        let env = SubnetEnv {
            network: None,
            subnet: None,
            ..dual()
        };
        assert_eq!(
            env.render(),
            "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
    }

    #[test]
    fn parses_go_flannel_output() {
        assert_eq!(SubnetEnv::parse(GO_FLANNEL_V4).unwrap(), v4());
        assert_eq!(SubnetEnv::parse(GO_FLANNEL_DUAL).unwrap(), dual());
    }

    #[test]
    fn round_trip() {
        for env in [v4(), dual()] {
            assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        }
    }

    #[test]
    fn parse_is_tolerant() {
        let text = "# written by hand\r\n\r\nexport FLANNEL_NETWORK=10.244.0.0/16\r\n\
                    SOMETHING_ELSE=whatever\n  FLANNEL_SUBNET = \"10.244.3.1/24\" \n\
                    FLANNEL_MTU=1400\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ='false'\nnot an assignment\n";
        assert_eq!(SubnetEnv::parse(text).unwrap(), v4());
    }

    #[test]
    fn invalid_value_names_key_and_line() {
        let text = GO_FLANNEL_V4.replace("10.244.3.1/24", "10.244.3.1");
        let err = SubnetEnv::parse(&text).unwrap_err();
        assert!(matches!(
            err,
            SubnetEnvError::InvalidValue {
                line: 2,
                key: "FLANNEL_SUBNET",
                ..
            }
        ));
        assert!(
            err.to_string().contains("line 2: invalid FLANNEL_SUBNET"),
            "{err}"
        );

        for (bad, key) in [
            ("FLANNEL_MTU=+1450", "FLANNEL_MTU"),
            ("FLANNEL_MTU=99999999999", "FLANNEL_MTU"),
            ("FLANNEL_IPMASQ=True", "FLANNEL_IPMASQ"),
            (
                "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16",
                "FLANNEL_NETWORK",
            ),
            ("FLANNEL_IPV6_SUBNET=10.244.3.1/24", "FLANNEL_IPV6_SUBNET"),
            ("FLANNEL_NETWORK=", "FLANNEL_NETWORK"),
        ] {
            let text = format!("{GO_FLANNEL_V4}{bad}\n");
            match SubnetEnv::parse(&text) {
                Err(SubnetEnvError::InvalidValue {
                    line: 5, key: k, ..
                }) => assert_eq!(k, key),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_keys_are_all_named() {
        let err = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err();
        assert!(err.is_incomplete());
        let msg = err.to_string();
        for key in ["FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"] {
            assert!(msg.contains(key), "{msg}");
        }
        assert!(!msg.contains("FLANNEL_NETWORK"), "{msg}");
        assert!(SubnetEnv::parse("").unwrap_err().is_incomplete());
    }

    #[test]
    fn leases() {
        assert_eq!(v4().leased_ipv4(), Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(
            dual().leased_ipv6(),
            Some("fc00:0:0:3::/64".parse().unwrap())
        );
        assert_eq!(v4().leased_ipv6(), None);
        assert_eq!(
            SubnetEnv::subnet_for_lease("10.244.3.0/24".parse().unwrap()),
            "10.244.3.1/24".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(
            SubnetEnv::ipv6_subnet_for_lease("fc00:0:0:3::/64".parse().unwrap()),
            "fc00:0:0:3::1/64".parse::<Ipv6Net>().unwrap()
        );
    }

    #[test]
    fn atomic_write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        v4().write_atomic(&path).unwrap();
        dual().write_atomic(&path).unwrap();

        assert_eq!(fs::read_to_string(&path).unwrap(), GO_FLANNEL_DUAL);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
        assert_eq!(SubnetEnv::read(&path).unwrap(), dual());
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let err = SubnetEnv::read(&path).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");

        fs::write(&path, "FLANNEL_MTU=x\n").unwrap();
        let err = SubnetEnv::read(&path).unwrap_err();
        assert!(!err.is_not_found() && !err.is_incomplete());
        let msg = err.to_string();
        assert!(
            msg.contains(&*path.to_string_lossy()) && msg.contains("line 1"),
            "{msg}"
        );
    }

    /// The error and its causes as `anyhow`'s `{:#}` prints them (the daemon's fatal log).
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    }

    #[test]
    fn errors_say_the_os_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = v4().write_atomic(&blocker.join("subnet.env")).unwrap_err();
        let SubnetEnvError::Write { error, .. } = &err else {
            panic!("{err:?}");
        };
        let text = chain(&err);
        assert_eq!(text.matches(&error.to_string()).count(), 1, "{text}");

        let err = SubnetEnv::read(&dir.path().join("missing")).unwrap_err();
        let text = chain(&err);
        assert_eq!(text.matches("No such file").count(), 1, "{text}");

        fs::write(&blocker, "FLANNEL_MTU=x\n").unwrap();
        let err = SubnetEnv::read(&blocker).unwrap_err();
        let text = chain(&err);
        assert_eq!(text.matches("not a decimal number").count(), 1, "{text}");
    }

    #[test]
    fn mtu_must_be_usable() {
        for bad in ["0", "67", "65536", "4294967295"] {
            let text = GO_FLANNEL_V4.replace("1450", bad);
            let err = SubnetEnv::parse(&text).unwrap_err();
            assert!(
                matches!(
                    err,
                    SubnetEnvError::InvalidValue {
                        line: 3,
                        key: "FLANNEL_MTU",
                        ..
                    }
                ),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains("68..=65535"), "{err}");
        }
        for good in [68, 1280, 1450, 9000, 65535] {
            let text = GO_FLANNEL_V4.replace("1450", &good.to_string());
            assert_eq!(SubnetEnv::parse(&text).unwrap().mtu, good);
        }
        // The daemon cannot write a file its readers would refuse.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let err = SubnetEnv { mtu: 0, ..v4() }
            .write_atomic(&path)
            .unwrap_err();
        assert!(err.to_string().contains("FLANNEL_MTU"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn write_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let path = blocker.join("subnet.env");
        let err = v4().write_atomic(&path).unwrap_err();
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }
}
