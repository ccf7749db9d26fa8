//! Durations as Go's `time.Duration.String` prints them (`850µs`, `1.2ms`, `1m2.5s`), for the
//! human text of `tern status`, `tern ping` and `tern netcheck`.

/// Milliseconds (as the JSON has them) to whole nanoseconds; negative or absurd values → 0.
pub fn ms_to_nanos(ms: f64) -> u64 {
    let ns = (ms * 1e6).round();
    if ns.is_finite() && ns >= 0.0 && ns < u64::MAX as f64 {
        ns as u64
    } else {
        0
    }
}

/// A duration rounded to a multiple of `round_to` nanoseconds, printed like Go's
/// `time.Duration.String`: `0s`, `850µs`, `1.2ms`, `12ms`, `1.234s`, `1m2.5s`, `1h0m0s`.
pub fn go_duration(nanos: u64, round_to: u64) -> String {
    let n = match round_to {
        0 | 1 => nanos,
        r => (nanos.saturating_add(r / 2) / r).saturating_mul(r),
    };
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    match n {
        0 => "0s".to_string(),
        n if n < US => format!("{n}ns"),
        n if n < MS => format!("{}µs", decimal(n, US)),
        n if n < S => format!("{}ms", decimal(n, MS)),
        n => {
            let hours = n / (3600 * S);
            let minutes = n / (60 * S) % 60;
            let seconds = decimal(n % (60 * S), S);
            match (hours, minutes) {
                (0, 0) => format!("{seconds}s"),
                (0, m) => format!("{m}m{seconds}s"),
                (h, m) => format!("{h}h{m}m{seconds}s"),
            }
        }
    }
}

/// `n / unit` with its fraction, trailing zeros dropped (`unit` a power of ten).
fn decimal(n: u64, unit: u64) -> String {
    let whole = n / unit;
    let frac = n % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = unit.ilog10() as usize;
    let frac = format!("{frac:0digits$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(0, 1_000_000), "0s");
        assert_eq!(go_duration(400_000, 1_000_000), "0s");
        assert_eq!(go_duration(12_400_000, 1_000_000), "12ms");
        assert_eq!(go_duration(1_234_000_000, 1_000_000), "1.234s");
        assert_eq!(go_duration(62_500_000_000, 1_000_000), "1m2.5s");
        assert_eq!(go_duration(3_600_000_000_000, 1), "1h0m0s");
        assert_eq!(go_duration(1_234_567, 100_000), "1.2ms");
        assert_eq!(go_duration(850_000, 100_000), "900µs");
        assert_eq!(go_duration(999, 1), "999ns");
        assert_eq!(ms_to_nanos(1.5), 1_500_000);
        assert_eq!(ms_to_nanos(-3.0), 0);
        assert_eq!(ms_to_nanos(f64::NAN), 0);
    }
}
