//! What a check found ([`Check`], [`Outcome`]) and how the checks are printed: aligned lines for people, or the
//! `--json` document for scripts (`{"ok":…,"checks":[{"name":…,"outcome":…,"detail":…,"fix":…}]}`).

use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// All good.
    Pass,
    /// Worth a look, but not wrong for every machine (a push-only machine need not substitute from the target);
    /// does not make `doctor` fail.
    Warn,
    /// Something is wrong; the check says how to fix it.
    Fail,
    /// Does not apply here, or cannot run because an earlier check failed.
    Skip,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name, e.g. `post-build-hook`.
    pub name: &'static str,
    /// How it came out.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about a failure or a warning.
    pub fix: Option<String>,
    /// The target it is about, when the configuration has several (`default` for `[target]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Check {
    fn new(name: &'static str, outcome: Outcome, detail: String, fix: Option<String>) -> Check {
        Check {
            name,
            outcome,
            detail,
            fix,
            target: None,
        }
    }

    pub(super) fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Outcome::Pass, detail.into(), None)
    }

    pub(super) fn warn(
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check::new(name, Outcome::Warn, detail.into(), Some(fix.into()))
    }

    pub(super) fn fail(
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check::new(name, Outcome::Fail, detail.into(), Some(fix.into()))
    }

    /// This check, about the target `name`.
    pub(super) fn about(self, name: &str) -> Check {
        Check {
            target: Some(name.to_owned()),
            ..self
        }
    }

    pub(super) fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check::new(name, Outcome::Skip, detail.into(), None)
    }
}

/// The JSON document `--json` prints.
#[derive(Debug, Serialize)]
pub(super) struct Verdict<'a> {
    pub(super) ok: bool,
    pub(super) checks: &'a [Check],
}

/// Whether `doctor` succeeds: no check failed (warnings and skips are fine).
pub(super) fn all_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.outcome != Outcome::Fail)
}

/// The checks as aligned lines, each failure or warning followed by its fix.
pub(super) fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let label = match check.outcome {
            Outcome::Pass => "pass",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        let name = match &check.target {
            Some(target) => format!("{} [{target}]", check.name),
            None => check.name.to_owned(),
        };
        out.push_str(&format!("{label}  {name:<20}{}\n", check.detail));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
    out.push_str(&format!(
        "\n{} passed, {} failed, {} skipped",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip)
    ));
    match count(Outcome::Warn) {
        0 => out.push('\n'),
        1 => out.push_str(", 1 warning\n"),
        n => out.push_str(&format!(", {n} warnings\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_fixes_under_failures_and_warnings() {
        let checks = [
            Check::pass("config", "ok"),
            Check::fail("post-build-hook", "wrong", "set it"),
            Check::warn("substituter", "not listed", "add it"),
            Check::skip("token-file", "none"),
        ];
        let text = render(&checks);
        assert!(
            text.contains("FAIL  post-build-hook     wrong\n      fix: set it\n"),
            "{text}"
        );
        assert!(
            text.contains("warn  substituter         not listed\n      fix: add it\n"),
            "{text}"
        );
        assert!(
            text.contains("1 passed, 1 failed, 1 skipped, 1 warning"),
            "{text}"
        );
        assert!(!all_ok(&checks));
        assert!(all_ok(&checks[2..]), "a warning alone does not fail");
    }
}
