//! Escape attempts through processes, privileges, the network and the kernel.

// The parent-environment test puts a secret into its own environment, which needs
// `std::env::set_var` (unsafe since edition 2024).
#![allow(unsafe_code)]

mod common;

use std::io::ErrorKind;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;
use kiln_sandbox::{Reason, Sandbox, Tier};

fn py_args(ws: &Workspace, code: &str, args: &[&str]) -> kiln_sandbox::CommandSpec {
    let mut argv = vec!["/usr/bin/python3", "-I", "-S", "-c", code];
    argv.extend_from_slice(args);
    spec(ws, &argv)
}

async fn connect_to_host_listener(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let code = r#"
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    print("CONNECTED")
except OSError as e:
    print("DENIED", e.errno)
"#;
    let (o, out, err) = run(s, py_args(&ws, code, &[&port])).await;
    assert!(o.success(), "{o:?} {err}");
    assert!(out.starts_with("DENIED"), "{out}");
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the listener got a connection: {accepted:?}"
    );
}

/// UDP needs no connection: a datagram to a host service on 127.0.0.1 (a DNS stub, a
/// metrics agent) is an escape as real as a TCP connect. Tier A's loopback is its own;
/// tier B gets no datagram socket at all. Other protocols over a stream (SCTP), which
/// landlock's TCP rules do not cover, are refused too.
async fn udp_to_host_service(s: &Sandbox, tier: Tier) {
    let ws = Workspace::new(s);
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port().to_string();
    let code = r#"
import socket, sys
for name, args in [("udp", (socket.AF_INET, socket.SOCK_DGRAM)),
                   ("udp6", (socket.AF_INET6, socket.SOCK_DGRAM)),
                   ("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("sctp", (socket.AF_INET, socket.SOCK_STREAM, 132))]:
    try:
        s = socket.socket(*args)
    except OSError as e:
        print(name, "NOSOCKET", e.errno)
        continue
    try:
        if name == "udp":
            s.sendto(b"escaped", ("127.0.0.1", int(sys.argv[1])))
        print(name, "SOCKET")
    except OSError as e:
        print(name, "NOSEND", e.errno)
"#;
    let (o, out, err) = run(s, py_args(&ws, code, &[&port])).await;
    assert!(o.success(), "{o:?} {err}");
    if tier == Tier::B {
        for name in ["udp", "udp6", "raw", "sctp"] {
            assert!(
                out.contains(&format!("{name} NOSOCKET {}", libc::EPERM)),
                "{name}: {out}"
            );
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut buf = [0u8; 64];
    let got = host.recv_from(&mut buf);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a datagram reached the host: {got:?} ({out})"
    );
}

async fn ptrace_denied(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let me = std::process::id().to_string();
    let code = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
for name, pid in (("child", child), ("test", int(sys.argv[1])), ("parent", os.getppid())):
    r = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    print(name, r, ctypes.get_errno())
r = libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
print("traceme", r, ctypes.get_errno())
try:
    open("/proc/%d/mem" % child, "rb").read(1)
    print("mem READ")
except OSError as e:
    print("mem", e.errno)
os.kill(child, 9)
"#;
    let (o, out, err) = run(s, py_args(&ws, code, &[&me])).await;
    assert!(o.success(), "{o:?} {err}");
    for line in out.lines() {
        assert!(
            !line.contains(" 0 ") && !line.contains("READ"),
            "ptrace worked: {out}"
        );
    }
    assert_eq!(out.lines().count(), 5, "{out}");
}

async fn proc_shows_only_the_sandbox(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = r#"
import os
print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"#;
    let (o, out, err) = run(s, py(&ws, code)).await;
    assert!(o.success(), "{o:?} {err}");
    // pid 1 is the sandbox's init, pid 2 this python: nothing of the host.
    assert_eq!(out.trim(), "[1, 2]", "{out}");
}

async fn parent_environment_unreadable(s: &Sandbox, _tier: Tier) {
    let secret = "KILN-PARENT-SECRET-c0ffee";
    // SAFETY: nextest runs every test in its own process; the runtime's idle workers and
    // this test are the only threads, and none of them reads the environment meanwhile.
    unsafe { std::env::set_var("KILN_TEST_SECRET", secret) };
    let ws = Workspace::new(s);
    let me = std::process::id().to_string();
    let code = r#"
import os, sys
print("ENV", sorted(os.environ.keys()))
for pid in (sys.argv[1], str(os.getppid()), "1"):
    try:
        print(pid, open("/proc/%s/environ" % pid, "rb").read())
    except OSError as e:
        print(pid, "DENIED", e.errno)
"#;
    let (o, out, err) = run(s, py_args(&ws, code, &[&me])).await;
    assert!(o.success(), "{o:?} {err}");
    assert!(!out.contains(secret), "the secret leaked: {out}");
    assert!(!out.contains("KILN_TEST_SECRET"), "{out}");
}

async fn setuid_binary_gains_nothing(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let build = tempfile::tempdir().unwrap();
    let src = build.path().join("suid.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <unistd.h>\nint main(void){\
         printf(\"%d %d %d\\n\", (int)getuid(), (int)geteuid(), setuid(0));return 0;}\n",
    )
    .unwrap();
    let bin = ws.join("suid");
    let cc = Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(cc.success());
    // root-owned and setuid, as an attacker would love it.
    std::os::unix::fs::chown(&bin, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let (o, out, err) = run(s, spec(&ws, &["./suid"])).await;
    assert!(o.success(), "{o:?} {err}");
    let fields: Vec<i32> = out.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields.len(), 3, "{out}");
    assert_ne!(fields[1], 0, "euid 0 via setuid binary: {out}");
    assert_eq!(fields[2], -1, "setuid(0) succeeded: {out}");
}

async fn runs_unprivileged(s: &Sandbox, tier: Tier) {
    let ws = Workspace::new(s);
    let (o, out, err) = run(
        s,
        spec(
            &ws,
            &["/bin/cat", "/proc/self/status", "/proc/self/uid_map"],
        ),
    )
    .await;
    assert!(o.success(), "{o:?} {err}");
    let field = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing: {out}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_ne!(field("Uid:"), "0", "{out}");
    for cap in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
        assert_eq!(field(cap), "0000000000000000", "{cap} {out}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    // Inside the user namespace the step's uid maps to an unprivileged host uid.
    let map = out
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>();
    match tier {
        Tier::A => assert_ne!(map[1], "0", "mapped to host root: {out}"),
        _ => assert_eq!(map, ["0", "0", "4294967295"], "{out}"),
    }
}

async fn mount_unshare_setns_denied(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def show(name, r):
    print(name, r, ctypes.get_errno())
show("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
show("umount", libc.umount2(b"/proc", 2))
for flag in (0x10000000, 0x20000000, 0x40000000, 0x00020000, 0x04000000, 0x08000000):
    show("unshare-%x" % flag, libc.unshare(flag))
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
show("setns", libc.setns(fd, 0))
r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER|SIGCHLD)
if r == 0:
    os._exit(0)
show("clone-newuser", r)
show("chroot", libc.chroot(b"/tmp"))
show("bpf", libc.syscall(321, 0, 0, 0))
show("keyctl", libc.syscall(250, 0, 0, 0))
"#;
    let (o, out, err) = run(s, py(&ws, code)).await;
    assert!(o.success(), "{o:?} {err}");
    assert_eq!(out.lines().count(), 13, "{out}");
    for line in out.lines() {
        let parts: Vec<_> = line.split_whitespace().collect();
        assert_eq!(parts[1], "-1", "{line} succeeded: {out}");
        assert_eq!(parts[2], "1", "{line}: expected EPERM: {out}");
    }
}

async fn signal_to_parent_denied(s: &Sandbox, tier: Tier) {
    let ws = Workspace::new(s);
    let me = std::process::id().to_string();
    let code = r#"
import os, signal, sys
for name, pid in (("test", int(sys.argv[1])), ("parent", os.getppid())):
    for sig in (0, signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            print(name, int(sig), "SENT")
        except OSError as e:
            print(name, int(sig), e.errno)
print("alive")
"#;
    let (o, out, err) = run(s, py_args(&ws, code, &[&me])).await;
    assert!(o.success(), "the supervisor died? {o:?} {err} {out}");
    for line in out.lines().filter(|l| l.starts_with("test")) {
        assert!(!line.ends_with("SENT"), "{out}");
    }
    if tier == Tier::B {
        for line in out.lines().filter(|l| l.starts_with("parent")) {
            assert!(!line.ends_with("SENT"), "{out}");
        }
    }
    // (In tier A the parent is the sandbox's own init, which ignores the program.)
    assert!(out.ends_with("alive\n"), "{out}");
}

both_tiers!(
    connect_to_host_listener,
    udp_to_host_service,
    ptrace_denied,
    parent_environment_unreadable,
    setuid_binary_gains_nothing,
    runs_unprivileged,
    mount_unshare_setns_denied,
    signal_to_parent_denied,
);
tier_a_only!(proc_shows_only_the_sandbox);

#[test]
fn reason_names_match_the_proto() {
    assert_eq!(Reason::TimedOut.to_string(), "TIMED_OUT");
    assert_eq!(Reason::SpawnFailed.to_string(), "SPAWN_FAILED");
}
