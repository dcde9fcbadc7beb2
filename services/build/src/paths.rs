//! Workspace-relative paths: the contract's rules, and resolving them on disk without
//! ever following a symbolic link.
//!
//! Resolution walks the parents one component at a time with `lstat` and refuses a
//! symlink anywhere on the way. That is race-free here because nothing else changes a
//! workspace while the API does: API changes hold the workspace's lock, and builds (the
//! only other writers, which may leave symlinks behind) never run at the same time.

use std::io;
use std::path::{Path, PathBuf};

use kiln_rpc::{ApiError, FieldViolation};

use crate::config::WorkspaceLimits;
use crate::error::{BuildError, invalid, reason, violation};

/// A checked relative path: `/`-separated normal components, no `.`/`..`, no NUL.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

impl RelPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path under `root` (no symlink check; see [`resolve`]).
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.0.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&self.0)
        }
    }

    /// `self/child`.
    pub fn join(&self, child: &str) -> RelPath {
        if self.0.is_empty() {
            RelPath(child.to_owned())
        } else {
            RelPath(format!("{}/{child}", self.0))
        }
    }
}

/// Checks `raw` against the path rules. `allow_root` accepts the empty string (meaning
/// the workspace root), for directory fields.
pub fn check(
    field: &str,
    raw: &str,
    limits: &WorkspaceLimits,
    allow_root: bool,
) -> Result<RelPath, FieldViolation> {
    let bad = |why: &str| violation(field, why);
    if raw.is_empty() {
        return if allow_root {
            Ok(RelPath(String::new()))
        } else {
            Err(bad("must not be empty"))
        };
    }
    if raw.contains('\0') {
        return Err(bad("must not contain a NUL byte"));
    }
    if raw.starts_with('/') {
        return Err(bad("must be relative to the workspace root, not absolute"));
    }
    if raw.len() > limits.max_path_bytes {
        return Err(bad(&format!(
            "is longer than {} bytes",
            limits.max_path_bytes
        )));
    }
    for component in raw.split('/') {
        match component {
            "" => {
                return Err(bad(
                    "must not contain an empty component (`//` or a trailing `/`)",
                ));
            }
            "." | ".." => return Err(bad("must not contain `.` or `..` components")),
            c if c.len() > limits.max_component_bytes => {
                return Err(bad(&format!(
                    "has a component longer than {} bytes",
                    limits.max_component_bytes
                )));
            }
            _ => {}
        }
    }
    Ok(RelPath(raw.to_owned()))
}

/// Checks a list of paths, refusing duplicates; collects every violation.
pub fn check_all<'a>(
    field: impl Fn(usize) -> String,
    raws: impl Iterator<Item = &'a str>,
    limits: &WorkspaceLimits,
    violations: &mut Vec<FieldViolation>,
) -> Vec<RelPath> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, raw) in raws.enumerate() {
        match check(&field(i), raw, limits, false) {
            Ok(p) if !seen.insert(p.clone()) => {
                violations.push(violation(field(i), "duplicate path in this request"));
            }
            Ok(p) => out.push(p),
            Err(v) => violations.push(v),
        }
    }
    out
}

/// An INVALID_PATH answer for one field.
pub fn invalid_path(field: &str, why: &str) -> BuildError {
    invalid(reason::INVALID_PATH, vec![violation(field, why)]).into()
}

/// What [`resolve`] does with missing parent directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parents {
    /// They must exist.
    Existing,
    /// Create them (mode 0755); the created ones are returned, outermost first.
    Create,
}

/// Resolves `rel` under `root`, refusing symbolic links and non-directories among the
/// parents. Returns the full path and the directories it created. The last component is
/// not inspected (callers decide what may be there).
pub fn resolve(
    root: &Path,
    rel: &RelPath,
    field: &str,
    parents: Parents,
) -> Result<(PathBuf, Vec<PathBuf>), BuildError> {
    let components: Vec<&str> = rel.components().collect();
    let mut path = root.to_path_buf();
    let mut created = Vec::new();
    let Some((_, dirs)) = components.split_last() else {
        return Ok((path, created));
    };
    for dir in dirs {
        path.push(dir);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(invalid_path(field, "goes through a symbolic link"));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(invalid_path(
                    field,
                    "goes through a file that is not a directory",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match parents {
                Parents::Existing => {
                    return Err(ApiError::not_found("path", rel.as_str()).into());
                }
                Parents::Create => {
                    std::fs::create_dir(&path)
                        .map_err(|e| BuildError::io("creating a directory", e))?;
                    created.push(path.clone());
                }
            },
            Err(e) => return Err(BuildError::io("inspecting a workspace path", e)),
        }
    }
    path.push(components[components.len() - 1]);
    Ok((path, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        let l = WorkspaceLimits::default();
        let ok = |s: &str| check("p", s, &l, false).is_ok();
        assert!(ok("a"));
        assert!(ok("src/main.rs"));
        assert!(ok(".hidden/x"));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(!ok(bad), "{bad:?}");
        }
        assert!(!ok(&"a".repeat(256)));
        assert!(!ok(&"a/".repeat(600)));
        assert!(check("p", "", &l, true).expect("root").is_root());
    }
}
