//! Escape attempts through sockets that no network namespace covers, and the cgroup
//! view of a step.

mod common;

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use common::*;
use kiln_sandbox::{Sandbox, Tier};

fn py_args(ws: &Workspace, code: &str, args: &[&str]) -> kiln_sandbox::CommandSpec {
    let mut argv = vec!["/usr/bin/python3", "-I", "-S", "-c", code];
    argv.extend_from_slice(args);
    spec(ws, &argv)
}

/// vsock talks to the hypervisor and sibling VMs: no namespace isolates it.
async fn vsock_refused(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = r#"
import socket
for ty in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
    try:
        socket.socket(socket.AF_VSOCK, ty)
        print("SOCKET")
    except OSError as e:
        print("NOSOCKET", e.errno)
"#;
    let (o, out, err) = run(s, py(&ws, code)).await;
    assert!(o.success(), "{o:?} {err}");
    assert_eq!(
        out,
        format!("NOSOCKET {}\n", libc::EPERM).repeat(3),
        "{out}"
    );
}

/// A world-writable pathname socket of the host (an agent's, a database's, a docker
/// socket) is reachable by path from tier B, and landlock does not check `connect` on
/// socket files: tier B gets no `socket(AF_UNIX)`. Tier A does not see the host's /tmp.
async fn host_unix_socket_unreachable(s: &Sandbox, tier: Tier) {
    let ws = Workspace::new(s);
    let dir = tempfile::Builder::new()
        .prefix("kiln-sock-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let code = r#"
import socket, sys
for ty in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
    try:
        s = socket.socket(socket.AF_UNIX, ty)
    except OSError as e:
        print("NOSOCKET", e.errno)
        continue
    try:
        s.connect(sys.argv[1])
        print("CONNECTED")
    except OSError as e:
        print("NOCONNECT", e.errno)
"#;
    let (o, out, err) = run(s, py_args(&ws, code, &[path.to_str().unwrap()])).await;
    assert!(o.success(), "{o:?} {err}");
    assert!(!out.contains("CONNECTED"), "{out}");
    if tier == Tier::B {
        assert_eq!(
            out,
            format!("NOSOCKET {}\n", libc::EPERM).repeat(3),
            "{out}"
        );
    }
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the host socket got a connection: {accepted:?}"
    );
}

/// What runtimes need of unix sockets keeps working: socketpair (libuv's child stdio,
/// python's multiprocessing), here end to end through a forked child.
async fn socketpair_works(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = r#"
import os, socket
for ty in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
    a, b = socket.socketpair(socket.AF_UNIX, ty)
    if os.fork() == 0:
        a.close()
        b.send(b"ping")
        os._exit(0)
    b.close()
    print(a.recv(4).decode())
    os.wait()
"#;
    let (o, out, err) = run(s, py(&ws, code)).await;
    assert!(o.success(), "{o:?} {err}");
    assert_eq!(out, "ping\nping\nping\n");
}

/// Runtimes' own plumbing needs no `socket(AF_UNIX)`: python's subprocess and
/// multiprocessing processes and pipes (fork and spawn; forkserver, the default from
/// python 3.14, listens on a unix socket and fails in tier B; and multiprocessing's
/// locks need /dev/shm, which tier B does not grant) and node's child_process (libuv's
/// socketpair).
async fn runtimes_work_without_unix_sockets(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let code = r#"
import multiprocessing as mp, subprocess
def child(conn):
    conn.send(sum(map(abs, conn.recv())))
if __name__ == "__main__":
    print(subprocess.run(["/bin/echo", "sub"], capture_output=True, text=True).stdout.strip())
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        ours, theirs = ctx.Pipe()  # duplex: a socketpair
        p = ctx.Process(target=child, args=(theirs,))
        p.start()
        ours.send([-1, -2, 3])
        print(method, ours.recv())
        p.join()
"#;
    // A file, not -c: spawn's children import the main module.
    std::fs::write(ws.join("mp.py"), code).unwrap();
    let (o, out, err) = run(s, spec(&ws, &["/usr/bin/python3", "-I", "-S", "mp.py"])).await;
    assert!(o.success(), "{o:?} {err}");
    assert_eq!(out, "sub\nfork 6\nspawn 6\n", "{err}");
    let node = "/usr/bin/node";
    if !std::path::Path::new(node).exists() {
        eprintln!("SKIPPED the node part: no {node}");
        return;
    }
    let js = "const cp = require('child_process');\
              process.stdout.write(cp.execFileSync('/bin/echo', ['node-child']));\
              cp.spawn('/bin/cat', [], { stdio: ['pipe', 'inherit', 'inherit'] }).stdin.end('piped\\n');";
    let (o, out, err) = run(s, spec(&ws, &[node, "-e", js])).await;
    assert!(o.success(), "{o:?} {err}");
    assert_eq!(out, "node-child\npiped\n", "{err}");
}

/// Tier A has its own cgroup namespace rooted at the step's cgroup: the host's
/// hierarchy (the service's unit, sibling steps' names) does not show.
async fn cgroup_namespace_root(s: &Sandbox, _tier: Tier) {
    let ws = Workspace::new(s);
    let (o, out, err) = run(s, spec(&ws, &["/bin/cat", "/proc/self/cgroup"])).await;
    assert!(o.success(), "{o:?} {err}");
    assert!(!out.is_empty());
    for line in out.lines() {
        assert!(line.ends_with(":/"), "{line} in {out}");
    }
}

both_tiers!(
    vsock_refused,
    host_unix_socket_unreachable,
    socketpair_works,
    runtimes_work_without_unix_sockets,
);
tier_a_only!(cgroup_namespace_root);
