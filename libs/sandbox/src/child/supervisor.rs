//! The supervisor loop: pid 1 of the sandbox (tier A) or a subreaper (tier B).

use super::{LIFELINE_FD, RECORD_EXIT, SIGNAL_FD, Stage, errno, exit, fail, record};
use crate::Tier;
use crate::plan::Plan;

/// Signals the supervisor takes from the service: TERM/INT/HUP/QUIT/USR2 are forwarded to
/// the program, USR1 means "kill the whole tree now". SIGCHLD wakes it up to reap.
const HANDLED: [i32; 7] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The signal the service sends to have the tree killed at once.
pub(crate) const KILL_TREE: i32 = libc::SIGUSR1;

pub(super) fn open_signalfd() {
    // SAFETY: a sigset on the stack and signalfd; the signals are blocked already (the
    // parent blocked everything before clone), so they queue for the signalfd.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in HANDLED {
            libc::sigaddset(&mut set, sig);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 || libc::dup3(fd, SIGNAL_FD, libc::O_CLOEXEC) < 0 {
            fail(Stage::Signals, 0, errno());
        }
        libc::close(fd);
    }
}

struct State<'p> {
    plan: &'p Plan<'p>,
    main: libc::pid_t,
    main_status: Option<i32>,
    parent: libc::pid_t,
}

impl State<'_> {
    /// Reaps whatever has exited, without blocking.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: out-pointer to a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if pid == self.main {
                self.main_status = Some(status);
            }
        }
    }

    /// Only the service may steer the supervisor. In tier A the service is outside the
    /// pid namespace, so its signals arrive with sender pid 0; the program, in the same
    /// namespace, shows up with its own pid and is ignored.
    fn sent_by_service(&self, info: &libc::signalfd_siginfo) -> bool {
        match self.plan.tier {
            Tier::A => info.ssi_pid == 0,
            _ => info.ssi_pid as libc::pid_t == self.parent,
        }
    }

    fn forward(&self, sig: i32) {
        // SAFETY: kill with integer arguments.
        unsafe {
            match self.plan.tier {
                // Every process of the namespace but ourselves.
                Tier::A => libc::kill(-1, sig),
                // The program's process group (it called setsid).
                _ => libc::kill(-self.main, sig),
            };
        }
    }

    /// Kills every descendant and reaps them all.
    fn kill_tree(&mut self) {
        match self.plan.tier {
            Tier::A => {
                // SAFETY: as pid 1 with capabilities in the namespace, -1 reaches every
                // other process of the namespace, and nothing outside it.
                unsafe { libc::kill(-1, libc::SIGKILL) };
                self.reap_blocking(|| {});
            }
            _ => {
                // SAFETY: kill with integer arguments.
                unsafe { libc::kill(-self.main, libc::SIGKILL) };
                // Orphans (double-forked daemons included) are re-parented to us, the
                // subreaper: kill our children, reap one, repeat until none is left.
                self.reap_blocking(kill_children);
            }
        }
    }

    fn reap_blocking(&mut self, mut before_each_wait: impl FnMut()) {
        loop {
            before_each_wait();
            let mut status = 0;
            // SAFETY: out-pointer to a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return; // ECHILD: nobody left
            }
            if pid == self.main {
                self.main_status = Some(status);
            }
        }
    }

    fn finish(&mut self) -> ! {
        self.kill_tree();
        let status = self.main_status.unwrap_or(libc::SIGKILL);
        record(RECORD_EXIT, status as u32, 0, 0);
        exit(0)
    }
}

/// SIGKILLs every direct child listed in /proc/thread-self/children.
fn kill_children() {
    let path = b"/proc/thread-self/children\0";
    let mut buf = [0u8; 4096];
    // SAFETY: open/read/close into a stack buffer.
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return;
    }
    let mut pid: libc::pid_t = 0;
    for &b in &buf[..n as usize] {
        if b.is_ascii_digit() {
            pid = pid * 10 + (b - b'0') as libc::pid_t;
        } else {
            if pid > 0 {
                // SAFETY: kill with integer arguments.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            pid = 0;
        }
    }
}

pub(super) fn run(plan: &Plan<'_>, main: libc::pid_t) -> ! {
    let mut st = State {
        plan,
        main,
        main_status: None,
        // SAFETY: getppid cannot fail.
        parent: unsafe { libc::getppid() },
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: SIGNAL_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: LIFELINE_FD,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds on the stack.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && errno() != libc::EINTR {
            st.finish();
        }
        if fds[1].revents != 0 {
            // The service died (or dropped the step): nothing may outlive it.
            st.finish();
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: signalfd_siginfo is plain data; read fills it.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading one record into a local.
            let n = unsafe {
                libc::read(
                    SIGNAL_FD,
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n == size as isize {
                let sig = info.ssi_signo as i32;
                if sig != libc::SIGCHLD && st.sent_by_service(&info) {
                    if sig == KILL_TREE {
                        st.finish();
                    }
                    st.forward(sig);
                }
            }
        }
        st.reap();
        if st.main_status.is_some() {
            st.finish();
        }
    }
}
