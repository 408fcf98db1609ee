//! Tool namespaces in system/developer messages and their TypeScript-like rendering
//! (`# Tools` section), token-exact with openai-harmony 0.0.8.
//!
//! Namespaces are a JSON object keyed by namespace name and render in key order; the JSON
//! schemas of tool parameters keep their key order (harmony uses serde_json `preserve_order`),
//! so they are held in [`OJson`], an order-preserving JSON value.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// A JSON value whose objects keep their key order.
#[derive(Debug, Clone, PartialEq)]
pub enum OJson {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<OJson>),
    Object(Vec<(String, OJson)>),
}

impl OJson {
    pub fn get(&self, key: &str) -> Option<&OJson> {
        match self {
            OJson::Object(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            OJson::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[OJson]> {
        match self {
            OJson::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            OJson::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn is_string(&self) -> bool {
        matches!(self, OJson::String(_))
    }
}

impl fmt::Display for OJson {
    /// Compact JSON, as serde_json's `Value` displays.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&s)
    }
}

impl Serialize for OJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            OJson::Null => s.serialize_unit(),
            OJson::Bool(b) => s.serialize_bool(*b),
            OJson::Number(n) => n.serialize(s),
            OJson::String(v) => s.serialize_str(v),
            OJson::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            OJson::Object(kv) => {
                let mut m = s.serialize_map(Some(kv.len()))?;
                for (k, v) in kv {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for OJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OJson;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<OJson, E> {
                Ok(OJson::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<OJson, E> {
                Ok(OJson::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<OJson, D2::Error> {
                OJson::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OJson, E> {
                Ok(OJson::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OJson, E> {
                Ok(OJson::Number(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OJson, E> {
                Ok(OJson::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OJson, E> {
                serde_json::Number::from_f64(v).map(OJson::Number).ok_or_else(|| E::custom("non-finite number"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OJson, E> {
                Ok(OJson::String(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<OJson, E> {
                Ok(OJson::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OJson, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OJson::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OJson, A::Error> {
                let mut out: Vec<(String, OJson)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, OJson>()? {
                    // Like an IndexMap: a repeated key keeps its first position, last value.
                    if let Some(slot) = out.iter_mut().find(|(ek, _)| *ek == k) {
                        slot.1 = v;
                    } else {
                        out.push((k, v));
                    }
                }
                Ok(OJson::Object(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDescription {
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<OJson>,
}

/// A tool namespace (`functions`, `browser`, `python`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolNamespace {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub tools: Vec<ToolDescription>,
}

/// Namespaces keyed by name, iterated in key order (a JSON object in the harmony form).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ToolMap(pub BTreeMap<String, ToolNamespace>);

impl ToolMap {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &ToolNamespace> {
        self.0.values()
    }
    pub fn get(&self, key: &str) -> Option<&ToolNamespace> {
        self.0.get(key)
    }
}

/// The `# Tools` section for a set of namespaces.
pub fn tools_section(tools: &ToolMap) -> String {
    let mut sections = vec!["# Tools".to_string()];
    for ns in tools.iter() {
        let mut parts = vec![format!("## {}\n", ns.name)];
        if let Some(desc) = &ns.description {
            for line in desc.lines() {
                if ns.tools.is_empty() {
                    parts.push(line.to_string());
                } else {
                    parts.push(format!("// {line}"));
                }
            }
        }
        if !ns.tools.is_empty() {
            parts.push(format!("namespace {} {{\n", ns.name));
            for tool in &ns.tools {
                for line in tool.description.lines() {
                    parts.push(format!("// {line}"));
                }
                match &tool.parameters {
                    Some(p) => parts.push(format!("type {} = (_: {}) => any;\n", tool.name, schema_to_ts(p, ""))),
                    None => parts.push(format!("type {} = () => any;\n", tool.name)),
                }
            }
            parts.push(format!("}} // namespace {}", ns.name));
        }
        sections.push(parts.join("\n"));
    }
    sections.join("\n\n")
}

fn is_enum(schema: &OJson) -> bool {
    schema.get("enum").and_then(OJson::as_array).is_some_and(|a| !a.is_empty())
}

fn is_nullable(schema: &OJson) -> bool {
    schema.get("nullable").and_then(OJson::as_bool).unwrap_or(false)
}

fn with_null(schema: &OJson, ty: String) -> String {
    if is_nullable(schema) && !ty.contains("null") {
        format!("{ty} | null")
    } else {
        ty
    }
}

/// `default: …` as used in trailing comments of top-level `oneOf` variants (JSON form for
/// enums).
fn default_json_style(schema: &OJson, default: &OJson) -> String {
    match default {
        OJson::String(s) if !is_enum(schema) => format!("default: \"{s}\""),
        other => format!("default: {other}"),
    }
}

/// `default: …` as used for properties (raw string for enums).
fn default_raw_style(schema: &OJson, default: &OJson) -> String {
    match default {
        OJson::String(s) if !is_enum(schema) => format!("default: \"{s}\""),
        OJson::String(s) => format!("default: {s}"),
        other => format!("default: {other}"),
    }
}

/// JSON schema → TypeScript type text (harmony's `json_schema_to_typescript`).
pub fn schema_to_ts(schema: &OJson, indent: &str) -> String {
    if let Some(variants) = schema.get("oneOf").and_then(OJson::as_array) {
        let mut out = String::new();
        for v in variants {
            out.push_str(&format!("\n{indent} | "));
            out.push_str(&with_null(v, schema_to_ts(v, &format!("{indent}   "))));
            let mut trailing = Vec::new();
            if let Some(d) = v.get("description").and_then(OJson::as_str) {
                trailing.push(d.to_string());
            }
            if let Some(d) = v.get("default") {
                trailing.push(default_json_style(v, d));
            }
            if !trailing.is_empty() {
                out.push_str(&format!(" // {}", trailing.join(" ")));
            }
        }
        return out;
    }
    if let Some(types) = schema.get("type").and_then(OJson::as_array) {
        let names: Vec<&str> =
            types.iter().filter_map(OJson::as_str).map(|t| if t == "integer" { "number" } else { t }).collect();
        if !names.is_empty() {
            return names.join(" | ");
        }
    }
    let Some(ty) = schema.get("type").and_then(OJson::as_str) else {
        return "any".to_string();
    };
    match ty {
        "object" => object_to_ts(schema, indent),
        "string" => {
            if let Some(vals) = schema.get("enum").and_then(OJson::as_array) {
                let e: Vec<String> = vals.iter().filter_map(OJson::as_str).map(|s| format!("\"{s}\"")).collect();
                if !e.is_empty() {
                    return e.join(" | ");
                }
            }
            "string".to_string()
        }
        "number" | "integer" => "number".to_string(),
        "boolean" => "boolean".to_string(),
        "array" => match schema.get("items") {
            Some(items) => format!("{}[]", schema_to_ts(items, indent)),
            None => "Array<any>".to_string(),
        },
        _ => "any".to_string(),
    }
}

fn object_to_ts(schema: &OJson, indent: &str) -> String {
    let mut out = String::new();
    if let Some(d) = schema.get("description").and_then(OJson::as_str) {
        out.push_str(&format!("{indent}// {d}\n"));
    }
    out.push_str("{\n");
    let required: Vec<&str> = schema
        .get("required")
        .and_then(OJson::as_array)
        .map(|a| a.iter().filter_map(OJson::as_str).collect())
        .unwrap_or_default();
    if let Some(OJson::Object(props)) = schema.get("properties") {
        for (key, val) in props {
            let opt = if required.contains(&key.as_str()) { "" } else { "?" };
            if let Some(t) = val.get("title").and_then(OJson::as_str) {
                out.push_str(&format!("{indent}// {t}\n{indent}//\n"));
            }
            let one_of = val.get("oneOf");
            if one_of.is_none() {
                if let Some(d) = val.get("description").and_then(OJson::as_str) {
                    out.push_str(&format!("{indent}// {d}\n"));
                }
            }
            if let Some(ex) = val.get("examples").and_then(OJson::as_array) {
                if !ex.is_empty() {
                    out.push_str(&format!("{indent}// Examples:\n"));
                    for e in ex.iter().filter_map(OJson::as_str) {
                        out.push_str(&format!("{indent}// - \"{e}\"\n"));
                    }
                }
            }
            if let Some(variants) = one_of.and_then(OJson::as_array) {
                let prop_desc = val.get("description").and_then(OJson::as_str);
                let skip_desc = prop_desc.is_some()
                    && variants.first().and_then(|v| v.get("description")).and_then(OJson::as_str) == prop_desc;
                let mut desc_above = false;
                if !skip_desc {
                    if let Some(d) = prop_desc {
                        out.push_str(&format!("{indent}// {d}\n"));
                        desc_above = true;
                    }
                }
                if let Some(d) = val.get("default") {
                    out.push_str(&format!("{indent}// {}\n", default_raw_style(val, d)));
                }
                out.push_str(&format!("{indent}{key}{opt}:\n"));
                for (i, v) in variants.iter().enumerate() {
                    out.push_str(&format!("{indent} | "));
                    out.push_str(&with_null(v, schema_to_ts(v, &format!("{indent}   "))));
                    let mut trailing = Vec::new();
                    if !(i == 0 && desc_above) {
                        if let Some(d) = v.get("description").and_then(OJson::as_str) {
                            if Some(d) != prop_desc {
                                trailing.push(d.to_string());
                            }
                        }
                    }
                    if let Some(d) = v.get("default") {
                        trailing.push(default_raw_style(v, d));
                    }
                    if !trailing.is_empty() {
                        out.push_str(&format!(" // {}", trailing.join(" ")));
                    }
                    out.push('\n');
                }
                out.push_str(&format!("{indent},\n"));
                continue;
            }
            out.push_str(&format!("{indent}{key}{opt}: "));
            out.push_str(&with_null(val, schema_to_ts(val, &format!("{indent}    "))));
            out.push(',');
            if one_of.is_none() {
                if let Some(d) = val.get("default") {
                    out.push_str(&format!(" // {}", default_raw_style(val, d)));
                }
            }
            out.push('\n');
        }
    }
    out.push_str(&format!("{indent}}}"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weather_function() {
        let ns: ToolMap = serde_json::from_str(
            r#"{"functions": {"name": "functions", "tools": [{"name": "get_weather",
            "description": "Gets the current weather in the provided location.",
            "parameters": {"type": "object", "properties": {
              "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
              "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
              "required": ["location"]}}]}}"#,
        )
        .unwrap();
        let want = "# Tools\n\n## functions\n\nnamespace functions {\n\n// Gets the current weather in the provided location.\ntype get_weather = (_: {\n// The city and state, e.g. San Francisco, CA\nlocation: string,\nformat?: \"celsius\" | \"fahrenheit\", // default: celsius\n}) => any;\n\n} // namespace functions";
        assert_eq!(tools_section(&ns), want);
    }

    #[test]
    fn key_order_is_kept() {
        let v: OJson = serde_json::from_str(r#"{"b":1,"a":[true,null,"x",1.5]}"#).unwrap();
        assert_eq!(v.to_string(), r#"{"b":1,"a":[true,null,"x",1.5]}"#);
    }
}
