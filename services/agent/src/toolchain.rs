//! The toolchains a task can use: their default build and test steps, what the model is
//! told about them, and the guess ANALYZE makes when the request names none.

use crate::task::StepSpec;

/// A toolchain the agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Toolchain {
    pub name: &'static str,
    /// What the model is told about the project's shape.
    pub conventions: &'static str,
    default_steps: &'static [&'static [&'static str]],
    /// File extensions (and names) that point to this toolchain.
    markers: &'static [&'static str],
    /// Words in a prompt that point to it.
    words: &'static [&'static str],
}

impl Toolchain {
    pub fn default_steps(&self) -> Vec<StepSpec> {
        self.default_steps
            .iter()
            .map(|argv| StepSpec::new(argv))
            .collect()
    }
}

/// Every toolchain, the default (python) first.
pub const TOOLCHAINS: &[Toolchain] = &[
    Toolchain {
        name: "python",
        conventions: "Python 3.11, standard library only (no pip installs). Put tests in \
                      files named test_*.py using unittest; a test file imports what it \
                      tests (`from calc import add`); tests are run with \
                      `python3 -m unittest discover -v` from the workspace root.",
        default_steps: &[&["python3", "-m", "unittest", "discover", "-v"]],
        markers: &[".py", "requirements.txt", "pyproject.toml"],
        words: &["python", "pytest", "unittest", "django", "flask"],
    },
    Toolchain {
        name: "c",
        conventions: "C11 with the standard library, built by `make` and tested by \
                      `make test`: write a Makefile whose default target builds \
                      everything with `cc -std=c11 -Wall -Wextra` and whose `test` target \
                      builds and runs the tests (recipe lines start with a TAB).",
        default_steps: &[&["make"], &["make", "test"]],
        markers: &[".c", ".h", "Makefile"],
        words: &[" c ", "c program", "in c", "c11", "c99", "gcc", "clang"],
    },
    Toolchain {
        name: "rust",
        conventions: "Rust 2021 with no external crates (the build is offline): write \
                      Cargo.toml and src/; tests are #[test] functions, run with \
                      `cargo test --offline`.",
        default_steps: &[&["cargo", "test", "--offline"]],
        markers: &[".rs", "Cargo.toml"],
        words: &["rust", "cargo", "crate"],
    },
    Toolchain {
        name: "node",
        conventions: "Node.js 20 with no npm packages: CommonJS modules; tests in files \
                      named *.test.js using `node:test` and `node:assert`, run with \
                      `node --test`.",
        default_steps: &[&["node", "--test"]],
        markers: &[".js", ".mjs", ".cjs", "package.json"],
        words: &["node", "javascript", "js "],
    },
    Toolchain {
        name: "go",
        conventions: "Go with the standard library only: write go.mod; tests in *_test.go, \
                      run with `go vet ./...` and `go test ./...`.",
        default_steps: &[&["go", "vet", "./..."], &["go", "test", "./..."]],
        markers: &[".go", "go.mod"],
        words: &["golang", " go "],
    },
];

pub fn find(name: &str) -> Option<&'static Toolchain> {
    TOOLCHAINS.iter().find(|t| t.name == name)
}

pub fn names() -> Vec<&'static str> {
    TOOLCHAINS.iter().map(|t| t.name).collect()
}

/// ANALYZE's guess: the toolchain most of the workspace's files point to, else the
/// first one the prompt mentions, else python.
pub fn guess(prompt: &str, paths: &[String]) -> &'static Toolchain {
    let mut best: Option<(&'static Toolchain, usize)> = None;
    for t in TOOLCHAINS {
        let n = paths
            .iter()
            .filter(|p| t.markers.iter().any(|m| p.ends_with(m)))
            .count();
        if n > 0 && best.is_none_or(|(_, b)| n > b) {
            best = Some((t, n));
        }
    }
    if let Some((t, _)) = best {
        return t;
    }
    let text = format!(" {} ", prompt.to_lowercase());
    TOOLCHAINS
        .iter()
        .filter_map(|t| {
            t.words
                .iter()
                .filter_map(|w| text.find(w))
                .min()
                .map(|at| (t, at))
        })
        .min_by_key(|(_, at)| *at)
        .map_or(&TOOLCHAINS[0], |(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_decide_before_words() {
        let paths = vec!["Cargo.toml".to_owned(), "src/lib.rs".to_owned()];
        assert_eq!(guess("a python-like parser", &paths).name, "rust");
    }

    #[test]
    fn the_first_named_language_wins() {
        assert_eq!(
            guess("Write a Rust port of this python script", &[]).name,
            "rust"
        );
        assert_eq!(guess("a C program that counts words", &[]).name, "c");
        assert_eq!(guess("a JavaScript function", &[]).name, "node");
        assert_eq!(guess("fizzbuzz", &[]).name, "python");
    }
}
