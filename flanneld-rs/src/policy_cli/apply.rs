//! `policy apply -f FILE` and `policy delete`: a file's documents become checked objects (a
//! pure plan, tested without etcd); only when every one is valid is anything written.

use anyhow::{bail, Context, Result};
use netpol::ObjectKey;
use serde::Deserialize;
use serde_json::Value;

use super::resource::{key_name, Resource};
use super::store::Store;
use super::{read_input, DEFAULT_NAMESPACE};
use crate::flags::Flags;

/// One object read from a file, with where it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    /// 1-based document number in the file.
    pub index: usize,
    /// 1-based position in a `kind: List`'s `items`.
    pub item: Option<usize>,
    pub value: Value,
}

impl Doc {
    fn place(&self) -> String {
        match self.item {
            Some(i) => format!("document {} item {i}", self.index),
            None => format!("document {}", self.index),
        }
    }
}

/// The documents of a file: a JSON value (or several, one after another), or YAML with
/// `---` between documents. Lists (`kind: List`, or `…List` as `kubectl get -o json` writes
/// them) are opened into their items; empty documents are skipped. A syntax error anywhere
/// fails the whole file.
pub fn documents(text: &str) -> Result<Vec<Doc>, String> {
    let mut values = Vec::new();
    if text.trim_start().starts_with(['{', '[']) {
        for (i, v) in serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .enumerate()
        {
            values.push(v.map_err(|e| format!("document {}: not valid JSON: {e}", i + 1))?);
        }
    } else {
        for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
            values.push(
                Value::deserialize(doc)
                    .map_err(|e| format!("document {}: not valid YAML: {e}", i + 1))?,
            );
        }
    }
    let mut docs = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let index = i + 1;
        if value.is_null() {
            continue;
        }
        let is_list = value
            .get("kind")
            .and_then(Value::as_str)
            .is_some_and(|k| k.ends_with("List"));
        match (is_list, value.get("items")) {
            (true, Some(Value::Array(items))) => {
                docs.extend(items.iter().enumerate().map(|(j, item)| Doc {
                    index,
                    item: Some(j + 1),
                    value: item.clone(),
                }))
            }
            (true, Some(Value::Null) | None) => {}
            (true, Some(_)) => return Err(format!("document {index}: items is not a list")),
            (false, _) => docs.push(Doc {
                index,
                item: None,
                value,
            }),
        }
    }
    Ok(docs)
}

/// What one document names: its resource and key, with its namespace filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub resource: Resource,
    pub key: ObjectKey,
    /// The object as it will be stored (metadata.namespace filled in for namespaced kinds).
    pub value: Value,
}

/// The resource and key of `doc`; `default_ns` is `-n`. Errors are
/// `(what the object is, as far as known, reason)`.
fn identify(doc: &Doc, default_ns: Option<&str>) -> Result<Target, (String, String)> {
    let Value::Object(obj) = &doc.value else {
        return Err(("?".into(), "not an object".into()));
    };
    let kind = obj.get("kind").and_then(Value::as_str);
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    let meta_ns = obj
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    let Some(resource) = kind.and_then(Resource::from_kind) else {
        let what = format!("{} {}", kind.unwrap_or("?"), name.unwrap_or("?"));
        let why = match kind {
            None => "kind: missing (expected NetworkPolicy, Namespace or Pod)".to_string(),
            Some(k) => format!("kind: {k:?} is not one of NetworkPolicy, Namespace, Pod"),
        };
        return Err((what, why));
    };
    let namespace = meta_ns.or(default_ns).unwrap_or(DEFAULT_NAMESPACE);
    let what = if resource.namespaced() {
        format!("{} {namespace}/{}", resource.kind(), name.unwrap_or("?"))
    } else {
        format!("{} {}", resource.kind(), name.unwrap_or("?"))
    };
    if !matches!(obj.get("metadata"), None | Some(Value::Object(_))) {
        return Err((what, "metadata: not an object".into()));
    }
    let Some(name) = name else {
        return Err((what, "metadata.name: missing".into()));
    };
    if resource.namespaced() {
        if let (Some(have), Some(flag)) = (meta_ns, default_ns) {
            if have != flag {
                return Err((
                    what,
                    format!(
                        "metadata.namespace is {have:?} but --namespace is {flag:?} \
                         (pass --namespace={have} or drop it)"
                    ),
                ));
            }
        }
    }
    let mut value = doc.value.clone();
    if resource.namespaced() {
        if let Some(Value::Object(obj)) = value.as_object_mut().map(|o| {
            o.entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()))
        }) {
            obj.insert("namespace".into(), Value::String(namespace.into()));
        }
    }
    Ok(Target {
        resource,
        key: resource.key(namespace, name),
        value,
    })
}

/// One object checked and ready to write.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub resource: Resource,
    pub key: ObjectKey,
    /// The JSON to store.
    pub value: Vec<u8>,
}

/// The writes that applying `text` (read from `source`) means, each object checked with
/// `netpol::object::parse` against its key. Any invalid object: every problem, one line
/// each (`<source>: document N (<kind> <ns>/<name>): <reason>`), and nothing to write.
pub fn plan(
    source: &str,
    text: &str,
    default_ns: Option<&str>,
) -> Result<Vec<Planned>, Vec<String>> {
    let docs = documents(text).map_err(|e| vec![format!("{source}: {e}")])?;
    if docs.is_empty() {
        return Err(vec![format!("{source}: no objects")]);
    }
    let mut planned = Vec::new();
    let mut problems = Vec::new();
    for doc in &docs {
        let checked = identify(doc, default_ns).and_then(|t| {
            let what = describe(&t.key);
            let bytes = serde_json::to_vec(&t.value).map_err(|e| (what.clone(), e.to_string()))?;
            netpol::object::parse(&t.key, &bytes).map_err(|e| (what, e.to_string()))?;
            Ok(Planned {
                resource: t.resource,
                key: t.key,
                value: bytes,
            })
        });
        match checked {
            Ok(p) => planned.push(p),
            Err((what, why)) => problems.push(format!("{source}: {} ({what}): {why}", doc.place())),
        }
    }
    if problems.is_empty() {
        Ok(planned)
    } else {
        Err(problems)
    }
}

/// The keys a file names (for `delete -f`): objects need a kind and a name, nothing more.
pub fn targets(
    source: &str,
    text: &str,
    default_ns: Option<&str>,
) -> Result<Vec<Target>, Vec<String>> {
    let docs = documents(text).map_err(|e| vec![format!("{source}: {e}")])?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for doc in &docs {
        match identify(doc, default_ns) {
            Ok(t) => out.push(t),
            Err((what, why)) => problems.push(format!("{source}: {} ({what}): {why}", doc.place())),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// `NetworkPolicy ns/name`, `Namespace name`.
fn describe(key: &ObjectKey) -> String {
    let kind = Resource::of_key(key).kind();
    match key_name(key) {
        (Some(ns), name) => format!("{kind} {ns}/{name}"),
        (None, name) => format!("{kind} {name}"),
    }
}

/// kubectl's word for what a write did.
pub fn outcome(before: Option<&[u8]>, after: &[u8]) -> &'static str {
    match before {
        None => "created",
        Some(b) if b == after => "unchanged",
        Some(_) => "configured",
    }
}

pub async fn run(flags: &Flags, file: &str, namespace: Option<&str>) -> Result<u8> {
    let text = read_input(file)?;
    let source = if file == "-" { "<stdin>" } else { file };
    let planned = match plan(source, &text, namespace) {
        Ok(p) => p,
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!("flanneld-rs policy apply: nothing written");
            return Ok(1);
        }
    };
    let store = Store::connect(flags).await?;
    for p in planned {
        let before = store.get(&p.key).await?;
        let said = outcome(before.as_deref(), &p.value);
        if said != "unchanged" {
            store.put(&p.key, p.value).await?;
        }
        println!("{}/{} {said}", p.resource.singular(), key_name(&p.key).1);
    }
    Ok(0)
}

pub async fn delete(
    flags: &Flags,
    resource: Option<&str>,
    names: &[String],
    file: Option<&str>,
    namespace: Option<&str>,
) -> Result<u8> {
    let keys: Vec<ObjectKey> = match (file, resource) {
        (Some(file), _) => {
            let text = read_input(file)?;
            let source = if file == "-" { "<stdin>" } else { file };
            match targets(source, &text, namespace) {
                Ok(t) => t.into_iter().map(|t| t.key).collect(),
                Err(problems) => {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    eprintln!("flanneld-rs policy delete: nothing deleted");
                    return Ok(1);
                }
            }
        }
        (None, Some(resource)) => {
            let resource = Resource::parse(resource)?;
            if names.is_empty() {
                bail!("name the {} to delete", resource.plural());
            }
            let ns = namespace.unwrap_or(DEFAULT_NAMESPACE);
            names.iter().map(|n| resource.key(ns, n)).collect()
        }
        (None, None) => bail!("give RESOURCE NAME… or -f FILE"),
    };
    let store = Store::connect(flags).await?;
    let mut missing = false;
    for key in keys {
        let r = Resource::of_key(&key);
        let (ns, name) = key_name(&key);
        if store
            .delete(&key)
            .await
            .with_context(|| format!("deleting {}", describe(&key)))?
        {
            println!("{}/{name} deleted", r.singular());
        } else {
            missing = true;
            match ns {
                Some(ns) => eprintln!(
                    "Error from server (NotFound): {} {name:?} not found in namespace {ns:?}",
                    r.plural()
                ),
                None => eprintln!(
                    "Error from server (NotFound): {} {name:?} not found",
                    r.plural()
                ),
            }
        }
    }
    Ok(u8::from(missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY_YAML: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector: {}
    ports:
    - port: 80
      protocol: TCP
"#;

    #[test]
    fn multi_document_yaml() {
        let text = format!(
            "{POLICY_YAML}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n  labels:\n    env: prod\n---\n"
        );
        let docs = documents(&text).expect("docs");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].index, 1);
        assert_eq!(docs[1].value["kind"], "Namespace");
        let planned = plan("f.yaml", &text, None).expect("plan");
        assert_eq!(planned[0].key.rel(), "networkpolicies/default/web");
        assert_eq!(planned[1].key.rel(), "namespaces/prod");
    }

    #[test]
    fn lists_in_json_and_yaml() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"kind":"Namespace","metadata":{"name":"a"}},
            {"kind":"NetworkPolicy","metadata":{"name":"deny","namespace":"a"},"spec":{"podSelector":{}}}]}"#;
        let planned = plan("l.json", json, None).expect("plan");
        let keys: Vec<String> = planned.iter().map(|p| p.key.rel()).collect();
        assert_eq!(keys, ["namespaces/a", "networkpolicies/a/deny"]);

        let yaml = "kind: NetworkPolicyList\nitems:\n- kind: NetworkPolicy\n  metadata: {name: x}\n  spec: {}\n";
        let docs = documents(yaml).expect("docs");
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].item, Some(1));
        // Concatenated JSON values are documents too.
        let two = r#"{"kind":"Namespace","metadata":{"name":"a"}} {"kind":"Namespace","metadata":{"name":"b"}}"#;
        assert_eq!(plan("x", two, None).expect("plan").len(), 2);
    }

    #[test]
    fn namespace_defaulting() {
        let planned = plan("f", POLICY_YAML, Some("team")).expect("plan");
        assert_eq!(planned[0].key.rel(), "networkpolicies/team/web");
        let stored: Value = serde_json::from_slice(&planned[0].value).expect("json");
        assert_eq!(stored["metadata"]["namespace"], "team", "filled in");
        assert_eq!(stored["spec"]["ingress"][0]["ports"][0]["port"], 80);

        let planned = plan("f", POLICY_YAML, None).expect("plan");
        assert_eq!(planned[0].key.rel(), "networkpolicies/default/web");

        let own = POLICY_YAML.replace("  name: web", "  name: web\n  namespace: ops");
        let planned = plan("f", &own, None).expect("plan");
        assert_eq!(planned[0].key.rel(), "networkpolicies/ops/web");
        let clash = plan("f", &own, Some("team")).expect_err("namespaces differ");
        assert!(clash[0].contains("--namespace"), "{clash:?}");
        // Namespaces have none.
        let ns = plan("f", "kind: Namespace\nmetadata: {name: a}\n", Some("team")).expect("plan");
        let stored: Value = serde_json::from_slice(&ns[0].value).expect("json");
        assert!(stored["metadata"].get("namespace").is_none());
    }

    #[test]
    fn one_invalid_object_plans_no_writes_and_names_each_problem() {
        let text = format!(
            "{POLICY_YAML}---\nkind: NetworkPolicy\nmetadata: {{name: bad}}\nspec:\n  policyTypes: [Sideways]\n---\nkind: Deployment\nmetadata: {{name: d}}\n---\nkind: Namespace\nmetadata: {{name: Not_Valid}}\n"
        );
        let problems = plan("p.yaml", &text, None).expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems[0]
                .starts_with("p.yaml: document 2 (NetworkPolicy default/bad): spec.policyTypes[0]"),
            "{}",
            problems[0]
        );
        assert!(
            problems[1].starts_with("p.yaml: document 3 (Deployment d): kind"),
            "{}",
            problems[1]
        );
        assert!(
            problems[2].starts_with("p.yaml: document 4 (Namespace Not_Valid): key"),
            "{}",
            problems[2]
        );
    }

    #[test]
    fn syntax_errors_and_empty_files() {
        assert!(plan("f", "kind: [unclosed", None).expect_err("yaml")[0].contains("not valid YAML"));
        assert!(plan("f", "{\"kind\": ", None).expect_err("json")[0].contains("not valid JSON"));
        assert!(plan("f", "---\n", None).expect_err("empty")[0].contains("no objects"));
        let missing = plan("f", "kind: NetworkPolicy\nspec: {}\n", None).expect_err("no name");
        assert!(missing[0].contains("metadata.name: missing"), "{missing:?}");
    }

    #[test]
    fn delete_targets_need_only_kind_and_name() {
        let t = targets(
            "f",
            "kind: NetworkPolicy\nmetadata: {name: x}\nspec: {policyTypes: [Bad]}\n",
            Some("a"),
        )
        .expect("targets");
        assert_eq!(t[0].key.rel(), "networkpolicies/a/x");
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(None, b"x"), "created");
        assert_eq!(outcome(Some(b"x"), b"x"), "unchanged");
        assert_eq!(outcome(Some(b"y"), b"x"), "configured");
    }
}
