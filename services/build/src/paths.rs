//! Workspace-relative paths: the contract's rules, and resolving them on disk without
//! ever following a symbolic link.
//!
//! Resolution is fd-relative ([`crate::beneath`]): from the workspace root's descriptor,
//! each parent is opened `O_NOFOLLOW | O_DIRECTORY` relative to the previous one, and
//! the caller gets the last parent's descriptor and the final name. Checking by path
//! (`lstat` each component, then open the string) would be a race: reads run without
//! the workspace lock while a build — attacker code — runs, and the build can swap a
//! directory for a symlink between the check and the open.

use std::io;
use std::sync::Arc;

use kiln_rpc::{ApiError, FieldViolation};
use rustix::io::Errno;

use crate::beneath::{self, Dir, Kind};

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

/// `rel` resolved to the directory holding its last component.
#[derive(Debug)]
pub struct Resolved {
    /// The last parent, opened without following a symlink.
    pub parent: Arc<Dir>,
    /// The last component (not inspected: callers decide what may be there).
    pub name: String,
    /// The directories created on the way (parent, name), outermost first.
    pub created: Vec<(Arc<Dir>, String)>,
}

/// Resolves `rel` (not the root) under `root`, refusing symbolic links and
/// non-directories among the parents.
pub fn resolve(
    root: &Arc<Dir>,
    rel: &RelPath,
    field: &str,
    parents: Parents,
) -> Result<Resolved, BuildError> {
    let components: Vec<&str> = rel.components().collect();
    let Some((last, dirs)) = components.split_last() else {
        return Err(invalid_path(
            field,
            "must name an entry, not the workspace root",
        ));
    };
    let mut dir = Arc::clone(root);
    let mut created = Vec::new();
    for name in dirs {
        let next = match dir.dir(name) {
            Ok(d) => d,
            Err(e) if beneath::is(&e, Errno::NOENT) => match parents {
                Parents::Existing => {
                    return Err(ApiError::not_found("path", rel.as_str()).into());
                }
                Parents::Create => {
                    match dir.mkdir(name, 0o755) {
                        Ok(()) => created.push((Arc::clone(&dir), (*name).to_owned())),
                        // Created meanwhile: opening it below says what it is.
                        Err(e) if beneath::is(&e, Errno::EXIST) => {}
                        Err(e) => return Err(BuildError::io("creating a directory", e)),
                    }
                    dir.dir(name)
                        .map_err(|e| not_a_directory(&dir, name, field, e))?
                }
            },
            Err(e) => return Err(not_a_directory(&dir, name, field, e)),
        };
        dir = Arc::new(next);
    }
    Ok(Resolved {
        parent: dir,
        name: (*last).to_owned(),
        created,
    })
}

/// Why opening the parent `name` of a path failed.
fn not_a_directory(dir: &Dir, name: &str, field: &str, e: io::Error) -> BuildError {
    if !(beneath::is(&e, Errno::NOTDIR) || beneath::is(&e, Errno::LOOP)) {
        return BuildError::io("inspecting a workspace path", e);
    }
    // Only the message depends on this second look; the refusal does not.
    match dir.stat(name) {
        Ok(m) if m.kind == Kind::Symlink => invalid_path(field, "goes through a symbolic link"),
        _ => invalid_path(field, "goes through a file that is not a directory"),
    }
}

/// Why [`open_dir`] found no directory at the path itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDir {
    Missing,
    /// A file, a symlink or anything else.
    NotADirectory,
}

/// Opens the directory `rel` (the root when empty) under `root`, refusing symbolic links
/// anywhere including at the end. The outer error is about the parents (as in
/// [`resolve`]), the inner one about the last component.
pub fn open_dir(
    root: &Arc<Dir>,
    rel: &RelPath,
    field: &str,
) -> Result<Result<Arc<Dir>, NoDir>, BuildError> {
    if rel.is_root() {
        return Ok(Ok(Arc::clone(root)));
    }
    let r = resolve(root, rel, field, Parents::Existing)?;
    match r.parent.dir(&r.name) {
        Ok(d) => Ok(Ok(Arc::new(d))),
        Err(e) if beneath::is(&e, Errno::NOENT) => Ok(Err(NoDir::Missing)),
        Err(e) if beneath::is(&e, Errno::NOTDIR) || beneath::is(&e, Errno::LOOP) => {
            Ok(Err(NoDir::NotADirectory))
        }
        Err(e) => Err(BuildError::io("opening a workspace directory", e)),
    }
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
