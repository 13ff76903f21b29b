//! Reading JSON the way Go's `encoding/json` reads it into Flannel's structs: one field lookup
//! for every reader (network config, lease values, backend data, CNI config).

use serde_json::{Map, Value};

/// A field by name, as Go decodes it into a struct field: every key equal to the name
/// ignoring ASCII case is decoded into that field in document order, so the last one wins
/// (`{"Network":"a","network":"b"}` is "b" for Go Flannel, and must be for us, or the two
/// would run different networks). `null` decodes as nothing, so it counts as absent and
/// leaves an earlier value standing. (A key repeated in the exact same spelling keeps its
/// first position in the parsed map, with its last value: only its position may differ.)
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .rev()
        .find(|(k, v)| k.eq_ignore_ascii_case(name) && !v.is_null())
        .map(|(_, v)| v)
}

/// [`field`] of a value that should be an object (`None` when it is not one).
pub fn field_of<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    field(value.as_object()?, name)
}

/// "a string", "a number"...: for messages about a value of the wrong JSON type.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_last_key_of_any_case_wins_and_null_is_absent() {
        let v: Value =
            serde_json::from_str(r#"{"vni": 2, "VNI": 3, "Port": null, "mTu": 1400, "Dist": "ok", "dist": "KO", "Gw": "a", "gw": null}"#)
                .expect("json");
        // Go decodes every matching key in turn (golang/go#43664: {"Dist":"ok","dist":"KO"}
        // gives "KO" for a field tagged "dist" or "Dist").
        assert_eq!(field_of(&v, "VNI"), Some(&json!(3)));
        assert_eq!(field_of(&v, "Vni"), Some(&json!(3)));
        assert_eq!(field_of(&v, "dist"), Some(&json!("KO")));
        assert_eq!(field_of(&v, "Dist"), Some(&json!("KO")));
        assert_eq!(field_of(&v, "MTU"), Some(&json!(1400)));
        assert_eq!(field_of(&v, "Port"), None);
        // A later null leaves the earlier value.
        assert_eq!(field_of(&v, "gw"), Some(&json!("a")));
        assert_eq!(field_of(&json!([1]), "x"), None);
        assert_eq!(kind(&json!("x")), "a string");
    }
}
