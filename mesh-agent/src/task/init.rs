//! The first process of a process task's PID namespace. PID 1 of a namespace gets no signal
//! it has no handler for (SIGTERM from `service rm` would be ignored by a plain program) and
//! inherits every orphan in the namespace; this tiny reaper takes that role, as Docker's
//! `--init` (tini) does: it starts the task's program, forwards every signal to it, reaps
//! orphans, and exits with the program's status (128 + N when signal N ended it).
//!
//! It is the agent's own binary run as `mesh-agent <INIT_ARG> -- PROGRAM ARGS…`, already inside
//! the task's namespaces and already stripped of its privileges.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt,
};

/// The hidden first argument that makes `mesh-agent` this reaper.
pub const INIT_ARG: &str = "__mesh-task-init";

/// Runs the reaper and never returns if the agent binary was started as one.
pub fn run_if_asked() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a.as_bytes()) != Some(INIT_ARG.as_bytes()) {
        return;
    }
    let program: Vec<CString> = args[2..]
        .iter()
        .skip_while(|a| a.as_bytes() == b"--")
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    std::process::exit(reap(&program));
}

fn reap(program: &[CString]) -> i32 {
    if program.is_empty() {
        eprintln!("mesh task init: nothing to run");
        return 127;
    }
    // SAFETY: plain system calls on local buffers; single-threaded at this point.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
        let child = libc::fork();
        if child < 0 {
            eprintln!("mesh task init: fork: {}", std::io::Error::last_os_error());
            return 126;
        }
        if child == 0 {
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            let mut argv: Vec<*const libc::c_char> = program.iter().map(|a| a.as_ptr()).collect();
            argv.push(std::ptr::null());
            libc::execvp(argv[0], argv.as_ptr());
            let e = std::io::Error::last_os_error();
            eprintln!("{}: {e}", program[0].to_string_lossy());
            libc::_exit(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
        loop {
            let sig = libc::sigwaitinfo(&all, std::ptr::null_mut());
            if sig < 0 {
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::kill(child, sig);
                continue;
            }
            loop {
                let mut status = 0;
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid <= 0 {
                    break;
                }
                if pid == child {
                    return if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        128 + libc::WTERMSIG(status)
                    };
                }
            }
        }
    }
}
