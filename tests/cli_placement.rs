//! `expertmesh placement`: the planner through the CLI on load files: valid
//! plans, migration-aware re-plans, clean errors.

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;

fn placement(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_expertmesh")).arg("placement").args(args).output().unwrap()
}

fn write(name: &str, v: &Value) -> PathBuf {
    let p = std::env::temp_dir().join(format!("em-placement-{}-{name}.json", std::process::id()));
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

/// 3 layers × 16 experts, Zipf-like (1/rank) with a different hot expert per layer.
fn loads(scale: impl Fn(usize, usize) -> f64) -> Value {
    json!(
        (0..3)
            .map(|l| (0..16)
                .map(|e| (1600.0 / (1 + (e + 5 * l) % 16) as f64 * scale(l, e)).round())
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    )
}

fn plan_json(args: &[&str]) -> Value {
    let out = placement(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn plans_are_valid_and_replans_move_few() {
    let base = write("base", &loads(|_, _| 1.0));
    let p = base.to_str().unwrap();
    let args = ["--loads", p, "--nodes", "4", "--slots-per-node", "10", "--min-replicas", "2", "--json"];
    let first = plan_json(&args);
    assert!(first["compute_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["balancedness"].as_f64().unwrap() > 0.9, "{}", first["balancedness"]);
    let layers = first["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for layer in layers {
        let mut per_node = [0usize; 4];
        for holders in layer.as_array().unwrap() {
            let mut h: Vec<u64> = holders.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
            assert!(h.len() >= 2, "every expert on at least 2 nodes: {h:?}");
            h.sort();
            h.dedup();
            assert_eq!(h.len(), holders.as_array().unwrap().len(), "replicas on distinct nodes");
            for n in h {
                per_node[n as usize] += 1;
            }
        }
        assert_eq!(per_node, [10; 4], "every slot used, none over");
    }

    let prev = write("prev", &first);
    let prev = prev.to_str().unwrap();
    let same = plan_json(&[&args[..], &["--previous", prev]].concat());
    assert_eq!(same["moved"], 0, "unchanged loads move nothing");
    assert_eq!(same["layers"], first["layers"]);

    let drifted = write("drift", &loads(|l, e| if (l + e) % 3 == 0 { 1.25 } else { 0.8 }));
    let d = drifted.to_str().unwrap();
    let dargs = ["--loads", d, "--nodes", "4", "--slots-per-node", "10", "--min-replicas", "2", "--json"];
    let sticky = plan_json(&[&dargs[..], &["--previous", prev]].concat());
    let scratch = plan_json(&dargs);
    assert!(scratch["moved"].as_u64().unwrap() == 120, "without --previous every replica counts as moved");
    assert!(sticky["moved"].as_u64().unwrap() * 4 <= 120, "re-plan moved {}", sticky["moved"]);
    for f in [base, drifted, PathBuf::from(prev)] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn bad_input_is_a_clean_error() {
    let out = placement(&["--loads", "/nonexistent.json", "--nodes", "2", "--slots-per-node", "4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--loads"));
    let f = write("small", &json!([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]));
    let out = placement(&["--loads", f.to_str().unwrap(), "--nodes", "2", "--slots-per-node", "4"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("insufficient capacity") && err.contains("10 experts"), "{err}");
    let _ = std::fs::remove_file(f);
}
