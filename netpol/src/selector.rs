//! Label selectors (`matchLabels` and `matchExpressions`), checked once and then matched
//! against label maps. `{}` selects everything; a selector that is absent is the caller's
//! business (it means different things in different fields).

use std::collections::BTreeMap;

use crate::wire;
use crate::Invalid;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

/// A checked selector: every requirement must hold (`matchLabels` become `In` with one value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Self {
        Selector::default()
    }

    pub fn parse(raw: &wire::LabelSelector, field: &str) -> Result<Self, Invalid> {
        let mut requirements = Vec::new();
        for (key, value) in raw.match_labels.iter().flatten() {
            check_key(key, field)?;
            check_value(value, field)?;
            requirements.push(Requirement {
                key: key.clone(),
                op: Op::In(vec![value.clone()]),
            });
        }
        for (i, req) in raw.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            check_key(&req.key, &at)?;
            let values = req.values.clone().unwrap_or_default();
            for v in &values {
                check_value(v, &at)?;
            }
            let op = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(Invalid::new(
                        &at,
                        format!("operator {} needs at least one value", req.operator),
                    ))
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(Invalid::new(
                        &at,
                        format!("operator {} takes no values", req.operator),
                    ))
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(Invalid::new(
                        &at,
                        format!(
                            "unknown operator {:?} (expected In, NotIn, Exists or DoesNotExist)",
                            crate::clip(other)
                        ),
                    ))
                }
            };
            requirements.push(Requirement {
                key: req.key.clone(),
                op,
            });
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| {
            let have = labels.get(&r.key);
            match &r.op {
                Op::In(vals) => have.is_some_and(|v| vals.contains(v)),
                Op::NotIn(vals) => have.is_none_or(|v| !vals.contains(v)),
                Op::Exists => have.is_some(),
                Op::DoesNotExist => have.is_none(),
            }
        })
    }
}

impl std::fmt::Display for Selector {
    /// Kubernetes' own selector syntax (`app=db,tier notin (a,b)`), or `{}` for everything.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match &r.op {
                Op::In(v) if v.len() == 1 => format!("{}={}", r.key, v[0]),
                Op::In(v) => format!("{} in ({})", r.key, v.join(",")),
                Op::NotIn(v) => format!("{} notin ({})", r.key, v.join(",")),
                Op::Exists => r.key.clone(),
                Op::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Kubernetes label keys: an optional DNS prefix and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn check_key(key: &str, field: &str) -> Result<(), Invalid> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    });
    if !prefix_ok || !is_label_name(name) || name.is_empty() {
        return Err(Invalid::new(
            field,
            format!("invalid label key {:?}", crate::clip(key)),
        ));
    }
    Ok(())
}

/// Label values: empty, or at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub fn check_value(value: &str, field: &str) -> Result<(), Invalid> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            format!("invalid label value {:?}", crate::clip(value)),
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Checks a label map (pods, namespaces).
pub fn check_labels(labels: &Labels, field: &str) -> Result<(), Invalid> {
    for (k, v) in labels {
        check_key(k, field)?;
        check_value(v, field)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(json: &str) -> Result<Selector, Invalid> {
        let raw: wire::LabelSelector = serde_json::from_str(json).expect("json");
        Selector::parse(&raw, "spec.podSelector")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selects_everything() {
        let s = sel("{}").expect("valid");
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s.to_string(), "{}");
    }

    #[test]
    fn labels_and_expressions_all_hold() {
        let s = sel(r#"{"matchLabels":{"pod":"a"},"matchExpressions":[
                {"key":"tier","operator":"NotIn","values":["db"]},
                {"key":"env","operator":"Exists"},
                {"key":"gone","operator":"DoesNotExist"},
                {"key":"app","operator":"In","values":["x","y"]}]}"#)
        .expect("valid");
        let good = labels(&[("pod", "a"), ("env", "p"), ("app", "y")]);
        assert!(s.matches(&good));
        let mut bad = good.clone();
        bad.insert("tier".into(), "db".into());
        assert!(!s.matches(&bad));
        let mut bad = good.clone();
        bad.insert("gone".into(), "".into());
        assert!(!s.matches(&bad));
        assert!(!s.matches(&labels(&[("pod", "a"), ("app", "y")])));
        assert_eq!(
            s.to_string(),
            "pod=a,tier notin (db),env,!gone,app in (x,y)"
        );
    }

    #[test]
    fn bad_operators_and_values_are_named() {
        let e = sel(r#"{"matchExpressions":[{"key":"a","operator":"Equals","values":["b"]}]}"#)
            .expect_err("bad op");
        assert!(
            e.to_string()
                .contains("spec.podSelector.matchExpressions[0]"),
            "{e}"
        );
        assert!(e.to_string().contains("unknown operator \"Equals\""), "{e}");
        assert!(sel(r#"{"matchExpressions":[{"key":"a","operator":"In"}]}"#).is_err());
        assert!(
            sel(r#"{"matchExpressions":[{"key":"a","operator":"Exists","values":["x"]}]}"#)
                .is_err()
        );
        assert!(sel(r#"{"matchLabels":{"bad key":"x"}}"#).is_err());
        assert!(sel(r#"{"matchLabels":{"k":"-x"}}"#).is_err());
        assert!(sel(r#"{"matchLabels":{"example.com/k":"v_1"}}"#).is_ok());
    }
}
