//! The Debian package (issue 17): `scripts/deb-test.sh` builds it from the release
//! binaries with cargo-deb, installs it with dpkg -i, verifies the installed units
//! with systemd-analyze, starts the installed stord (as the stord user) and netd
//! with the installed example configs, checks they serve (nbdinfo, `netd net
//! list`), and purges it.

use integration_tests::{require_root, workspace_root};

#[test]
fn package_installs_serves_and_purges() {
    require_root();
    let out = std::process::Command::new(workspace_root().join("scripts/deb-test.sh"))
        .output()
        .expect("run scripts/deb-test.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("PASS"), "{text}");
}
