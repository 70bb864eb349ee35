//! Helpers shared by the integration tests.

use std::io::Write;

/// A test needs a tool this machine lacks (a GPU adapter, dcmtk, dicom3tools, pyigtl). In CI
/// (`CI=true`, where `.ci/run` installs them all) that is a failure. Elsewhere the test is
/// skipped with a line written straight to the process's stderr, past the test harness's
/// output capture, so that the skip is seen even when the test "passes".
pub fn missing_tool(test: &str, what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: CI must have {what} (.ci/run installs it)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: {what} is missing on this machine; the test did not run ***"
    );
}

/// The path of `name` on PATH; when absent, [`missing_tool`] for `test` (a failure in CI).
#[allow(dead_code)]
pub fn find_tool(test: &str, name: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing_tool(test, &format!("{name} ({package})"));
    }
    found
}

/// Whether `python3` can import every one of `modules`; when not, [`missing_tool`] for `test`
/// (a failure in CI).
#[allow(dead_code)]
pub fn python_has(test: &str, modules: &[&str]) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing_tool(test, &format!("python3 with {} (PyPI)", modules.join(", ")));
    }
    ok
}
