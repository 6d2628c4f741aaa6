//! sudo on the test host: sudoers drop-ins for the test accounts.
//!
//! Requires root and sudo (package `sudo`, which installs `visudo`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SUDO: &str = "/usr/bin/sudo";
const VISUDO: &str = "/usr/sbin/visudo";
const DROP_IN_DIR: &str = "/etc/sudoers.d";

/// Panic with a clear message when sudo is not installed.
pub fn require_sudo() {
    for p in [SUDO, VISUDO] {
        if !Path::new(p).exists() {
            panic!("testbed: {p} is missing: install sudo (apt-get install -y sudo)");
        }
    }
}

/// A file in `/etc/sudoers.d`, mode 0440, checked by `visudo -cf` before it
/// is put in place; removed when dropped.
pub struct SudoersDropIn {
    path: PathBuf,
}

impl SudoersDropIn {
    /// Install `text` as `/etc/sudoers.d/certdeploy-test-<tag>` (`tag`:
    /// letters, digits, `-`, `_`: sudo skips names holding a `.`). The file
    /// is written under a name sudo skips, checked with `visudo -cf`, made
    /// 0440 and renamed into place, so sudo never reads a broken or
    /// half-written rule. Panics when visudo refuses it.
    pub fn install(tag: &str, text: &str) -> SudoersDropIn {
        require_sudo();
        assert!(
            !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "testbed: sudoers drop-in tag {tag:?}: letters, digits, - and _ only"
        );
        let path = Path::new(DROP_IN_DIR).join(format!("certdeploy-test-{tag}"));
        let temp = Path::new(DROP_IN_DIR).join(format!("certdeploy-test-{tag}.tmp"));
        let mut text = text.to_string();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        fs::write(&temp, &text).unwrap_or_else(|e| panic!("testbed: write {}: {e}", temp.display()));
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o440)).expect("chmod sudoers drop-in");
        let out = Command::new(VISUDO).arg("-cf").arg(&temp).stdin(Stdio::null()).output().expect("run visudo");
        if !out.status.success() {
            let _ = fs::remove_file(&temp);
            panic!(
                "testbed: visudo -cf refuses the sudoers drop-in:\n{text}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::rename(&temp, &path).unwrap_or_else(|e| panic!("testbed: rename to {}: {e}", path.display()));
        SudoersDropIn { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rule's text as installed.
    pub fn text(&self) -> String {
        fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for SudoersDropIn {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Run `argv` as `user` (`runuser -u USER --`), stdin from /dev/null:
/// (exit code, stdout and stderr together).
pub fn run_as(user: &str, argv: &[&str]) -> (i32, String) {
    let out = Command::new("runuser")
        .args(["-u", user, "--"])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("testbed: runuser: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}
