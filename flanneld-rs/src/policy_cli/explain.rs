//! `policy explain SRC DST PORT/PROTO`: asks the local daemon (HTTP/1.1 over the Unix socket
//! beside its subnet file, `GET /v1/policy/explain`) and prints its `netpol::explain::Explanation`
//! for people, or as received (`-o json`). Exit 0 allowed, 1 denied, 2 could not ask.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use netpol::explain::Explanation;
use netpol::object::Protocol;

use crate::status::client::get;

/// The question, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Query {
    pub fn parse(src: &str, dst: &str, port: &str) -> Result<Query> {
        let ip = |what: &str, s: &str| -> Result<IpAddr> {
            s.trim()
                .parse()
                .map_err(|_| anyhow!("{what} {s:?} is not an IP address (e.g. 10.244.1.2)"))
        };
        let (port, protocol) = parse_port(port)?;
        Ok(Query {
            src: ip("SRC", src)?,
            dst: ip("DST", dst)?,
            port,
            protocol,
        })
    }

    /// The request path, `/v1/policy/explain?src=…&dst=…&port=…&protocol=…`.
    pub fn path(&self) -> String {
        format!(
            "/v1/policy/explain?src={}&dst={}&port={}&protocol={}",
            self.src,
            self.dst,
            self.port,
            self.protocol.name()
        )
    }
}

/// `80/TCP`, `53/udp`, `8080` (TCP): a port from 1 to 65535 and TCP, UDP or SCTP, any case.
pub fn parse_port(s: &str) -> Result<(u16, Protocol)> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, Some(proto)),
        None => (s, None),
    };
    let port: u16 = match port.trim().parse() {
        Ok(p) if p > 0 => p,
        _ => bail!("PORT/PROTO {s:?}: the port must be a number from 1 to 65535 (e.g. 80/TCP)"),
    };
    let protocol = match proto.map(|p| p.trim().to_ascii_uppercase()).as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => bail!("PORT/PROTO {s:?}: unknown protocol {other:?} (TCP, UDP or SCTP)"),
    };
    Ok((port, protocol))
}

/// The answer for people: `allowed` or `denied` on the first line, then each side.
pub fn render(q: &Query, e: &Explanation) -> String {
    let who = |ip: IpAddr, pod: &Option<String>| match pod {
        Some(p) => format!("{ip} (pod {p})"),
        None => format!("{ip} (no pod record)"),
    };
    let verdict = |ok: bool| if ok { "allowed" } else { "denied" };
    let mut out = format!(
        "{}\n{} -> {} on {}/{}\n",
        verdict(e.allowed),
        who(q.src, &e.source_pod),
        who(q.dst, &e.destination_pod),
        q.port,
        q.protocol.name()
    );
    for (name, side) in [("egress", &e.egress), ("ingress", &e.ingress)] {
        out.push_str(&format!("{name}: {}\n", verdict(side.allowed)));
        let policies = if side.policies.is_empty() {
            "none".to_string()
        } else {
            side.policies.join(", ")
        };
        out.push_str(&format!("  policies: {policies}\n"));
        if let Some(m) = &side.matched {
            out.push_str(&format!("  matched:  {m}\n"));
        }
        out.push_str(&format!("  reason:   {}\n", side.reason));
    }
    out
}

/// What `run` does, returning the exit code; errors are "could not ask" (2).
fn ask(socket: &Path, q: &Query, json: bool) -> Result<u8> {
    let (code, body) = get(socket, &q.path())?;
    let text = String::from_utf8_lossy(&body);
    if code != 200 {
        bail!("the daemon answered {code}: {}", text.trim());
    }
    let e: Explanation = serde_json::from_slice(&body)
        .with_context(|| format!("the daemon's answer is not an explanation: {}", text.trim()))?;
    if json {
        println!("{}", text.trim_end());
    } else {
        print!("{}", render(q, &e));
    }
    Ok(if e.allowed { 0 } else { 1 })
}

pub fn run(socket: &Path, src: &str, dst: &str, port: &str, json: bool) -> u8 {
    let result = Query::parse(src, dst, port).and_then(|q| ask(socket, &q, json));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flanneld-rs policy explain: {}", super::describe_error(&e));
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_protocols() {
        assert_eq!(parse_port("80/TCP").expect("p"), (80, Protocol::Tcp));
        assert_eq!(parse_port("53/udp").expect("p"), (53, Protocol::Udp));
        assert_eq!(parse_port("9/Sctp").expect("p"), (9, Protocol::Sctp));
        assert_eq!(parse_port("8080").expect("p"), (8080, Protocol::Tcp));
        for bad in ["0/TCP", "65536", "http/TCP", "", "80/ICMP", "-1"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        assert!(parse_port("80/icmp")
            .expect_err("proto")
            .to_string()
            .contains("unknown protocol"));
    }

    #[test]
    fn query_checked_locally() {
        let q = Query::parse("10.244.1.2", "fd00::2", "443/tcp").expect("q");
        assert_eq!(
            q.path(),
            "/v1/policy/explain?src=10.244.1.2&dst=fd00::2&port=443&protocol=TCP"
        );
        let e = Query::parse("pod-a", "10.0.0.1", "80").expect_err("not an ip");
        assert!(e.to_string().starts_with("SRC \"pod-a\""), "{e}");
    }

    /// What netpol serializes is what we read, and how it reads.
    #[test]
    fn renders_netpol_explanations() {
        let side = |allowed, policies: &[&str], matched: Option<&str>, reason: &str| {
            netpol::explain::Side {
                allowed,
                policies: policies.iter().map(|s| s.to_string()).collect(),
                matched: matched.map(str::to_string),
                reason: reason.into(),
            }
        };
        let sent = netpol::explain::Explanation {
            allowed: false,
            source_pod: Some("y/c".into()),
            destination_pod: Some("x/a".into()),
            egress: side(true, &[], None, "y/c is not isolated for egress: no policy selects it"),
            ingress: side(
                false,
                &["x/allow-b"],
                None,
                "x/a is isolated for ingress by x/allow-b and no rule of it allows 10.244.2.3 on 80/TCP",
            ),
        };
        let json = serde_json::to_vec(&sent).expect("json");
        let got: Explanation = serde_json::from_slice(&json).expect("parse");
        let q = Query::parse("10.244.2.3", "10.244.1.2", "80/tcp").expect("q");
        let text = render(&q, &got);
        assert_eq!(
            text,
            "denied\n\
             10.244.2.3 (pod y/c) -> 10.244.1.2 (pod x/a) on 80/TCP\n\
             egress: allowed\n\
             \x20 policies: none\n\
             \x20 reason:   y/c is not isolated for egress: no policy selects it\n\
             ingress: denied\n\
             \x20 policies: x/allow-b\n\
             \x20 reason:   x/a is isolated for ingress by x/allow-b and no rule of it allows 10.244.2.3 on 80/TCP\n"
        );
        let allowed = Explanation {
            allowed: true,
            source_pod: None,
            egress: netpol::explain::Side {
                allowed: true,
                policies: vec!["x/p".into()],
                matched: Some("x/p egress[0]".into()),
                reason: "allowed by x/p egress[0]".into(),
            },
            ..got
        };
        let text = render(&q, &allowed);
        assert!(
            text.starts_with("allowed\n10.244.2.3 (no pod record) -> "),
            "{text}"
        );
        assert!(text.contains("  matched:  x/p egress[0]\n"), "{text}");
    }

    #[test]
    fn no_daemon_is_exit_2() {
        let dir = tempfile::tempdir().expect("tmp");
        let code = run(
            &dir.path().join("none.sock"),
            "10.0.0.1",
            "10.0.0.2",
            "80",
            false,
        );
        assert_eq!(code, 2);
        assert_eq!(
            run(&dir.path().join("none.sock"), "x", "10.0.0.2", "80", false),
            2
        );
    }
}
