//! Mutated configs: every key of the shipped and test configs set to values at its type's limits,
//! NaN and infinities, huge sizes and the wrong type. Each must compile or fail with an error that
//! names the key — no panic, within a few seconds — and every float must be finite and every size
//! bounded.

use std::path::Path;
use std::time::Duration;
use toml::Value;
use vpmoe_compiler::config::{self, SIZE_LIMITS};

/// The values one leaf is mutated to.
fn mutations(v: &Value) -> Vec<Value> {
    let ints = [0, -1, i64::MAX, i64::MIN, 1 << 31, 1 << 40, 1_000_000_000_000];
    let floats = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 1e300, 0.0];
    let mut out: Vec<Value> = match v {
        Value::Integer(_) => ints.iter().map(|&i| Value::Integer(i)).chain([Value::Float(f64::NAN)]).collect(),
        Value::Float(_) => floats.iter().map(|&f| Value::Float(f)).chain([Value::Integer(i64::MAX)]).collect(),
        Value::Boolean(b) => vec![Value::Boolean(!b), Value::Integer(1)],
        Value::String(_) => vec![Value::String(String::new()), Value::String("bogus".into())],
        _ => vec![],
    };
    out.push(Value::String("four".into()));
    out
}

#[test]
fn mutated_configs_fail_naming_the_key_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cases = 0;
    let mut problems = Vec::new();
    for rel in ["configs/small.toml", "tests/configs/tiny_moe.toml", "tests/configs/tiny_dense.toml"] {
        let base: toml::Table = std::fs::read_to_string(root.join(rel)).unwrap().parse().unwrap();
        for (section, table) in &base {
            let Some(table) = table.as_table() else { continue };
            for (key, value) in table {
                for m in mutations(value) {
                    let mut doc = base.clone();
                    doc[section.as_str()].as_table_mut().unwrap().insert(key.clone(), m.clone());
                    let text = toml::to_string(&doc).unwrap();
                    let full = format!("{section}.{key}");
                    // On its own thread, so a hang is reported (and left behind) instead of hanging
                    // the test.
                    let (tx, rx) = std::sync::mpsc::channel();
                    let base = root.to_path_buf();
                    std::thread::spawn(move || {
                        let r = std::panic::catch_unwind(|| {
                            config::parse(&text, "fuzz", &base)
                                .and_then(|a| vpmoe_compiler::compile_arch(&a).map(|_| ()))
                                .map_err(|e| format!("{e:#}"))
                        });
                        let _ = tx.send(r);
                    });
                    cases += 1;
                    let case = format!("{rel}: {full} = {m}");
                    let Ok(r) = rx.recv_timeout(Duration::from_secs(5)) else {
                        problems.push(format!("{case}: no answer within 5 s"));
                        continue;
                    };
                    match r {
                        Err(_) => problems.push(format!("{case}: panicked")),
                        Ok(Err(e)) if !e.contains(key.as_str()) => {
                            problems.push(format!("{case}: the error does not name the key: {e}"))
                        }
                        Ok(Ok(())) if matches!(m, Value::Float(f) if !f.is_finite()) => {
                            problems.push(format!("{case}: a non-finite number was accepted"))
                        }
                        Ok(Ok(()))
                            if SIZE_LIMITS.iter().any(|(k, max)| {
                                *k == full && m.as_integer().is_some_and(|i| i as u64 > *max || i < 1)
                            }) =>
                        {
                            problems.push(format!("{case}: a size outside its limit was accepted"))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    assert!(cases > 300, "only {cases} cases");
    assert!(problems.is_empty(), "{} of {cases} mutated configs misbehave:\n{}", problems.len(), problems.join("\n"));
}
