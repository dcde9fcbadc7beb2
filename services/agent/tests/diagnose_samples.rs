//! The diagnosis parsers on hand-written samples, for the tools not installed on this machine
//! (rustc's human output without a crate build, pytest, tsc, go) and for the rules every parser
//! shares: workspace-relative paths, ranking, deduplication, the bounds, the fallback tail and
//! the signature. The samples are copied from the tools' real output.

use std::collections::BTreeMap;

use kiln_agent::diagnose::{Diagnosis, Limits, Severity, StepOutput, diagnose, signature};

const ROOT: &str = "/sandbox/workspace";

fn run_with(
    argv: &str,
    stdout: &str,
    stderr: &str,
    files: &[(&str, &str)],
    limits: Limits,
) -> Diagnosis {
    let files: BTreeMap<String, String> = files
        .iter()
        .map(|(p, c)| (p.to_string(), c.to_string()))
        .collect();
    let argv: Vec<String> = argv.split(' ').map(str::to_string).collect();
    diagnose(
        &StepOutput {
            argv: &argv,
            stdout: stdout.as_bytes(),
            stderr: stderr.as_bytes(),
            workspace_root: ROOT,
            files: &files,
        },
        limits,
    )
}

fn run(argv: &str, output: &str, files: &[(&str, &str)]) -> Diagnosis {
    run_with(argv, "", output, files, Limits::default())
}

fn numbered(n: usize) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

// rustc is installed, but its human format is only produced by a plain `cargo build`; a sample
// keeps this test fast.
const RUSTC_HUMAN: &str = "\
   Compiling demo v0.1.0 (/sandbox/workspace)
error[E0308]: mismatched types
 --> src/main.rs:3:18
  |
3 |     let x: i32 = \"a\";
  |            ---   ^^^ expected `i32`, found `&str`
  |            |
  |            expected due to this

warning: unused variable: `y`
 --> /sandbox/workspace/src/lib.rs:7:9
  |
7 |     let y = 2;
  |         ^ help: if this is intentional, prefix it with an underscore: `_y`

error: aborting due to 1 previous error

For more information about this error, try `rustc --explain E0308`.
error: could not compile `demo` (bin \"demo\") due to 1 previous error
";

#[test]
fn rustc_human_output() {
    let d = run(
        "cargo build",
        RUSTC_HUMAN,
        &[("src/main.rs", &numbered(5)), ("src/lib.rs", &numbered(9))],
    );
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    let e = &d.diagnostics[0];
    assert_eq!(
        (e.file.as_str(), e.line, e.column),
        ("src/main.rs", 3, Some(18))
    );
    assert_eq!(
        (e.code.as_deref(), e.message.as_str()),
        (Some("E0308"), "mismatched types")
    );
    assert_eq!(e.context.first().unwrap().number, 1);
    let w = &d.diagnostics[1];
    assert_eq!(
        (w.file.as_str(), w.line, w.severity),
        ("src/lib.rs", 7, Severity::Warning)
    );
    assert_eq!(
        w.context.iter().map(|l| l.number).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9]
    );
}

#[test]
fn rust_test_panic_is_located() {
    let out = "\
running 1 test
test tests::adds ... FAILED

failures:

---- tests::adds stdout ----

thread 'tests::adds' panicked at src/lib.rs:10:9:
assertion `left == right` failed
  left: 4
 right: 5
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace
";
    let d = run_with(
        "cargo test",
        out,
        "",
        &[("src/lib.rs", &numbered(12))],
        Limits::default(),
    );
    let p = &d.diagnostics[0];
    assert_eq!(
        (p.file.as_str(), p.line, p.column),
        ("src/lib.rs", 10, Some(9))
    );
    assert_eq!(
        p.message,
        "test tests::adds panicked: assertion `left == right` failed\n  left: 4\n right: 5"
    );
}

// pytest is not installed here (python3 is, without pytest).
const PYTEST: &str = "\
============================= test session starts ==============================
collected 2 items

tests/test_calc.py F.                                                    [100%]

=================================== FAILURES ===================================
___________________________________ test_add ___________________________________

    def test_add():
>       assert add(1, 2) == 4
E       assert 3 == 4
E        +  where 3 = add(1, 2)

tests/test_calc.py:5: AssertionError
___________________________________ test_div ___________________________________

    def test_div():
>       div(1, 0)

tests/test_calc.py:9: 
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _

a = 1, b = 0

    def div(a, b):
>       return a / b
E       ZeroDivisionError: division by zero

calc.py:2: ZeroDivisionError
=========================== short test summary info ============================
FAILED tests/test_calc.py::test_add - assert 3 == 4
FAILED tests/test_calc.py::test_div - ZeroDivisionError: division by zero
";

#[test]
fn pytest_failures_use_the_last_workspace_frame_and_the_e_lines() {
    let d = run_with(
        "python3 -m pytest",
        PYTEST,
        "",
        &[
            ("tests/test_calc.py", &numbered(10)),
            ("calc.py", &numbered(3)),
        ],
        Limits::default(),
    );
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    let add = &d.diagnostics[0];
    assert_eq!((add.file.as_str(), add.line), ("tests/test_calc.py", 5));
    assert_eq!(
        add.message,
        "AssertionError: assert 3 == 4\nin test test_add\n+  where 3 = add(1, 2)"
    );
    let div = &d.diagnostics[1];
    assert_eq!((div.file.as_str(), div.line), ("calc.py", 2));
    assert_eq!(
        div.message,
        "ZeroDivisionError: division by zero\nin test test_div"
    );
    assert_eq!(
        div.context.iter().map(|l| l.number).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

// tsc is not installed here; both of its output formats.
#[test]
fn tsc_both_formats() {
    let plain =
        "src/index.ts(3,7): error TS2322: Type 'string' is not assignable to type 'number'.\n";
    let pretty = "src/util.ts:12:3 - error TS2304: Cannot find name 'foo'.\n\n12   foo();\n     ~~~\n\nFound 1 error in src/util.ts:12\n";
    let d = run(
        "npx tsc",
        &format!("{plain}{pretty}"),
        &[("src/index.ts", &numbered(4))],
    );
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    let a = &d.diagnostics[0];
    assert_eq!(
        (a.file.as_str(), a.line, a.column),
        ("src/index.ts", 3, Some(7))
    );
    assert_eq!(a.code.as_deref(), Some("TS2322"));
    assert_eq!(
        a.message,
        "Type 'string' is not assignable to type 'number'."
    );
    let b = &d.diagnostics[1];
    assert_eq!(
        (b.file.as_str(), b.line, b.column, b.code.as_deref()),
        ("src/util.ts", 12, Some(3), Some("TS2304"))
    );
    // src/util.ts was not passed in: no context, still located.
    assert!(b.context.is_empty());
}

// go is not installed here.
#[test]
fn go_build_errors() {
    let out = "# example.com/demo\n./main.go:3:5: undefined: x\n./main.go:7:2: declared and not used: y\n";
    let d = run("go build ./...", out, &[("main.go", &numbered(8))]);
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    let e = &d.diagnostics[0];
    assert_eq!((e.file.as_str(), e.line, e.column), ("main.go", 3, Some(5)));
    assert_eq!(e.message, "undefined: x");
    assert_eq!(d.diagnostics[1].message, "declared and not used: y");
}

#[test]
fn go_test_failures_and_panics() {
    let out = "\
--- FAIL: TestAdd (0.00s)
    calc_test.go:12: add(1, 2) = 4, want 3
FAIL
FAIL\texample.com/demo\t0.002s
panic: runtime error: index out of range [5] with length 3

goroutine 1 [running]:
runtime.panicIndex()
\t/usr/local/go/src/runtime/panic.go:115 +0x33
main.pick(...)
\t/sandbox/workspace/main.go:9
main.main()
\t/sandbox/workspace/main.go:4 +0x1d
exit status 2
";
    let d = run_with(
        "go test ./...",
        out,
        "",
        &[("calc_test.go", &numbered(14)), ("main.go", &numbered(10))],
        Limits::default(),
    );
    let t = &d.diagnostics[0];
    assert_eq!((t.file.as_str(), t.line), ("calc_test.go", 12));
    assert_eq!(t.message, "add(1, 2) = 4, want 3\nin test TestAdd");
    let p = &d.diagnostics[1];
    assert_eq!((p.file.as_str(), p.line), ("main.go", 9));
    assert_eq!(
        p.message,
        "panic: runtime error: index out of range [5] with length 3"
    );
}

#[test]
fn outside_the_workspace_ranks_last_and_duplicates_collapse() {
    let out = "\
/usr/include/stdio.h:12:1: error: unknown type name 'oops'
src/a.c:4:2: error: expected ';' before '}' token
src/a.c:4:2: error: expected ';' before '}' token
./src/a.c:4:2: error: expected ';' before '}' token
";
    let d = run("make", out, &[("src/a.c", &numbered(5))]);
    assert_eq!(d.diagnostics.len(), 2, "{d:?}");
    assert_eq!(d.diagnostics[0].file, "src/a.c");
    assert!(d.diagnostics[0].in_workspace);
    assert_eq!(d.diagnostics[1].file, "/usr/include/stdio.h");
    assert!(!d.diagnostics[1].in_workspace);
    assert!(d.diagnostics[1].context.is_empty());
}

#[test]
fn count_and_byte_bounds_hold() {
    let long = "x".repeat(3000);
    let mut out = String::new();
    for i in 1..=30 {
        out.push_str(&format!("src/a.c:{i}:1: error: problem {i} {long}\n"));
    }
    let d = run("cc", &out, &[("src/a.c", &numbered(40))]);
    assert_eq!(d.diagnostics.len(), Limits::default().max_diagnostics);
    assert_eq!(d.omitted, 30 - Limits::default().max_diagnostics);
    // Each message is cut; the rendering fits the byte bound and says how many it left out.
    assert!(
        d.diagnostics
            .iter()
            .all(|x| x.message.len() <= Limits::default().max_message_bytes)
    );
    let rendered = d.render();
    assert!(
        rendered.len() <= Limits::default().max_bytes,
        "{}",
        rendered.len()
    );
    assert!(rendered.starts_with("error: problem 1 "));
    assert!(
        rendered.contains("more diagnostics not shown"),
        "{rendered}"
    );

    // A bound smaller than one diagnostic still shows its location.
    let tiny = Limits {
        max_bytes: 200,
        ..Limits::default()
    };
    let d = run_with("cc", "", &out, &[("src/a.c", &numbered(40))], tiny);
    let rendered = d.render();
    assert!(rendered.len() <= 200, "{}", rendered.len());
    assert!(rendered.contains("error: problem 1"), "{rendered}");
}

#[test]
fn unparsable_output_falls_back_to_the_trimmed_tail() {
    let mut out = String::new();
    for i in 1..=100 {
        out.push_str(&format!("make: step {i} did something odd\n"));
    }
    out.push_str("\n\n\n");
    let d = run("make", &out, &[]);
    assert!(d.diagnostics.is_empty());
    let tail = d.tail.as_deref().unwrap();
    assert_eq!(tail.lines().count(), Limits::default().tail_lines);
    assert!(tail.starts_with("make: step 61 "));
    assert!(tail.ends_with("make: step 100 did something odd\n"));
    let rendered = d.render();
    assert!(rendered.starts_with("No located error was found"));
    assert!(rendered.len() <= Limits::default().max_bytes);

    // One enormous line is cut from the front, keeping its end.
    let huge = format!("{}THE END\n", "é".repeat(10_000));
    let d = run("make", &huge, &[]);
    let rendered = d.render();
    assert!(rendered.len() <= Limits::default().max_bytes);
    assert!(rendered.trim_end().ends_with("THE END"));
}

#[test]
fn signature_ignores_varying_numbers_but_not_the_location() {
    let a = run(
        "cc",
        "src/a.c:4:2: error: array of 12 items at 0x7ffd1\n",
        &[],
    );
    let b = run(
        "cc",
        "src/a.c:4:2: error: array of 13 items at 0x7ffe9\n",
        &[],
    );
    let moved = run(
        "cc",
        "src/a.c:5:2: error: array of 12 items at 0x7ffd1\n",
        &[],
    );
    let other = run(
        "cc",
        "src/b.c:4:2: error: array of 12 items at 0x7ffd1\n",
        &[],
    );
    assert_eq!(signature(&a.diagnostics), signature(&b.diagnostics));
    assert_ne!(signature(&a.diagnostics), signature(&moved.diagnostics));
    assert_ne!(signature(&a.diagnostics), signature(&other.diagnostics));
    assert_eq!(a.signature(), signature(&a.diagnostics));
    // Fixed value: the fingerprint must not change between processes or releases.
    assert_eq!(signature(&[]), "cbf29ce484222325");
    // Without diagnostics, the tail is the fingerprint.
    let t1 = run("make", "took 12ms\nboom\n", &[]);
    let t2 = run("make", "took 57ms\nboom\n", &[]);
    let t3 = run("make", "took 57ms\nbang\n", &[]);
    assert_eq!(t1.signature(), t2.signature());
    assert_ne!(t1.signature(), t3.signature());
}

#[test]
fn an_enormous_log_is_read_by_its_head_and_tail() {
    let limits = Limits {
        max_input_bytes: 64 * 1024,
        ..Limits::default()
    };
    let filler = "compiling something unremarkable\n".repeat(20_000);
    let out = format!(
        "src/a.c:1:1: error: first\n{filler}src/a.c:2:1: error: hidden in the middle\n{filler}src/a.c:3:1: error: last\n"
    );
    let d = run_with("cc", "", &out, &[], limits);
    let lines: Vec<u32> = d.diagnostics.iter().map(|x| x.line).collect();
    assert_eq!(lines, vec![1, 3]);
}

#[test]
fn context_comes_only_from_the_files_passed_in() {
    // The printed paths name files that exist on this machine; none is read, because context
    // lines come from the map the caller passes, never from the file system.
    let out = "/etc/passwd:1:1: error: a\n/sandbox/workspace/../../etc/hostname:1:1: error: b\n/sandbox/workspace/on_disk_only.c:1:1: error: c\n";
    let d = run("cc", out, &[]);
    assert_eq!(d.diagnostics.len(), 3);
    assert!(d.diagnostics.iter().all(|x| x.context.is_empty()), "{d:?}");
    let outside: Vec<&str> = d
        .diagnostics
        .iter()
        .filter(|x| !x.in_workspace)
        .map(|x| x.file.as_str())
        .collect();
    assert_eq!(
        outside,
        vec!["/etc/passwd", "/sandbox/workspace/../../etc/hostname"]
    );
}

#[test]
fn musl_assertions_are_located_too() {
    // musl's wording (Alpine images), which this machine's glibc does not produce.
    let d = run(
        "make",
        "Assertion failed: add(2, 3) == 5 (test_calc.c: main: 6)\nmake: *** [Makefile:2: test] Aborted\n",
        &[("test_calc.c", &numbered(8))],
    );
    let first = &d.diagnostics[0];
    assert_eq!((first.file.as_str(), first.line), ("test_calc.c", 6));
    assert!(
        first.message.contains("in main: add(2, 3) == 5"),
        "{}",
        first.message
    );
}
