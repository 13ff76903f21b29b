//! Reading JSON the way Go's `encoding/json` reads it into Flannel's structs: one field lookup
//! for every reader (network config, lease values, backend data, CNI config).

use serde_json::{Map, Value};

/// A field by name: the exact name first, else the first name equal to it ignoring ASCII case
/// (Go's rule). `null` counts as absent.
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
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
    fn exact_name_wins_then_any_case_and_null_is_absent() {
        let v = json!({"vni": 2, "VNI": 3, "Port": null, "mTu": 1400});
        assert_eq!(field_of(&v, "VNI"), Some(&json!(3)));
        assert_eq!(field_of(&v, "Vni"), Some(&json!(2)));
        assert_eq!(field_of(&v, "MTU"), Some(&json!(1400)));
        assert_eq!(field_of(&v, "Port"), None);
        assert_eq!(field_of(&json!([1]), "x"), None);
        assert_eq!(kind(&json!("x")), "a string");
    }
}
