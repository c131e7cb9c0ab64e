//! Which paths of a closure a target takes, as pure logic: the `include`, `exclude` and `max_nar_size` filters,
//! and closure safety (a path whose reference is filtered out is held back unless a cache already has that
//! reference). The engine asks the target and the upstreams first and hands the answers in; nothing here does
//! I/O.
//!
//! ```toml
//! exclude = ["*-source"]              # every target
//! [target]
//! include = ["myproject-*"]           # only these…
//! exclude = ["*-debug", "*.drv"]      # …but never these
//! max_nar_size = "2GiB"
//! allow_incomplete_closures = false
//! ```
//!
//! # What a pattern is matched against
//!
//! A glob ([`globset`] syntax) is matched against the store path's **name**, the part after `<hash>-`
//! (`hello-2.12` in `/nix/store/<hash>-hello-2.12`): the hash is random, so a pattern over it would match paths
//! at random (`a*` would catch every path whose hash starts with `a`). Two kinds of pattern see the whole base
//! name `<hash>-<name>` instead, because that is how Nix users write them:
//! - a pattern starting with `*-`, as in `*-source`: the `*-` stands for the hash and its dash, so `*-source`
//!   also matches a path named just `source` (every flake input is). A hash has no `-`, so this can never
//!   match through the hash;
//! - a pattern starting with a 32-character hash and `-`: one exact path.
//!
//! # How the filters combine
//!
//! A path is excluded when it matches the top-level `exclude` or the target's `exclude` (exclusion wins over
//! `include`), when the target has `include` patterns and it matches none, or when its NAR is larger than
//! `max_nar_size`. An excluded path is never uploaded. A path that passes but references, directly or through
//! other references, an excluded path that neither the target nor an upstream has is **held back**: uploading
//! it would publish a narinfo whose references the cache lacks. With `allow_incomplete_closures = true` it is
//! uploaded anyway.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use crate::config::{self, Config, Target};
use crate::pathinfo::PathInfo;
use crate::store_path::StorePath;

use super::human_bytes;

/// One glob of an `include` or `exclude` list.
#[derive(Debug, Clone)]
struct Pattern {
    /// The key it came from: `exclude`, `target.exclude` or `target.include`.
    key: &'static str,
    /// As written.
    text: String,
    matcher: globset::GlobMatcher,
    /// Matched against `<hash>-<name>` rather than the name (see the module documentation).
    base_name: bool,
}

impl Pattern {
    fn new(key: &'static str, text: &str) -> Result<Pattern, config::Error> {
        let glob = globset::Glob::new(text).map_err(|e| config::Error::Invalid {
            field: key.to_owned(),
            problem: format!("has an invalid pattern {text:?}: {e}"),
        })?;
        Ok(Pattern {
            key,
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
            base_name: text.starts_with("*-") || starts_with_hash(text),
        })
    }

    fn matches(&self, path: &StorePath) -> bool {
        if self.base_name {
            self.matcher.is_match(path.base_name())
        } else {
            self.matcher.is_match(path.name())
        }
    }
}

/// Whether `text` begins with a store path's hash part and its dash.
fn starts_with_hash(text: &str) -> bool {
    text.len() > 32 && text.as_bytes()[32] == b'-' && crate::base32::is_valid_chars(&text[..32])
}

/// Why a path is not uploaded to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// It matches an `exclude` pattern.
    Pattern {
        /// `exclude` (every target) or `target.exclude`.
        key: &'static str,
        /// The pattern, as written.
        pattern: String,
    },
    /// The target has `include` patterns and it matches none.
    NotIncluded,
    /// Its NAR is larger than `max_nar_size`.
    TooLarge {
        /// Its NAR size in bytes.
        nar_size: u64,
        /// The limit in bytes.
        max: u64,
    },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Pattern { key, pattern } => write!(f, "matches {key} pattern {pattern:?}"),
            Exclusion::NotIncluded => write!(f, "matches no target.include pattern"),
            Exclusion::TooLarge { nar_size, max } => write!(
                f,
                "its NAR ({}) is larger than target.max_nar_size ({})",
                human_bytes(*nar_size),
                human_bytes(*max)
            ),
        }
    }
}

/// Why a path that passes the filters is held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBack {
    /// The reference that blocks it: excluded itself, or held back in turn.
    pub reference: StorePath,
    /// The excluded path at the end of that chain (the reference itself when it is excluded).
    pub excluded: StorePath,
    /// Why that path is excluded.
    pub exclusion: Exclusion,
}

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reference == self.excluded {
            write!(
                f,
                "reference {} is excluded ({}) and neither the target nor an upstream has it",
                self.reference, self.exclusion
            )
        } else {
            write!(
                f,
                "reference {} is held back: {} in its closure is excluded ({}) and neither the target nor an \
                 upstream has it",
                self.reference, self.excluded, self.exclusion
            )
        }
    }
}

/// What a target does with one member of a closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It passes: uploaded unless a cache already has it.
    Take,
    /// Filtered out.
    Excluded(Exclusion),
    /// Passes, but a reference is filtered out and no cache has it.
    HeldBack(HeldBack),
}

/// One target's filters, compiled.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    max_nar_size: Option<u64>,
    allow_incomplete_closures: bool,
}

impl Filter {
    /// The filters of `target`, with `config`'s top-level `exclude` for every target.
    pub fn new(config: &Config, target: &Target) -> Result<Filter, config::Error> {
        let mut exclude = Vec::new();
        for text in &config.exclude {
            exclude.push(Pattern::new("exclude", text)?);
        }
        for text in &target.exclude {
            exclude.push(Pattern::new("target.exclude", text)?);
        }
        let include = target
            .include
            .iter()
            .map(|text| Pattern::new("target.include", text))
            .collect::<Result<_, _>>()?;
        let max_nar_size = target.max_nar_size_bytes();
        Ok(Filter {
            include,
            exclude,
            max_nar_size,
            allow_incomplete_closures: target.allow_incomplete_closures,
        })
    }

    /// A filter that takes everything (`push --no-filter`).
    pub fn none() -> Filter {
        Filter::default()
    }

    /// Whether a path whose reference is filtered out is uploaded all the same.
    pub fn allows_incomplete_closures(&self) -> bool {
        self.allow_incomplete_closures
    }

    /// Why `path`, with a NAR of `nar_size` bytes, is filtered out; `None` when it passes.
    pub fn exclusion(&self, path: &StorePath, nar_size: u64) -> Option<Exclusion> {
        if let Some(p) = self.exclude.iter().find(|p| p.matches(path)) {
            return Some(Exclusion::Pattern {
                key: p.key,
                pattern: p.text.clone(),
            });
        }
        if !self.include.is_empty() && !self.include.iter().any(|p| p.matches(path)) {
            return Some(Exclusion::NotIncluded);
        }
        match self.max_nar_size {
            Some(max) if nar_size > max => Some(Exclusion::TooLarge { nar_size, max }),
            _ => None,
        }
    }

    /// [`Filter::exclusion`] of every member of `closure`, in order.
    pub fn exclusions(&self, closure: &[PathInfo]) -> Vec<Option<Exclusion>> {
        closure
            .iter()
            .map(|info| self.exclusion(&info.path, info.nar_size))
            .collect()
    }

    /// The excluded members of `closure` whose presence in a cache decides whether a referrer may be uploaded:
    /// those a member that passes references. None when incomplete closures are allowed.
    pub fn references_to_check<'a>(
        &self,
        closure: &'a [PathInfo],
        exclusions: &[Option<Exclusion>],
    ) -> HashSet<&'a StorePath> {
        if self.allow_incomplete_closures {
            return HashSet::new();
        }
        let excluded: HashSet<&StorePath> = closure
            .iter()
            .zip(exclusions)
            .filter(|(_, e)| e.is_some())
            .map(|(info, _)| &info.path)
            .collect();
        closure
            .iter()
            .zip(exclusions)
            .filter(|(_, e)| e.is_none())
            .flat_map(|(info, _)| info.references.iter().filter(move |r| **r != info.path))
            .filter_map(|r| excluded.get(r).copied())
            .collect()
    }

    /// Decides for every member of `closure` (any order), given each one's [`Filter::exclusions`] and whether
    /// the target or an upstream has it now (`available`). A path a cache has is never held back and holds
    /// nothing back; references outside `closure` (a push without closures) are not checked.
    pub fn decide(
        &self,
        closure: &[PathInfo],
        exclusions: &[Option<Exclusion>],
        available: impl Fn(&StorePath) -> bool,
    ) -> Vec<Decision> {
        let mut decisions: Vec<Decision> = exclusions
            .iter()
            .map(|e| match e {
                Some(e) => Decision::Excluded(e.clone()),
                None => Decision::Take,
            })
            .collect();
        if self.allow_incomplete_closures {
            return decisions;
        }
        let index: HashMap<&StorePath, usize> = closure
            .iter()
            .enumerate()
            .map(|(i, info)| (&info.path, i))
            .collect();
        let mut referrers: Vec<Vec<usize>> = vec![Vec::new(); closure.len()];
        for (i, info) in closure.iter().enumerate() {
            for r in info.references.iter().filter(|r| **r != info.path) {
                if let Some(&j) = index.get(r) {
                    referrers[j].push(i);
                }
            }
        }
        // From each excluded path no cache has, through referrers no cache has either, in closure order.
        let mut blocked: VecDeque<usize> = (0..closure.len())
            .filter(|&i| exclusions[i].is_some() && !available(&closure[i].path))
            .collect();
        while let Some(j) = blocked.pop_front() {
            let (excluded, exclusion) = match &decisions[j] {
                Decision::Excluded(e) => (closure[j].path.clone(), e.clone()),
                Decision::HeldBack(h) => (h.excluded.clone(), h.exclusion.clone()),
                Decision::Take => continue,
            };
            for &i in &referrers[j] {
                if decisions[i] == Decision::Take && !available(&closure[i].path) {
                    decisions[i] = Decision::HeldBack(HeldBack {
                        reference: closure[j].path.clone(),
                        excluded: excluded.clone(),
                        exclusion: exclusion.clone(),
                    });
                    blocked.push_back(i);
                }
            }
        }
        decisions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::byte_size::ByteSize;
    use crate::hash::Sha256Hash;

    const HASHES: [&str; 6] = [
        "ripzxnb3whas7h2iw572d3b0sby1nxxw",
        "a7hnr9dcmx3qkkn8a20g7md1wya5zc9l",
        "0c9ldhfd4b4jkzrk0v8a1m5hr2c1dn5b",
        "1x6nkz0ibs7m5vfjpmc6i36c0kaqnnqh",
        "8zkg9pbrmyc5y1v4dk2hd8rdjs1ynpd8",
        "9pa5ggmdmwbh3h7mgkkxi5hkbn0y0r5h",
    ];

    /// A closure member named `name` (hash chosen by `n`) with `references` (indices into `HASHES`).
    fn info(n: usize, name: &str, nar_size: u64, references: &[(usize, &str)]) -> PathInfo {
        let path = |n: usize, name: &str| {
            StorePath::parse(&format!("/nix/store/{}-{name}", HASHES[n]), "/nix/store").unwrap()
        };
        PathInfo {
            path: path(n, name),
            nar_hash: Sha256Hash::of(name.as_bytes()),
            nar_size,
            references: references.iter().map(|(m, r)| path(*m, r)).collect(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
            registration_time: 0,
            ultimate: false,
        }
    }

    fn filter(global: &[&str], target: &str) -> Filter {
        let config = Config {
            exclude: global.iter().map(|s| (*s).to_owned()).collect(),
            target: toml::from_str(target).unwrap(),
            ..Config::default()
        };
        Filter::new(&config, &config.target).unwrap()
    }

    fn decide_with(filter: &Filter, closure: &[PathInfo], available: &[usize]) -> Vec<Decision> {
        let exclusions = filter.exclusions(closure);
        let present: HashSet<&StorePath> = available.iter().map(|&i| &closure[i].path).collect();
        filter.decide(closure, &exclusions, |p| present.contains(p))
    }

    fn held_back_by(decision: &Decision) -> Option<(&str, &str)> {
        match decision {
            Decision::HeldBack(h) => Some((h.reference.name(), h.excluded.name())),
            _ => None,
        }
    }

    #[test]
    fn patterns_match_the_name_and_star_dash_patterns_the_base_name() {
        let f = filter(&["*-source", "hello-*"], "");
        let source = info(0, "source", 1, &[]);
        let foo_source = info(1, "foo-source", 1, &[]);
        let hello = info(2, "hello-2.12", 1, &[]);
        let other = info(3, "other", 1, &[]);
        for excluded in [&source, &foo_source, &hello] {
            assert!(
                f.exclusion(&excluded.path, 1).is_some(),
                "{}",
                excluded.path
            );
        }
        assert_eq!(f.exclusion(&other.path, 1), None);
        // A pattern over the name never matches through the hash: HASHES[0] starts with "r", HASHES[1] with "a".
        let f = filter(&["r*", "*a7h*"], "");
        assert_eq!(f.exclusion(&source.path, 1), None);
        assert_eq!(f.exclusion(&foo_source.path, 1), None);
        // A pattern starting with a hash names one path.
        let exact = format!("{}-source", HASHES[0]);
        let f = filter(&[&exact], "");
        assert!(f.exclusion(&source.path, 1).is_some());
        assert_eq!(f.exclusion(&info(1, "source", 1, &[]).path, 1), None);
    }

    #[test]
    fn exclusion_wins_over_include_and_names_its_rule() {
        let f = filter(
            &["*-doc"],
            "include = [\"app-*\"]\nexclude = [\"app-secret*\"]\n",
        );
        let reason = |name: &str| f.exclusion(&info(0, name, 1, &[]).path, 1);
        assert_eq!(reason("app-1.0"), None);
        assert_eq!(
            reason("app-secret-1"),
            Some(Exclusion::Pattern {
                key: "target.exclude",
                pattern: "app-secret*".into()
            })
        );
        assert_eq!(
            reason("app-doc"),
            Some(Exclusion::Pattern {
                key: "exclude",
                pattern: "*-doc".into()
            })
        );
        assert_eq!(reason("glibc-2.39"), Some(Exclusion::NotIncluded));
        assert_eq!(
            reason("app-secret-1").unwrap().to_string(),
            "matches target.exclude pattern \"app-secret*\""
        );
        assert_eq!(
            Exclusion::NotIncluded.to_string(),
            "matches no target.include pattern"
        );
    }

    #[test]
    fn max_nar_size_excludes_larger_nars_only() {
        let f = filter(&[], "max_nar_size = \"1KiB\"\n");
        let path = info(0, "big", 0, &[]).path;
        assert_eq!(f.exclusion(&path, 1024), None);
        let too_large = f.exclusion(&path, 1025).unwrap();
        assert_eq!(
            too_large,
            Exclusion::TooLarge {
                nar_size: 1025,
                max: 1024
            }
        );
        assert!(
            too_large
                .to_string()
                .contains("larger than target.max_nar_size (1.0 KiB)"),
            "{too_large}"
        );
        let target = Target {
            max_nar_size: Some(ByteSize(10)),
            ..Target::default()
        };
        assert!(Filter::new(&Config::default(), &target).is_ok());
    }

    #[test]
    fn a_chain_is_held_back_from_the_excluded_reference_up() {
        // top → mid → secret (excluded), in any order.
        let f = filter(&["*-secret"], "");
        let mut closure = vec![
            info(0, "secret", 1, &[]),
            info(1, "mid", 1, &[(0, "secret")]),
            info(2, "top", 1, &[(1, "mid")]),
            info(3, "lone", 1, &[]),
        ];
        let d = decide_with(&f, &closure, &[]);
        assert!(matches!(d[0], Decision::Excluded(_)));
        assert_eq!(held_back_by(&d[1]), Some(("secret", "secret")));
        assert_eq!(held_back_by(&d[2]), Some(("mid", "secret")));
        assert_eq!(d[3], Decision::Take);
        let Decision::HeldBack(h) = &d[1] else {
            unreachable!()
        };
        assert_eq!(
            h.to_string(),
            format!(
                "reference /nix/store/{}-secret is excluded (matches exclude pattern \"*-secret\") and neither \
                 the target nor an upstream has it",
                HASHES[0]
            )
        );
        let Decision::HeldBack(h) = &d[2] else {
            unreachable!()
        };
        assert!(h.to_string().starts_with(&format!(
            "reference /nix/store/{}-mid is held back: /nix/store/{}-secret in its closure is excluded",
            HASHES[1], HASHES[0]
        )));
        closure.reverse();
        let reversed = decide_with(&f, &closure, &[]);
        assert_eq!(held_back_by(&reversed[1]), Some(("mid", "secret")));
        assert_eq!(held_back_by(&reversed[2]), Some(("secret", "secret")));
    }

    #[test]
    fn a_reference_a_cache_has_makes_its_referrer_ok() {
        let f = filter(&["*-secret"], "");
        let closure = vec![
            info(0, "secret", 1, &[]),
            info(1, "mid", 1, &[(0, "secret")]),
            info(2, "top", 1, &[(1, "mid")]),
        ];
        // The excluded path is upstream (or already in the target): nothing is held back.
        let d = decide_with(&f, &closure, &[0]);
        assert!(matches!(d[0], Decision::Excluded(_)));
        assert_eq!(&d[1..], &[Decision::Take, Decision::Take]);
        // The middle is in the target already: it is not held back, and it holds nothing back.
        let d = decide_with(&f, &closure, &[1]);
        assert_eq!(&d[1..], &[Decision::Take, Decision::Take]);
    }

    #[test]
    fn a_diamond_is_held_back_through_either_side() {
        // top → left → secret, top → right → base; left is held back, and so is top; right and base are not.
        let f = filter(&["*-secret"], "");
        let closure = vec![
            info(0, "secret", 1, &[]),
            info(1, "base", 1, &[]),
            info(2, "left", 1, &[(0, "secret")]),
            info(3, "right", 1, &[(1, "base")]),
            info(4, "top", 1, &[(2, "left"), (3, "right"), (4, "top")]),
        ];
        let d = decide_with(&f, &closure, &[]);
        assert_eq!(d[1], Decision::Take);
        assert_eq!(held_back_by(&d[2]), Some(("secret", "secret")));
        assert_eq!(d[3], Decision::Take);
        assert_eq!(held_back_by(&d[4]), Some(("left", "secret")));
        // Both sides excluded: still held back once, naming one of them.
        let f = filter(&["*-secret", "base"], "");
        let d = decide_with(&f, &closure, &[]);
        assert!(held_back_by(&d[3]).is_some());
        assert!(held_back_by(&d[4]).is_some());
    }

    #[test]
    fn allow_incomplete_closures_takes_every_path_that_passes() {
        let f = filter(&["*-secret"], "allow_incomplete_closures = true\n");
        let closure = vec![
            info(0, "secret", 1, &[]),
            info(1, "top", 1, &[(0, "secret")]),
        ];
        let exclusions = f.exclusions(&closure);
        assert!(f.references_to_check(&closure, &exclusions).is_empty());
        let d = decide_with(&f, &closure, &[]);
        assert!(matches!(d[0], Decision::Excluded(_)));
        assert_eq!(d[1], Decision::Take);
    }

    #[test]
    fn only_excluded_references_of_passing_paths_are_asked_about() {
        // secret is referenced by top (passes); deep only by secret (excluded), so its presence cannot matter.
        let f = filter(&["*-secret", "deep"], "");
        let closure = vec![
            info(0, "deep", 1, &[]),
            info(1, "secret", 1, &[(0, "deep")]),
            info(2, "top", 1, &[(1, "secret")]),
            info(3, "self-ref-secret", 1, &[(3, "self-ref-secret")]),
        ];
        let exclusions = f.exclusions(&closure);
        let asked = f.references_to_check(&closure, &exclusions);
        assert_eq!(asked, HashSet::from([&closure[1].path]));
    }

    #[test]
    fn include_and_size_hold_back_like_exclude() {
        let f = filter(&[], "include = [\"app*\"]\nmax_nar_size = 100\n");
        let closure = vec![
            info(0, "glibc", 10, &[]),
            info(1, "app-data", 1000, &[]),
            info(2, "app", 10, &[(0, "glibc"), (1, "app-data")]),
        ];
        let d = decide_with(&f, &closure, &[]);
        assert_eq!(d[0], Decision::Excluded(Exclusion::NotIncluded));
        assert!(matches!(
            d[1],
            Decision::Excluded(Exclusion::TooLarge { .. })
        ));
        assert!(held_back_by(&d[2]).is_some());
        // glibc upstream, app-data still missing: still held back, by app-data.
        let d = decide_with(&f, &closure, &[0]);
        assert_eq!(held_back_by(&d[2]), Some(("app-data", "app-data")));
        let d = decide_with(&f, &closure, &[0, 1]);
        assert_eq!(d[2], Decision::Take);
    }
}
