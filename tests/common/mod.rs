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
