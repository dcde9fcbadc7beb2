//! Programs that run another program named in their arguments (`env sh -c …`,
//! `find . -exec sh …`, `nice`, `timeout`, `xargs` …): StartBuild checks the wrapped
//! program against the allowlist too, so listing `nice` does not quietly allow a shell.
//!
//! This keeps the allowlist honest as a *policy*; it is not a security boundary (the
//! sandbox is). Interpreters and build tools on the list (`make`, `python3`, `node`,
//! `cargo` through build scripts, `sed`'s `e` command, `tar --to-command`) run anything
//! by design, and an option spelling this parser does not know may hide a program.

/// A program a step's argv would run besides argv[0], or a form that cannot be checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wrapped<'a> {
    /// `argv[index]` names a program that runs.
    Program { index: usize, name: &'a str },
    /// A form whose programs cannot be told from the words (`env -S "sh -c id"`).
    Unchecked { index: usize, why: &'static str },
}

/// Options of each wrapper that take their value as the next word.
fn option_takes_value(wrapper: &str, option: &str) -> bool {
    let list: &[&str] = match wrapper {
        "env" => &["-u", "--unset", "-C", "--chdir"],
        "nice" => &["-n", "--adjustment"],
        "timeout" => &["-k", "--kill-after", "-s", "--signal"],
        "stdbuf" => &["-i", "-o", "-e", "--input", "--output", "--error"],
        "ionice" => &["-c", "--class", "-n", "--classdata", "-p", "--pid"],
        "xargs" => &[
            "-a",
            "--arg-file",
            "-d",
            "--delimiter",
            "-E",
            "-I",
            "-L",
            "-n",
            "--max-args",
            "-P",
            "--max-procs",
            "-s",
            "--max-chars",
            "--process-slot-var",
        ],
        _ => &[],
    };
    list.contains(&option)
}

/// Every program `argv` runs besides `argv[0]`, recursively (`nice env sh` names `env`
/// and `sh`).
pub(crate) fn wrapped(argv: &[String]) -> Vec<Wrapped<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(program) = argv.get(start) {
        let program = program.as_str();
        if program == "find" {
            find_actions(argv, start, &mut out);
            return out;
        }
        if ![
            "env", "nice", "nohup", "timeout", "stdbuf", "setsid", "ionice", "xargs",
        ]
        .contains(&program)
        {
            return out;
        }
        let mut i = start + 1;
        // timeout's first operand is its duration, not a program.
        let mut skip_operands = usize::from(program == "timeout");
        while let Some(arg) = argv.get(i).map(String::as_str) {
            if arg == "--" {
                i += 1;
                break;
            }
            if program == "env" && (arg.starts_with("-S") || arg.starts_with("--split-string")) {
                out.push(Wrapped::Unchecked {
                    index: i,
                    why: "env -S splits a command line of its own",
                });
                return out;
            }
            if arg.starts_with('-') && arg.len() > 1 {
                i += if option_takes_value(program, arg) {
                    2
                } else {
                    1
                };
            } else if program == "env" && arg.contains('=') {
                i += 1; // NAME=VALUE
            } else if skip_operands > 0 {
                skip_operands -= 1;
                i += 1;
            } else {
                break;
            }
        }
        match argv.get(i) {
            Some(name) => {
                out.push(Wrapped::Program { index: i, name });
                start = i;
            }
            None => return out,
        }
    }
    out
}

/// `find`'s actions that run a program: the word after each names it.
fn find_actions<'a>(argv: &'a [String], start: usize, out: &mut Vec<Wrapped<'a>>) {
    let mut words = argv.iter().enumerate().skip(start + 1);
    while let Some((_, arg)) = words.next() {
        if ["-exec", "-execdir", "-ok", "-okdir"].contains(&arg.as_str())
            && let Some((index, name)) = words.next()
        {
            out.push(Wrapped::Program { index, name });
            // The wrapped program's own arguments may wrap again (`-exec env sh`).
            let end = argv[index..]
                .iter()
                .position(|w| w == ";" || w == "+")
                .map_or(argv.len(), |p| index + p);
            out.extend(wrapped(&argv[index..end]).into_iter().map(|w| match w {
                Wrapped::Program { index: j, name } => Wrapped::Program {
                    index: index + j,
                    name,
                },
                Wrapped::Unchecked { index: j, why } => Wrapped::Unchecked {
                    index: index + j,
                    why,
                },
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(words: &[&str]) -> Vec<String> {
        let argv: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
        wrapped(&argv)
            .into_iter()
            .map(|w| match w {
                Wrapped::Program { index, name } => format!("{index}:{name}"),
                Wrapped::Unchecked { index, .. } => format!("{index}:?"),
            })
            .collect()
    }

    #[test]
    fn wrapped_programs_are_found() {
        assert_eq!(names(&["env", "sh", "-c", "id"]), ["1:sh"]);
        assert_eq!(
            names(&["env", "-i", "A=1", "-u", "B", "--", "sh"]),
            ["6:sh"]
        );
        assert_eq!(names(&["env", "-S", "sh -c id"]), ["1:?"]);
        assert_eq!(names(&["env"]), Vec::<String>::new());
        assert_eq!(
            names(&["nice", "-n", "5", "env", "bash"]),
            ["3:env", "4:bash"]
        );
        assert_eq!(names(&["timeout", "-s", "KILL", "10", "sh"]), ["4:sh"]);
        assert_eq!(names(&["stdbuf", "-oL", "sh"]), ["2:sh"]);
        assert_eq!(names(&["xargs", "-n", "1", "sh", "-c"]), ["3:sh"]);
        assert_eq!(names(&["nohup", "setsid", "sh"]), ["1:setsid", "2:sh"]);
        assert_eq!(
            names(&["find", ".", "-name", "x", "-exec", "sh", "-c", "id", ";"]),
            ["5:sh"]
        );
        assert_eq!(
            names(&["find", ".", "-execdir", "env", "bash", "{}", "+"]),
            ["3:env", "4:bash"]
        );
        assert_eq!(names(&["cargo", "build"]), Vec::<String>::new());
        assert_eq!(names(&["find", ".", "-name", "*.rs"]), Vec::<String>::new());
    }
}
