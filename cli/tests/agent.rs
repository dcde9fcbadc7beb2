//! `kiln agent`: argument errors caught before anything is sent, and (against a live
//! suite with a scripted model) what a person or a script sees of a task.

mod common;

use std::process::Output;

use common::Offline;

fn offline(args: &[&str]) -> Output {
    let config = tempfile::tempdir().expect("tempdir");
    Offline
        .command(args)
        .env("KILN_CONFIG_DIR", config.path())
        .env_remove("KILN_TOKEN")
        .output()
        .expect("kiln runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn run_needs_a_prompt_and_refuses_an_empty_one() {
    let missing = offline(&["agent", "run"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("<PROMPT>"),
        "{}",
        stderr(&missing)
    );

    let empty = offline(&["agent", "run", "  "]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        stderr(&empty).starts_with("kiln: the prompt is empty"),
        "{}",
        stderr(&empty)
    );
}

#[test]
fn malformed_budgets_and_labels_are_named() {
    for (args, names) in [
        (&["agent", "run", "p", "--timeout", "5x"][..], "--timeout"),
        (
            &["agent", "run", "p", "--max-iterations", "many"][..],
            "--max-iterations",
        ),
        (
            &["agent", "run", "p", "--max-tokens", "lots"][..],
            "--max-tokens",
        ),
        (
            &["agent", "run", "p", "--label", "novalue"][..],
            "is not key=value",
        ),
        (&["agent", "list", "--label", "x"][..], "is not key=value"),
        (&["agent", "list", "--limit", "lots"][..], "--limit"),
    ] {
        let output = offline(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(names),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn an_unknown_phase_lists_the_real_ones() {
    let output = offline(&["agent", "list", "--phase", "green"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("unknown phase \"green\""), "{err}");
    assert!(err.contains("DONE") && err.contains("CANCELLED"), "{err}");
}

#[test]
fn help_documents_the_exit_codes() {
    for command in ["run", "watch"] {
        let output = offline(&["agent", command, "--help"]);
        assert!(output.status.success());
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("0 when the task ends DONE")
                && help.contains("1 when it ends FAILED")
                && help.contains("130 when it ends CANCELLED"),
            "{help}"
        );
    }
}

#[test]
fn no_server_is_one_line_with_a_hint() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let output = Offline
        .command(&["--endpoint", "https://127.0.0.1:1", "agent", "models"])
        .env("KILN_TOKEN", "kiln_not_a_real_key")
        .output()
        .expect("kiln runs");
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.starts_with("kiln: cannot reach kiln at https://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}
