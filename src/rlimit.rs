//! The open-file limit. Servers that face the internet hold one descriptor per connection, and
//! the usual soft limit (1024) is far below what the hard limit allows, so `tern derp` and
//! `tern daemon` raise the soft limit to the hard one at start.

/// Soft and hard `RLIMIT_NOFILE` before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    pub old_soft: u64,
    pub new_soft: u64,
    pub hard: u64,
}

/// The current soft and hard `RLIMIT_NOFILE`.
pub fn nofile() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (nothing to do when they are equal).
pub fn raise_nofile() -> std::io::Result<NofileLimits> {
    let (old_soft, hard) = nofile()?;
    if old_soft < hard {
        let limit = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (new_soft, hard) = nofile()?;
    Ok(NofileLimits {
        old_soft,
        new_soft,
        hard,
    })
}

/// [`raise_nofile`], with the outcome logged; a failure is a warning, not fatal (the server
/// still works, it only holds fewer connections).
pub fn raise_nofile_logged() {
    match raise_nofile() {
        Ok(l) if l.old_soft == l.new_soft => {
            tracing::info!(soft = l.new_soft, hard = l.hard, "open-file limit")
        }
        Ok(l) => tracing::info!(
            from = l.old_soft,
            to = l.new_soft,
            hard = l.hard,
            "raised the open-file limit"
        ),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_brings_soft_to_hard() {
        let limits = raise_nofile().expect("setrlimit up to the hard limit is always allowed");
        assert_eq!(limits.new_soft, limits.hard);
        assert!(limits.new_soft >= limits.old_soft);
        assert_eq!(nofile().unwrap(), (limits.hard, limits.hard));
    }
}
