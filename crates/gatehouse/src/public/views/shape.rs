//! Shaping a part's answer: take the `target` sub-tree, keep only the allow-listed fields (at any
//! depth; arrays are shaped element by element), rename. The allow-list is the only way data
//! reaches the browser: a listed field whose value is an object passes only the fields listed
//! beneath it (`author.name`), so an object at a leaf is dropped rather than passed whole.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// One level of the allow-list: source key → (output key, what to keep beneath it).
#[derive(Debug, Clone, Default)]
pub struct Shape {
    children: BTreeMap<String, (String, Shape)>,
}

impl Shape {
    /// Build from dotted field paths and renames (dotted source path → new last key).
    pub fn new(fields: &[String], rename: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut root = Shape::default();
        for f in fields {
            let mut node = &mut root;
            for step in f.split('.') {
                node =
                    &mut node.children.entry(step.to_owned()).or_insert_with(|| (step.to_owned(), Shape::default())).1;
            }
        }
        for (from, to) in rename {
            if from.split('.').any(|step| step == "*") {
                return Err(format!("rename `{from}`: `*` cannot be renamed"));
            }
            if to.is_empty() || to.contains('.') {
                return Err(format!("rename `{from}` → `{to}`: the new name is one key, without dots"));
            }
            let mut node = &mut root;
            let steps: Vec<&str> = from.split('.').collect();
            let (last, parents) = steps.split_last().ok_or("empty rename")?;
            for step in parents {
                node = &mut node
                    .children
                    .get_mut(*step)
                    .ok_or_else(|| format!("rename `{from}`: not an allow-listed field"))?
                    .1;
            }
            let entry =
                node.children.get_mut(*last).ok_or_else(|| format!("rename `{from}`: not an allow-listed field"))?;
            entry.0 = to.clone();
        }
        root.check_unique_outputs()?;
        Ok(root)
    }

    fn check_unique_outputs(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for (out, child) in self.children.values() {
            if !seen.insert(out) {
                return Err(format!("two fields would land under the key `{out}`"));
            }
            child.check_unique_outputs()?;
        }
        Ok(())
    }

    /// The allow-listed part of `v`; `None` when nothing of it may pass.
    pub fn apply(&self, v: &Value) -> Option<Value> {
        if self.children.is_empty() {
            return leaf(v);
        }
        match v {
            Value::Object(obj) => {
                let mut out = Map::new();
                for (key, (out_key, child)) in &self.children {
                    if key == "*" {
                        continue;
                    }
                    if let Some(shaped) = obj.get(key).and_then(|c| child.apply(c)) {
                        out.insert(out_key.clone(), shaped);
                    }
                }
                // `*`: every other key of a map (client id → roles), shaped by what is listed beneath.
                if let Some((_, any)) = self.children.get("*") {
                    for (key, value) in obj {
                        if !self.children.contains_key(key)
                            && let Some(shaped) = any.apply(value)
                        {
                            out.insert(key.clone(), shaped);
                        }
                    }
                }
                Some(Value::Object(out))
            }
            Value::Array(items) => Some(Value::Array(items.iter().filter_map(|i| self.apply(i)).collect())),
            // A scalar where fields were expected: nothing of it is allow-listed.
            _ => None,
        }
    }
}

/// A leaf field keeps scalars and arrays of scalars; objects beneath it were not listed.
fn leaf(v: &Value) -> Option<Value> {
    match v {
        Value::Object(_) => None,
        Value::Array(items) => Some(Value::Array(items.iter().filter_map(leaf).collect())),
        other => Some(other.clone()),
    }
}

/// The sub-tree at a dotted path; `None` when a step is missing.
pub fn target<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, step| v.get(step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(fields: &[&str], rename: &[(&str, &str)]) -> Shape {
        let fields: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
        let rename = rename.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Shape::new(&fields, &rename).unwrap()
    }

    #[test]
    fn only_allow_listed_fields_pass_at_any_depth() {
        let v = json!({
            "id": 1, "secret": "s",
            "author": {"name": "a", "password_hash": "h", "nested": {"x": 1}},
            "tags": ["a", {"hidden": true}],
            "blob": {"whole": "object"},
        });
        let s = shape(&["id", "author.name", "tags", "blob", "missing"], &[]);
        assert_eq!(s.apply(&v).unwrap(), json!({"id": 1, "author": {"name": "a"}, "tags": ["a"]}));
    }

    #[test]
    fn arrays_are_shaped_per_element_and_renames_apply() {
        let v = json!([{"id": 1, "title": "t", "x": 0}, {"id": 2, "x": 0}, 7]);
        let s = shape(&["id", "title"], &[("title", "heading")]);
        assert_eq!(s.apply(&v).unwrap(), json!([{"id": 1, "heading": "t"}, {"id": 2}]));
        let v = json!({"items": [{"a": {"b": 1, "c": 2}}]});
        let s = shape(&["items.a.b"], &[("items.a", "alpha"), ("items.a.b", "beta")]);
        assert_eq!(s.apply(&v).unwrap(), json!({"items": [{"alpha": {"beta": 1}}]}));
    }

    #[test]
    fn a_star_step_keeps_every_key_of_a_map_shaped_by_what_follows() {
        let v = json!({"roles": {"app": ["r1"], "other": ["r2"], "odd": {"deep": 1}}, "x": 1});
        assert_eq!(shape(&["roles.*"], &[]).apply(&v).unwrap(), json!({"roles": {"app": ["r1"], "other": ["r2"]}}));
        let v = json!({"m": {"a": {"keep": 1, "drop": 2}, "b": {"keep": 3}}});
        assert_eq!(shape(&["m.*.keep"], &[]).apply(&v).unwrap(), json!({"m": {"a": {"keep": 1}, "b": {"keep": 3}}}));
    }

    #[test]
    fn targets_and_bad_renames() {
        let v = json!({"data": {"items": [1]}});
        assert_eq!(target(&v, "data.items"), Some(&json!([1])));
        assert_eq!(target(&v, "data.nope"), None);
        let fields = vec!["a".to_string(), "b".to_string()];
        let clash = [("a".to_string(), "b".to_string())].into_iter().collect();
        assert!(Shape::new(&fields, &clash).is_err(), "two fields under one key");
        let unknown = [("zz".to_string(), "y".to_string())].into_iter().collect();
        assert!(Shape::new(&fields, &unknown).is_err(), "rename of a field not listed");
    }
}
