//! The JSON form of a peer relay server endpoint (Go `net/udprelay/endpoint.ServerEndpoint`), as
//! shown by `tailscale debug peer-relay-sessions`-style tooling, and its relation to the disco
//! [`UdpRelayEndpoint`]. Durations use Go's text form (`30s`, `5m0s`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::disco::UdpRelayEndpoint;
use crate::keys::DiscoPublic;

/// A relay server endpoint allocation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServerEndpoint {
    pub server_disco: DiscoPublic,
    #[serde(default)]
    pub client_disco: [DiscoPublic; 2],
    #[serde(rename = "LamportID")]
    pub lamport_id: u64,
    pub addr_ports: Vec<SocketAddr>,
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(with = "go_duration")]
    pub bind_lifetime: Duration,
    #[serde(with = "go_duration")]
    pub steady_state_lifetime: Duration,
}

impl From<ServerEndpoint> for UdpRelayEndpoint {
    fn from(e: ServerEndpoint) -> Self {
        UdpRelayEndpoint {
            server_disco: e.server_disco,
            client_disco: e.client_disco,
            lamport_id: e.lamport_id,
            vni: e.vni,
            bind_lifetime: e.bind_lifetime,
            steady_state_lifetime: e.steady_state_lifetime,
            addr_ports: e.addr_ports,
        }
    }
}

impl From<UdpRelayEndpoint> for ServerEndpoint {
    fn from(e: UdpRelayEndpoint) -> Self {
        ServerEndpoint {
            server_disco: e.server_disco,
            client_disco: e.client_disco,
            lamport_id: e.lamport_id,
            addr_ports: e.addr_ports,
            vni: e.vni,
            bind_lifetime: e.bind_lifetime,
            steady_state_lifetime: e.steady_state_lifetime,
        }
    }
}

/// Go `time.Duration` text: `String()` to write, `time.ParseDuration` (non-negative) to read.
pub mod go_duration {
    use super::*;

    /// Serde adapter: write.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format(*d))
    }

    /// Serde adapter: read.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Formats like Go's `Duration.String`: `0s`, `1.5µs`, `100ms`, `30s`, `5m0s`, `1h0m0s`.
    pub fn format(d: Duration) -> String {
        let nanos = d.as_nanos();
        if nanos == 0 {
            return "0s".to_string();
        }
        if nanos < 1_000_000_000 {
            let (unit_nanos, unit) = match nanos {
                n if n < 1_000 => (1, "ns"),
                n if n < 1_000_000 => (1_000, "µs"),
                _ => (1_000_000, "ms"),
            };
            return format!("{}{unit}", decimal(nanos, unit_nanos));
        }
        let hours = nanos / 3_600_000_000_000;
        let minutes = (nanos / 60_000_000_000) % 60;
        let seconds = decimal(nanos % 60_000_000_000, 1_000_000_000);
        match (hours, minutes) {
            (0, 0) => format!("{seconds}s"),
            (0, m) => format!("{m}m{seconds}s"),
            (h, m) => format!("{h}h{m}m{seconds}s"),
        }
    }

    /// `value / unit` with the fraction's trailing zeros removed.
    fn decimal(value: u128, unit: u128) -> String {
        let whole = value / unit;
        let frac = value % unit;
        if frac == 0 {
            return whole.to_string();
        }
        let width = unit.ilog10() as usize;
        let digits = format!("{frac:0width$}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }

    /// Why a duration string is not accepted.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("invalid Go duration {0:?}")]
    pub struct DurationError(pub String);

    /// Parses Go duration text (`1h2m3.5s`, `300ms`, `0`); negative values are rejected.
    pub fn parse(text: &str) -> Result<Duration, DurationError> {
        let err = || DurationError(text.to_string());
        let body = text.strip_prefix('+').unwrap_or(text);
        if body == "0" {
            return Ok(Duration::ZERO);
        }
        if body.is_empty() {
            return Err(err());
        }
        let mut rest = body;
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(err)?;
            let (number, tail) = rest.split_at(num_len);
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(err()),
            };
            total = total
                .checked_add(scaled(number, unit_nanos).ok_or_else(err)?)
                .ok_or_else(err)?;
            rest = tail;
        }
        // Go durations are int64 nanoseconds.
        let nanos = u64::try_from(total).ok().filter(|n| *n <= i64::MAX as u64);
        nanos.map(Duration::from_nanos).ok_or_else(err)
    }

    /// `number` (digits with an optional fraction) times `unit_nanos`, truncated to whole ns.
    fn scaled(number: &str, unit_nanos: u128) -> Option<u128> {
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return None;
        }
        let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok(whole) || !digits_ok(frac) {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut value = whole.checked_mul(unit_nanos)?;
        let mut scale = unit_nanos;
        for digit in frac.bytes() {
            scale /= 10;
            value = value.checked_add(u128::from(digit - b'0') * scale)?;
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn relay_server_endpoint_json_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/disco.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = v["relay_server_endpoint_json"]["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 7);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let json = case["json"].as_str().unwrap();
            let got = serde_json::from_str::<ServerEndpoint>(json);
            assert_eq!(
                got.is_err(),
                case["want_error"].as_bool().unwrap(),
                "{name}: {got:?}"
            );
            if let Ok(ep) = got {
                assert_eq!(ep.lamport_id, u64::MAX);
                assert_eq!(ep.vni, 16_777_215);
                assert_eq!(ep.bind_lifetime, Duration::from_secs(30));
                assert_eq!(ep.steady_state_lifetime, Duration::from_secs(300));
                assert_eq!(ep.addr_ports.len(), 2);
                assert_eq!(ep.client_disco, [DiscoPublic::zero(); 2]);
                // Round trip through our own JSON (Go's field names and duration text).
                let again = serde_json::to_string(&ep).unwrap();
                assert!(again.contains("\"BindLifetime\":\"30s\""), "{again}");
                assert!(
                    again.contains("\"SteadyStateLifetime\":\"5m0s\""),
                    "{again}"
                );
                assert_eq!(serde_json::from_str::<ServerEndpoint>(&again).unwrap(), ep);
                let disco: UdpRelayEndpoint = ep.clone().into();
                assert_eq!(ServerEndpoint::from(disco), ep);
            }
        }
    }

    #[test]
    fn go_duration_text() {
        use go_duration::{format, parse};
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ns"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1_500), "1.5s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(300), "5m0s"),
            (Duration::from_secs(3_723), "1h2m3s"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(parse(text), Ok(d), "{text}");
        }
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2us"), Ok(Duration::from_micros(2)));
        for bad in [
            "",
            "5",
            "s",
            "1x",
            "-1s",
            "1..2s",
            ".s",
            "99999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must not parse");
        }
    }
}
