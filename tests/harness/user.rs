//! The unprivileged user the tests run hooks and commands as, to see what nixpush allows a non-root user.

use std::process::Command;

use super::process::Run;

/// Its name; a system user without a home or a login shell.
pub const TEST_USER: &str = "nixpush-test";

/// The uid and gid of [`TEST_USER`], created if missing.
pub fn test_user() -> (u32, u32) {
    let id = |flag: &str| Command::new("id").args([flag, TEST_USER]).run();
    if !id("-u").status.success() {
        let output = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .run();
        // Another test may have created it meanwhile.
        assert!(
            output.status.success() || id("-u").status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let number = |flag: &str| {
        String::from_utf8(id(flag).stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (number("-u"), number("-g"))
}
