//! The kernel settings a subnet router or exit node needs, checked and explained, never changed
//! silently (tailscaled only warns too: `CheckIPForwarding`, `CheckReversePathFiltering`).

use std::path::Path;

/// A sysctl under /proc/sys as a number (`None` if missing or unreadable).
fn read_number(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn proc_sys(key: &str) -> std::path::PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// What would keep forwarded traffic from flowing, each as a sentence that says what to set.
/// Empty when the host forwards (IPv4, and IPv6 when `ipv6`) and rp_filter is not strict.
pub fn forwarding_problems(ipv6: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if read_number(&proc_sys("net.ipv4.ip_forward")) != Some(1) {
        problems.push(
            "IPv4 forwarding is off, so advertised routes and the exit node carry nothing: run \
             `sysctl -w net.ipv4.ip_forward=1` (and put `net.ipv4.ip_forward = 1` in \
             /etc/sysctl.d/99-tern.conf to keep it)"
                .to_string(),
        );
    }
    let ipv6_on = proc_sys("net.ipv6").exists()
        && read_number(&proc_sys("net.ipv6.conf.all.disable_ipv6")) != Some(1);
    if ipv6 && ipv6_on && read_number(&proc_sys("net.ipv6.conf.all.forwarding")) != Some(1) {
        problems.push(
            "IPv6 forwarding is off: run `sysctl -w net.ipv6.conf.all.forwarding=1` (and put it \
             in /etc/sysctl.d/99-tern.conf)"
                .to_string(),
        );
    }
    let strict = [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
    ]
    .iter()
    .any(|k| read_number(&proc_sys(k)) == Some(1));
    if strict {
        problems.push(
            "strict reverse-path filtering (rp_filter=1) may drop forwarded replies: run \
             `sysctl -w net.ipv4.conf.all.rp_filter=2` (loose)"
                .to_string(),
        );
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_sys_path_follows_the_dotted_key() {
        assert_eq!(
            proc_sys("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
    }

    #[test]
    fn problems_match_the_kernel_settings() {
        let forward = read_number(&proc_sys("net.ipv4.ip_forward"));
        let problems = forwarding_problems(false);
        assert_eq!(
            forward == Some(1),
            !problems
                .iter()
                .any(|p| p.contains("IPv4 forwarding is off")),
            "{problems:?}"
        );
    }
}
