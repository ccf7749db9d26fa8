//! WAN profiles for the lab: link conditions (rate, loss, and delay where the kernel has netem)
//! on the DERP host's link, both directions, so that DERP is far and lossy while the peer relay on the `server` host
//! stays near — the case from the field that motivates peer relays.

use std::fmt;
use std::str::FromStr;

use crate::error::{LabError, Result};
use crate::netns::Netns;
use crate::topology::{HOST_IF, ROUTER};

/// The lab host whose link a profile shapes.
pub const FAR_HOST: &str = "relay";

/// Link conditions on the DERP host's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanProfile {
    /// No shaping (the default).
    None,
    /// A DERP server far away over a bad link: at most 4 Mbit/s and 1 % random loss each way,
    /// plus 120 ms ± 30 ms each way where the kernel has `sch_netem`.
    LongHaul,
}

/// How the shaping was done (kernels without `sch_netem` get no delay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shaping {
    None,
    /// netem: delay, jitter, loss and rate.
    Netem,
    /// tbf for the rate and an nftables rule for the loss; no delay.
    RateAndLoss,
}

const RATE: &str = "4mbit";
const LOSS_PERCENT: u32 = 1;
/// The nftables table that drops packets at random on the shaped link.
const LOSS_TABLE: &str = "tern_wan";

impl fmt::Display for WanProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WanProfile::None => "none",
            WanProfile::LongHaul => "long-haul",
        })
    }
}

impl FromStr for WanProfile {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(WanProfile::None),
            "long-haul" => Ok(WanProfile::LongHaul),
            other => Err(LabError::Invalid(format!(
                "unknown WAN profile `{other}`: use none or long-haul"
            ))),
        }
    }
}

/// Applies `profile` to lab `prefix`: the DERP host's egress (`eth0` in `relay`) and the router's
/// egress towards it (its port named `relay`).
pub fn apply(prefix: &str, profile: WanProfile) -> Result<Shaping> {
    let links = [
        (format!("{prefix}-{FAR_HOST}"), HOST_IF.to_string()),
        (format!("{prefix}-{ROUTER}"), FAR_HOST.to_string()),
    ];
    let mut shaping = Shaping::None;
    for (ns, dev) in links {
        let ns = Netns::open(&ns)?;
        clear(&ns, &dev);
        if profile == WanProfile::LongHaul {
            shaping = shape(&ns, &dev)?;
        }
    }
    Ok(shaping)
}

fn clear(ns: &Netns, dev: &str) {
    // Nothing to delete is fine: the link is unshaped either way.
    let _ = ns.exec_unchecked(&["tc", "qdisc", "del", "dev", dev, "root"]);
    let _ = ns.nft_apply(&format!("delete table inet {LOSS_TABLE}\n"));
}

fn shape(ns: &Netns, dev: &str) -> Result<Shaping> {
    let loss = format!("{LOSS_PERCENT}%");
    let netem = [
        "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", "120ms", "30ms", "loss",
        &loss, "rate", RATE,
    ];
    if ns.exec(&netem).is_ok() {
        return Ok(Shaping::Netem);
    }
    ns.exec(&[
        "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", RATE, "burst", "32kbit",
        "latency", "400ms",
    ])?;
    ns.nft_apply(&format!(
        "table inet {LOSS_TABLE} {{\n  chain out {{\n    type filter hook postrouting priority 0; policy accept;\n    oifname \"{dev}\" numgen random mod 100 < {LOSS_PERCENT} drop\n  }}\n}}\n"
    ))?;
    Ok(Shaping::RateAndLoss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_print_and_shape() {
        for p in [WanProfile::None, WanProfile::LongHaul] {
            assert_eq!(p.to_string().parse::<WanProfile>().unwrap(), p);
        }
        assert!("lunar".parse::<WanProfile>().is_err());
    }
}
