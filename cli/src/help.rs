//! Help that teaches: examples in every command's long help (`--help`), the flags every
//! command takes under their own heading, and `kiln up --help` showing only what a
//! server takes.
//!
//! The examples live here, in one table keyed by command path, rather than in
//! attributes spread over each command's module: one place to read them all, and a test
//! ([`tests::every_command_has_examples_and_every_argument_a_description`]) that fails
//! when a new command comes without them.

use clap::Command;

/// The heading of the flags every client command takes (`--endpoint`, `--ca`, `-o`,
/// `--log-format`), kept apart from each command's own.
pub const GLOBAL_HEADING: &str = "Global options";

/// The global flags that only make sense for a client, hidden from `kiln up --help`.
const CLIENT_FLAGS: &[&str] = &["endpoint", "ca", "output"];

/// `(command path, examples)`; each is shown under "Examples:" in `--help`.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "kiln",
        "kiln up                                   # a whole suite on this machine
kiln login -u admin
kiln build run --from . -- make test
kiln agent run \"a CLI that converts CSV to JSON, with tests\"",
    ),
    (
        "up",
        "kiln up
kiln up --listen 0.0.0.0:7443 --data-dir /var/lib/kiln
kiln up --config kiln.toml",
    ),
    (
        "health",
        "kiln health
kiln health -o json --endpoint https://kiln.example.com:7443",
    ),
    (
        "config",
        "kiln config view
kiln config set endpoint https://kiln.example.com:7443
kiln config check kiln.toml",
    ),
    (
        "config view",
        "kiln config view
kiln config view -o json",
    ),
    (
        "config set",
        "kiln config set endpoint https://kiln.example.com:7443
kiln config set ca_file ./ca.pem
kiln config set output json",
    ),
    ("config unset", "kiln config unset output"),
    (
        "config check",
        "kiln config check /etc/kiln/kiln.toml\nkiln config check --service build /etc/kiln/build.toml",
    ),
    ("config example", "kiln config example > kiln.toml"),
    (
        "login",
        "kiln login                                # asks for user name and password
kiln login -u alice
echo \"$PASSWORD\" | kiln login -u ci --password-stdin",
    ),
    (
        "logout",
        "kiln logout
kiln logout --all                         # every session of this user",
    ),
    (
        "passwd",
        "kiln passwd
printf '%s\\n%s\\n' \"$OLD\" \"$NEW\" | kiln passwd --password-stdin",
    ),
    (
        "whoami",
        "kiln whoami
KILN_TOKEN=kiln_… kiln whoami -o json",
    ),
    (
        "keys",
        "kiln keys create ci-reader
kiln keys ls",
    ),
    (
        "keys create",
        "kiln keys create dashboard              # a viewer key: reads, changes nothing
kiln keys create ci --role user --ttl 30d # a key that can run builds
kiln keys create backup --user-id 6f1c… --role viewer   # for another user (admins)",
    ),
    (
        "keys list",
        "kiln keys list
kiln keys ls --all -o json",
    ),
    (
        "keys revoke",
        "kiln keys revoke 91ab…
kiln keys rm 91ab…",
    ),
    (
        "users",
        "kiln users create bob --role viewer
kiln users ls",
    ),
    (
        "users create",
        "kiln users create bob                    # asks for the password twice
kiln users create ci --role user --password-stdin < password.txt",
    ),
    (
        "users list",
        "kiln users list
kiln users ls --all -o json",
    ),
    (
        "users update",
        "kiln users update bob --role admin
kiln users update bob --disable
kiln users update bob --password         # reset: asks for the new one",
    ),
    (
        "users delete",
        "kiln users delete bob
kiln users rm 6f1c…",
    ),
    (
        "workspace",
        "kiln workspace create --from . --name app
kiln workspace ls",
    ),
    (
        "workspace create",
        "kiln workspace create
kiln workspace create --from . --name app --label team=web",
    ),
    (
        "workspace push",
        "kiln workspace push app
kiln workspace push app ./src -v",
    ),
    (
        "workspace list",
        "kiln workspace list --label team=web
kiln workspace ls app src/",
    ),
    ("workspace cat", "kiln workspace cat app src/main.rs"),
    (
        "workspace download",
        "kiln workspace download app
kiln workspace download app dist --out ./dist
kiln workspace download app --out app.tar",
    ),
    (
        "workspace delete",
        "kiln workspace delete app
kiln workspace rm 3f2a…",
    ),
    (
        "build",
        "kiln build run --from . -- cargo test
kiln build logs 8c1d… --follow",
    ),
    (
        "build run",
        "kiln build run --from . -- make test
kiln build run --workspace app --step 'pip install -e .' -- python3 -m pytest
kiln build run --from . --detach --timeout 10m -- cargo build --release",
    ),
    (
        "build watch",
        "kiln build watch 8c1d…
kiln build watch 8c1d… --from-start --progress plain",
    ),
    (
        "build list",
        "kiln build list --state RUNNING
kiln build ls --workspace app --label ci=nightly -o json",
    ),
    (
        "build get",
        "kiln build get 8c1d…
kiln build get 8c1d… -o json",
    ),
    (
        "build logs",
        "kiln build logs 8c1d…
kiln build logs 8c1d… --follow --timestamps
kiln build logs 8c1d… --tail 20 --stream stderr",
    ),
    (
        "build policy",
        "kiln build policy
kiln build policy -o json",
    ),
    (
        "build cancel",
        "kiln build cancel 8c1d…
kiln build cancel 8c1d… --grace 2s",
    ),
    (
        "agent",
        "kiln agent run \"a Python module that parses ISO dates, with tests\"
kiln agent ls",
    ),
    (
        "agent run",
        "kiln agent run \"a Rust CLI that counts words\" --toolchain rust
kiln agent run \"fix the failing test\" --workspace app --step 'python3 -m pytest'",
    ),
    (
        "agent watch",
        "kiln agent watch 5e0b…
kiln agent watch 5e0b… --from-start",
    ),
    (
        "agent list",
        "kiln agent list --phase DONE
kiln agent ls --workspace app -o json",
    ),
    ("agent get", "kiln agent get 5e0b…"),
    ("agent cancel", "kiln agent cancel 5e0b…"),
    ("agent models", "kiln agent models"),
    (
        "version",
        "kiln version
kiln version --client -o json",
    ),
    (
        "completion",
        "source <(kiln completion bash)           # in ~/.bashrc
kiln completion zsh > \"${fpath[1]}/_kiln\"
kiln completion fish > ~/.config/fish/completions/kiln.fish",
    ),
];

fn examples_of(path: &str) -> Option<&'static str> {
    EXAMPLES.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
}

/// The `kiln` command tree with examples, headings and `up`'s help applied.
pub fn teach(command: Command) -> Command {
    let command = command.mut_args(|arg| {
        if arg.is_global_set() {
            arg.help_heading(GLOBAL_HEADING)
        } else {
            arg
        }
    });
    let command = with_examples(command, "");
    hide_client_flags_in_up(command)
}

fn with_examples(mut command: Command, parent: &str) -> Command {
    let path = if parent.is_empty() {
        // The root ("kiln") and its direct children are keyed without the binary name.
        if command.get_name() == "kiln" {
            "kiln".to_owned()
        } else {
            command.get_name().to_owned()
        }
    } else {
        format!("{parent} {}", command.get_name())
    };
    if let Some(examples) = examples_of(&path) {
        // An existing after_help (e.g. exit codes) stays, before the examples.
        let before = command
            .get_after_help()
            .map(|h| format!("{h}\n\n"))
            .unwrap_or_default();
        command = command.after_long_help(format!("{before}Examples:\n{}", indent(examples)));
    }
    let child_parent = if path == "kiln" { String::new() } else { path };
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .filter(|name| name != "help")
        .collect();
    for name in names {
        let parent = child_parent.clone();
        command = command.mut_subcommand(name, move |sub| with_examples(sub, &parent));
    }
    command
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `kiln up` serves; it does not connect anywhere, so the client's global flags would
/// only mislead there. `up` gets hidden, local copies of them: clap propagates a global
/// flag only to subcommands without an argument of the same id, and a script that
/// passes them to `kiln up` still works (they are ignored there, as before).
fn hide_client_flags_in_up(command: Command) -> Command {
    let hidden: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| CLIENT_FLAGS.contains(&arg.get_id().as_str()))
        .map(|arg| arg.clone().global(false).hide(true))
        .collect();
    command.mut_subcommand("up", |up| up.args(hidden))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(command: &Command, path: String, out: &mut Vec<(String, Command)>) {
        out.push((path.clone(), command.clone()));
        for sub in command.get_subcommands().filter(|c| c.get_name() != "help") {
            let child = if path.is_empty() {
                sub.get_name().to_owned()
            } else {
                format!("{path} {}", sub.get_name())
            };
            leaves(sub, child, out);
        }
    }

    #[test]
    fn every_command_has_examples_and_every_argument_a_description() {
        let mut command = crate::command();
        command.build();
        let mut all = Vec::new();
        leaves(&command, String::new(), &mut all);
        let mut missing = Vec::new();
        for (path, command) in &all {
            let shown = if path.is_empty() {
                "kiln"
            } else {
                path.as_str()
            };
            let long = command
                .get_after_long_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            if !long.contains("Examples:\n  kiln ") && !long.contains("Examples:\n  source") {
                missing.push(format!("{shown}: no examples"));
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{shown}: argument {id} is not described"));
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
        // And every example belongs to a command that exists.
        for (path, _) in EXAMPLES {
            let path = if *path == "kiln" { "" } else { path };
            assert!(
                all.iter().any(|(p, _)| p == path),
                "examples for a command that does not exist: {path}"
            );
        }
    }
}
