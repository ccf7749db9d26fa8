//! Short text forms of numbers, times and durations, for narrow columns.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Placeholder for "not known (yet)": the first snapshot has no rates.
pub const DASH: &str = "–";

/// RFC 3339 text → Unix seconds; `None` when absent or unreadable.
pub fn unix(rfc3339: Option<&str>) -> Option<f64> {
    let t = OffsetDateTime::parse(rfc3339?, &Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// `12:04:07` (UTC) for Unix seconds.
pub fn clock(unix_secs: f64) -> String {
    match OffsetDateTime::from_unix_timestamp(unix_secs.floor() as i64) {
        Ok(t) => format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()),
        Err(_) => DASH.into(),
    }
}

/// `4s`, `12m`, `3h`, `2d`: how long ago, in the largest whole unit.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m", s / 60),
        6000..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Age of an RFC 3339 time at `now`, or `–`.
pub fn age_of(at: Option<&str>, now: f64) -> String {
    unix(at).map_or_else(|| DASH.into(), |t| age(now - t))
}

/// `0.6ms`, `18ms`, `1.2s`.
pub fn latency(ms: Option<f64>) -> String {
    match ms {
        None => DASH.into(),
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) if ms < 1000.0 => format!("{ms:.0}ms"),
        Some(ms) => format!("{:.1}s", ms / 1000.0),
    }
}

/// `12.4M`, `310K`, `20`: SI-ish with one decimal below 100, for bytes and packets.
pub fn qty(n: f64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = n.max(0.0);
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0}")
    } else if v < 100.0 {
        format!("{v:.1}{}", UNITS[unit])
    } else {
        format!("{v:.0}{}", UNITS[unit])
    }
}

/// A rate per second, or `–` before two snapshots exist.
pub fn rate(per_sec: Option<f64>) -> String {
    per_sec.map_or_else(|| DASH.into(), |r| format!("{}/s", qty(r)))
}

/// Eight levels of a sparkline, lowest first.
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The newest `width` samples as a sparkline scaled to their own min..max; gaps (`None`) are
/// blanks so a lost answer is visible.
pub fn sparkline(samples: &[Option<f64>], width: usize) -> String {
    let tail = &samples[samples.len().saturating_sub(width)..];
    let known = tail.iter().flatten();
    let (lo, hi) = known.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    tail.iter()
        .map(|s| match s {
            None => ' ',
            Some(v) if (hi - lo).abs() < f64::EPSILON => {
                if *v > 0.0 {
                    SPARK[3]
                } else {
                    SPARK[0]
                }
            }
            Some(v) => SPARK[(((v - lo) / (hi - lo)) * 7.0).round() as usize],
        })
        .collect()
}

/// Cut `s` to `width` characters, marking the cut with `…`.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_rates() {
        assert_eq!(qty(0.0), "0");
        assert_eq!(qty(999.0), "999");
        assert_eq!(qty(12_400_000.0), "12.4M");
        assert_eq!(qty(310_000.0), "310K");
        assert_eq!(rate(None), "–");
        assert_eq!(rate(Some(1500.0)), "1.5K/s");
    }

    #[test]
    fn latencies_and_ages() {
        assert_eq!(latency(Some(0.64)), "0.6ms");
        assert_eq!(latency(Some(18.2)), "18ms");
        assert_eq!(latency(Some(1234.0)), "1.2s");
        assert_eq!(age(5.0), "5s");
        assert_eq!(age(600.0), "10m");
        assert_eq!(age(7200.0), "2h");
        assert_eq!(age_of(Some("garbage"), 0.0), "–");
    }

    #[test]
    fn times_parse_and_print_in_utc() {
        let t = unix(Some("2026-11-22T12:04:07Z")).unwrap();
        assert_eq!(clock(t), "12:04:07");
        assert!(unix(None).is_none());
    }

    #[test]
    fn sparkline_scales_and_shows_gaps() {
        let s = sparkline(&[Some(1.0), None, Some(2.0), Some(3.0)], 3);
        assert_eq!(s, " ▁█");
        assert_eq!(sparkline(&[Some(0.0), Some(0.0)], 8), "▁▁");
        assert_eq!(sparkline(&[], 4), "");
    }

    #[test]
    fn fit_marks_cuts() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }
}
