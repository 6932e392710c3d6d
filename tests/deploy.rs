//! The deployment files against Kubernetes and the binaries
//! (tests/clients/deploy_suite.py): the Helm chart renders and validates for
//! Kubernetes 1.30 with every values file, its structure holds, and every
//! flag and variable in the chart and the compose file is one the binaries
//! accept.

mod common;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn chart_and_compose_render_validate_and_use_real_flags() {
    let bins = common::bin("router").parent().unwrap().to_path_buf();
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/deploy_suite.py");
    let out = Command::new(common::python()).arg(&suite).arg(&bins).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    // Default values and every ci/*.yaml file were rendered.
    assert!(stdout.matches("objects rendered and checked").count() >= 4, "{stdout}");
}
