//! stord's strict configuration: every bad file is refused at start with an error
//! naming the file, the key and what was expected, and nothing is created.

use std::process::Command;

use integration_tests::{bin, run_failing};

/// Starts stord on the config `text` (`@STATE@` and `@CONTROL@` filled in with paths
/// in a fresh directory), which must refuse it (exit status 1); returns its stderr
/// and the directory.
fn refuse(text: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let text = text
        .replace("@STATE@", &state.display().to_string())
        .replace(
            "@CONTROL@",
            &dir.path().join("c.sock").display().to_string(),
        );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let err = run_failing(
        Command::new(bin("stord"))
            .args(["serve", "--config"])
            .arg(&path),
        1,
    );
    (err, dir)
}

fn assert_refused(text: &str, key: &str, expected: &str) {
    let (err, dir) = refuse(text);
    assert!(
        err.contains("bad.toml"),
        "error does not name the file: {err}"
    );
    assert!(
        err.contains(key),
        "error does not name the key {key}: {err}"
    );
    assert!(
        err.contains(expected),
        "error does not say {expected:?}: {err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "a refused config created state"
    );
}

#[test]
fn unknown_keys_are_errors() {
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\nlisten_port = 10809\n",
        "listen_port",
        "unknown field",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\n[[disk]]\nname = \"a\"\nsize = 1024\nalloc = \"fixed\"\nthin = true\n",
        "thin",
        "unknown field",
    );
}

#[test]
fn bad_values_name_key_and_expectation() {
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\nlisten = \"localhost\"\n",
        "listen",
        "expected an address",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\n[[disk]]\nname = \"a\"\nsize = \"ten gigs\"\nalloc = \"fixed\"\n",
        "size",
        "64MiB",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\n[[disk]]\nname = \"a\"\nsize = 1024\nalloc = \"thick\"\n",
        "alloc",
        "fixed",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\n[[disk]]\nname = \"a\"\nsize = 0\nalloc = \"fixed\"\n",
        "disk[0].size",
        "expected a size",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\n[[disk]]\nname = \"a\"\nsize = 1\nalloc = \"fixed\"\n[[disk]]\nname = \"a\"\nsize = 1\nalloc = \"fixed\"\n",
        "disk[1].name",
        "repeated",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\n[[disk]]\nname = \"a/b\"\nsize = 1\nalloc = \"fixed\"\n",
        "disk[0].name",
        "expected a name",
    );
    assert_refused("state_dir = \"@STATE@\"\n", "control", "missing field");
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\nmax_connections = 0\n",
        "max_connections",
        "expected a number",
    );
    assert_refused(
        "control = \"@CONTROL@\"\nstate_dir = \"@STATE@\"\nbusy_poll_us = 5000\n",
        "busy_poll_us",
        "expected a number of microseconds",
    );
}

#[test]
fn missing_file_is_named() {
    let err = run_failing(
        Command::new(bin("stord")).args(["serve", "--config", "/nonexistent/stord.toml"]),
        1,
    );
    assert!(
        err.contains("/nonexistent/stord.toml") && err.contains("No such file"),
        "{err}"
    );
}
