//! `policy get`: stored records as a kubectl-like table, or as the stored JSON (`-o json`,
//! a `kind: List` for several) or YAML. Records the daemon would reject are listed with the
//! reason, never hidden.

use anyhow::{Context, Result};
use netpol::object::Object;
use netpol::selector::Labels;
use netpol::{Invalid, ObjectKey};
use serde_json::Value;

use super::resource::{key_name, Resource};
use super::store::Store;
use super::GetOutput;
use crate::flags::Flags;

/// Which namespaces `get` looks in (namespaces themselves ignore it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    All,
}

/// One stored record and what the daemon makes of it.
#[derive(Clone, Debug)]
pub struct Record {
    pub key: ObjectKey,
    pub raw: Vec<u8>,
    pub parsed: Result<Object, Invalid>,
}

impl Record {
    /// The record at `rel` (relative to `<prefix>/policy/`); `None` for keys that are none
    /// of ours.
    pub fn new(rel: &str, raw: Vec<u8>) -> Option<Record> {
        let key = ObjectKey::parse(rel)?;
        let parsed = netpol::object::parse(&key, &raw);
        Some(Record { key, raw, parsed })
    }
}

/// kubectl's table: columns left-aligned, three spaces apart, no trailing blanks.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                out.push_str(c);
                out.push_str(&" ".repeat(pad + 3));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `a=1,b=2`, or `<none>`.
pub fn labels(l: &Labels) -> String {
    if l.is_empty() {
        "<none>".into()
    } else {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The table of `records` (all of `resource`), with `-o wide`'s extra columns if asked.
pub fn table(resource: Resource, records: &[Record], wide: bool) -> String {
    let any_invalid = records.iter().any(|r| r.parsed.is_err());
    let mut header: Vec<&str> = match resource {
        Resource::NetworkPolicy => vec!["NAMESPACE", "NAME", "POD-SELECTOR"],
        Resource::Namespace => vec!["NAME", "LABELS"],
        Resource::Pod => vec!["NAMESPACE", "NAME", "IP", "LABELS"],
    };
    if wide {
        header.extend(match resource {
            Resource::NetworkPolicy => &["POLICY-TYPES", "INGRESS-RULES", "EGRESS-RULES"][..],
            Resource::Namespace => &[][..],
            Resource::Pod => &["NODE-IP", "NAMED-PORTS"][..],
        });
    }
    if any_invalid {
        header.push("STATUS");
    }
    let blanks = header.len() - usize::from(any_invalid);
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let (ns, name) = key_name(&r.key);
            let mut row: Vec<String> = Vec::new();
            if let Some(ns) = ns {
                row.push(ns.to_string());
            }
            row.push(name.to_string());
            match &r.parsed {
                Ok(obj) => row.extend(columns(obj, wide)),
                Err(_) => row.resize(blanks, "<invalid>".into()),
            }
            if any_invalid {
                row.push(match &r.parsed {
                    Ok(_) => "OK".into(),
                    Err(e) => format!("INVALID: {e}"),
                });
            }
            row
        })
        .collect();
    render_table(&header, &rows)
}

/// The columns after namespace and name.
fn columns(obj: &Object, wide: bool) -> Vec<String> {
    let count = |rules: &Option<Vec<netpol::object::Rule>>| match rules {
        Some(r) => r.len().to_string(),
        None => "-".into(),
    };
    match obj {
        Object::Policy(p) => {
            let mut c = vec![p.pod_selector.to_string()];
            if wide {
                let mut types = Vec::new();
                if p.ingress.is_some() {
                    types.push("Ingress");
                }
                if p.egress.is_some() {
                    types.push("Egress");
                }
                c.push(if types.is_empty() {
                    "<none>".into()
                } else {
                    types.join(",")
                });
                c.push(count(&p.ingress));
                c.push(count(&p.egress));
            }
            c
        }
        Object::Namespace(n) => vec![labels(&n.labels)],
        Object::Pod(p) => {
            let ips = if p.ips.is_empty() {
                "<none>".to_string()
            } else {
                p.ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut c = vec![ips, labels(&p.labels)];
            if wide {
                c.push(p.host_ip.map_or("<none>".into(), |ip| ip.to_string()));
                c.push(if p.ports.is_empty() {
                    "<none>".into()
                } else {
                    p.ports
                        .iter()
                        .map(|np| format!("{}={}/{}", np.name, np.port, np.protocol.name()))
                        .collect::<Vec<_>>()
                        .join(",")
                });
            }
            c
        }
    }
}

/// The stored objects as JSON: one object for a named get, else a `kind: List`. A value
/// that is not JSON at all is shown as a string.
pub fn as_json(records: &[Record], single: bool) -> Value {
    let values: Vec<Value> = records
        .iter()
        .map(|r| {
            serde_json::from_slice(&r.raw)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.raw).into_owned()))
        })
        .collect();
    match (single, values.as_slice()) {
        (true, [one]) => one.clone(),
        _ => serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": values,
            "metadata": {"resourceVersion": ""},
        }),
    }
}

/// The records of `resource` in `scope` (or just `name`), sorted by key.
pub fn select(
    resource: Resource,
    raws: impl IntoIterator<Item = (String, Vec<u8>)>,
    name: Option<&str>,
    scope: &Scope,
) -> Vec<Record> {
    let mut records: Vec<Record> = raws
        .into_iter()
        .filter_map(|(rel, raw)| Record::new(&rel, raw))
        .filter(|r| Resource::of_key(&r.key) == resource)
        .filter(|r| {
            let (ns, n) = key_name(&r.key);
            let ns_ok = match (ns, scope) {
                (Some(ns), Scope::Namespace(want)) => ns == want,
                _ => true,
            };
            ns_ok && name.is_none_or(|want| want == n)
        })
        .collect();
    records.sort_by(|a, b| a.key.cmp(&b.key));
    records
}

pub async fn run(
    flags: &Flags,
    resource: Resource,
    name: Option<&str>,
    scope: &Scope,
    output: Option<GetOutput>,
) -> Result<u8> {
    let store = Store::connect(flags).await?;
    let rel_prefix = match (resource.namespaced(), scope) {
        (true, Scope::Namespace(ns)) => format!("{}/{ns}/", resource.dir()),
        _ => format!("{}/", resource.dir()),
    };
    let raws = store.list(&rel_prefix).await?;
    let records = select(
        resource,
        raws.into_iter().map(|r| (r.rel, r.value)),
        name,
        scope,
    );
    if records.is_empty() {
        if let Some(name) = name {
            eprintln!(
                "Error from server (NotFound): {} {name:?} not found",
                resource.plural()
            );
            return Ok(1);
        }
        if output.is_none() || output == Some(GetOutput::Wide) {
            match (resource.namespaced(), scope) {
                (true, Scope::Namespace(ns)) => eprintln!("No resources found in {ns} namespace."),
                _ => eprintln!("No resources found"),
            }
            return Ok(0);
        }
    }
    match output {
        Some(GetOutput::Json) => {
            let text = serde_json::to_string_pretty(&as_json(&records, name.is_some()))?;
            println!("{text}");
        }
        Some(GetOutput::Yaml) => {
            let text = serde_norway::to_string(&as_json(&records, name.is_some()))
                .context("writing YAML")?;
            print!("{text}");
        }
        Some(GetOutput::Wide) => print!("{}", table(resource, &records, true)),
        None => print!("{}", table(resource, &records, false)),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raws() -> Vec<(String, Vec<u8>)> {
        let r = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        vec![
            r(
                "networkpolicies/x/web",
                r#"{"kind":"NetworkPolicy","metadata":{"name":"web","namespace":"x"},
                   "spec":{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{}]}}"#,
            ),
            r(
                "networkpolicies/default/deny-all",
                r#"{"metadata":{"name":"deny-all"},"spec":{"podSelector":{},"policyTypes":["Ingress","Egress"]}}"#,
            ),
            r(
                "networkpolicies/x/broken",
                r#"{"metadata":{"name":"other"}}"#,
            ),
            r(
                "namespaces/x",
                r#"{"metadata":{"name":"x","labels":{"team":"a","env":"prod"}}}"#,
            ),
            r("namespaces/y", r#"{"metadata":{"name":"y"}}"#),
            r(
                "pods/x/a",
                r#"{"metadata":{"name":"a","namespace":"x","labels":{"app":"web"}},
                   "status":{"podIP":"10.244.1.2","podIPs":[{"ip":"10.244.1.2"}],"hostIP":"10.0.0.1"}}"#,
            ),
            r("unrelated/thing", "{}"),
        ]
    }

    #[test]
    fn policies_table_marks_invalid_records() {
        let recs = select(Resource::NetworkPolicy, raws(), None, &Scope::All);
        assert_eq!(recs.len(), 3);
        let t = table(Resource::NetworkPolicy, &recs, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAMESPACE   NAME       POD-SELECTOR   STATUS");
        assert_eq!(lines[1], "default     deny-all   {}             OK");
        assert!(
            lines[2].starts_with("x           broken     <invalid>      INVALID: metadata.name"),
            "{t}"
        );
        assert_eq!(lines[3], "x           web        app=web        OK");
    }

    #[test]
    fn namespace_scope_and_name() {
        let recs = select(
            Resource::NetworkPolicy,
            raws(),
            None,
            &Scope::Namespace("x".into()),
        );
        assert_eq!(recs.len(), 2);
        let recs = select(
            Resource::NetworkPolicy,
            raws(),
            Some("web"),
            &Scope::Namespace("x".into()),
        );
        assert_eq!(recs.len(), 1);
        let t = table(Resource::NetworkPolicy, &recs, true);
        assert_eq!(
            t,
            "NAMESPACE   NAME   POD-SELECTOR   POLICY-TYPES   INGRESS-RULES   EGRESS-RULES\n\
             x           web    app=web        Ingress        1               -\n"
        );
        assert_eq!(as_json(&recs, true)["metadata"]["name"], "web");
        let list = as_json(&recs, false);
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][0]["metadata"]["name"], "web");
    }

    #[test]
    fn namespaces_and_pods_tables() {
        let recs = select(
            Resource::Namespace,
            raws(),
            None,
            &Scope::Namespace("ignored".into()),
        );
        assert_eq!(
            table(Resource::Namespace, &recs, false),
            "NAME   LABELS\nx      env=prod,team=a\ny      <none>\n"
        );
        let recs = select(Resource::Pod, raws(), None, &Scope::All);
        assert_eq!(
            table(Resource::Pod, &recs, false),
            "NAMESPACE   NAME   IP           LABELS\nx           a      10.244.1.2   app=web\n"
        );
        assert!(table(Resource::Pod, &recs, true).contains("NODE-IP"));
    }

    #[test]
    fn table_alignment() {
        let t = render_table(&["A", "LONGER"], &[vec!["wide-cell".into(), "".into()]]);
        assert_eq!(t, "A           LONGER\nwide-cell\n");
    }
}
