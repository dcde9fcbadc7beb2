//! A throwaway PostgreSQL 15 cluster on a free loopback port.
//!
//! - Binaries from `/usr/lib/postgresql/15/bin` (or `$KILN_PG_BIN`).
//! - Postgres refuses to run as root, and tests run as root here: the server runs as
//!   the `postgres` user (through `setpriv`) in a temporary directory it owns, which
//!   also holds its unix socket; it listens on 127.0.0.1 only, with `fsync=off` (a
//!   test cluster's data is worth nothing after the test).
//! - `initdb` takes seconds, so one initdb'd template is kept per machine in
//!   `$TMPDIR/kiln-testkit-pg15-template` and copied for each cluster.
//! - The cluster must die with the test process, however it ends (nextest runs every
//!   test in a process of its own, and statics are never dropped): a supervisor shell
//!   owns the server and stops it (and removes its directory) when its stdin, a pipe
//!   from the test process, closes. The same pipe carries `stop`/`start` for
//!   [`Cluster::stop`] and [`Cluster::start_again`].

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `postgres` user's name.
const PG_USER: &str = "postgres";

/// Keeps the server running until stopped or the supervisor's stdin closes. The
/// server is started and stopped by the commands read on stdin.
const SUPERVISOR: &str = r#"
bin=$1 dir=$2 port=$3
start() {
    "$bin/postgres" -D "$dir/data" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 \
        -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        -c max_connections=300 -c shared_buffers=16MB >>"$dir/log" 2>&1 &
    pid=$!
}
stop() { kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
start
while read -r cmd; do
    case "$cmd" in
        stop) stop; echo stopped ;;
        start) start; echo started ;;
    esac
done
stop
rm -rf "$dir"
"#;

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    control: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    _supervisor: Child,
}

impl Cluster {
    /// Starts a cluster, or says why it cannot (binaries missing, no `postgres` user,
    /// a server that did not come up).
    pub fn start() -> Result<Self, String> {
        let bin = std::env::var_os("KILN_PG_BIN").map_or_else(
            || PathBuf::from("/usr/lib/postgresql/15/bin"),
            PathBuf::from,
        );
        if !bin.join("postgres").is_file() || !bin.join("initdb").is_file() {
            return Err(format!(
                "no PostgreSQL binaries in {} (run `make postgres`)",
                bin.display()
            ));
        }
        let user = RunAs::find()?;
        let template = template(&bin, &user)?;
        let base = tempfile::Builder::new()
            .prefix("kiln-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?
            .keep();
        let data = base.join("data");
        run(Command::new("cp").arg("-a").arg(&template).arg(&data))?;
        user.chown(&base)?;
        let port = free_port()?;
        let mut supervisor = user
            .command("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("supervisor")
            .arg(&bin)
            .arg(&base)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start the cluster supervisor: {e}"))?;
        let stdin = supervisor.stdin.take().expect("piped");
        let stdout = BufReader::new(supervisor.stdout.take().expect("piped"));
        let cluster = Self {
            port,
            bin,
            dir: base,
            control: Mutex::new((stdin, stdout)),
            _supervisor: supervisor,
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's URL of the `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut); the data stays.
    pub fn stop(&self) {
        self.command("stop", "stopped");
    }

    /// Starts a stopped server again on the same port, and waits until it accepts
    /// connections.
    pub fn start_again(&self) -> Result<(), String> {
        self.command("start", "started");
        self.wait_ready()
    }

    fn command(&self, command: &str, ack: &str) {
        let mut control = self.control.lock().expect("control");
        writeln!(control.0, "{command}").expect("supervisor alive");
        control.0.flush().expect("supervisor alive");
        let mut line = String::new();
        control.1.read_line(&mut line).expect("supervisor answers");
        assert_eq!(line.trim(), ack, "supervisor's answer to {command}");
    }

    /// Polls `pg_isready` (which also waits out "the database system is starting up").
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                return Err(format!("the test cluster did not start:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Who runs the server: `postgres` when we are root, else ourselves.
#[derive(Debug)]
struct RunAs {
    /// uid and gid to switch to, when root.
    ids: Option<(u32, u32)>,
}

impl RunAs {
    fn find() -> Result<Self, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(Self { ids: None });
        }
        let user = nix::unistd::User::from_name(PG_USER)
            .map_err(|e| format!("look up user {PG_USER}: {e}"))?
            .ok_or_else(|| format!("no `{PG_USER}` user to run the server as (root cannot)"))?;
        Ok(Self {
            ids: Some((user.uid.as_raw(), user.gid.as_raw())),
        })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self.ids {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn chown(&self, path: &Path) -> Result<(), String> {
        match self.ids {
            Some((uid, gid)) => run(Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(path)),
            None => Ok(()),
        }
    }
}

/// The machine's initdb'd template, made once. Concurrent first runs each initdb into
/// a directory of their own; the first rename wins and the others use it.
fn template(bin: &Path, user: &RunAs) -> Result<PathBuf, String> {
    let template = std::env::temp_dir().join("kiln-testkit-pg15-template");
    if template.join("PG_VERSION").is_file() {
        return Ok(template);
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-pg-initdb-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    user.chown(scratch.path())?;
    let data = scratch.path().join("data");
    let out = user
        .command(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            PG_USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .output()
        .map_err(|e| format!("run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if std::fs::rename(&data, &template).is_err() && !template.join("PG_VERSION").is_file() {
        return Err(format!(
            "could not keep the template in {}",
            template.display()
        ));
    }
    Ok(template)
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
