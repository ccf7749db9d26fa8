//! `tern netcheck`: asks the running data plane for a fresh netcheck and prints it like
//! `tailscale netcheck` (or as JSON).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::ping::api_error_text;
use crate::duration_text::{go_duration, ms_to_nanos};
use crate::localapi::Client;
use crate::report::{NetcheckReport, RegionLatency};

#[derive(Debug, Args)]
pub struct NetcheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `tern netcheck`.
pub fn run(socket: &Path, args: &NetcheckArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = match runtime.block_on(Client::new(socket).netcheck()) {
        Ok(report) => report,
        Err(e) => anyhow::bail!("{}", api_error_text(&e)),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human report, in the layout of `tailscale netcheck`, plus our endpoints.
pub fn format_report(report: &NetcheckReport) -> String {
    let mut out = String::from("\nReport:\n");
    let mut line = |text: String| {
        let _ = writeln!(out, "\t* {text}");
    };
    line(format!("Time: {}", report.at));
    line(format!("UDP: {}", report.udp));
    line(match &report.global_v4 {
        Some(addr) => format!("IPv4: yes, {addr}"),
        None => "IPv4: (no addr found)".into(),
    });
    line(match (&report.global_v6, report.ipv6, report.os_has_ipv6) {
        (Some(addr), _, _) => format!("IPv6: yes, {addr}"),
        (None, true, _) => "IPv6: (no addr found)".into(),
        (None, false, true) => "IPv6: no, but OS has support".into(),
        (None, false, false) => "IPv6: no, unavailable in OS".into(),
    });
    // Go prints an unset opt.Bool as the empty string.
    let varies = report
        .mapping_varies_by_dest_ip
        .map(|v| v.to_string())
        .unwrap_or_default();
    line(format!("MappingVariesByDestIP: {varies}"));
    line("PortMapping: not checked".into());
    out.push_str(&derp_section(report));
    if !report.endpoints.is_empty() {
        let _ = writeln!(out, "\t* Endpoints:");
        for ep in &report.endpoints {
            let _ = writeln!(out, "\t\t- {} ({})", ep.addr, ep.kind);
        }
    }
    out
}

fn derp_section(report: &NetcheckReport) -> String {
    let mut out = String::new();
    if report.regions.iter().all(|r| r.latency_ms.is_none()) {
        let _ = writeln!(
            out,
            "\t* Nearest DERP: unknown (no response to latency probes)"
        );
        return out;
    }
    let nearest = match report.preferred_derp {
        0 => "[none]".to_string(),
        id => match report.regions.iter().find(|r| r.id == id) {
            Some(region) => region.name.clone(),
            None => format!("{id} (region not found in map)"),
        },
    };
    let _ = writeln!(out, "\t* Nearest DERP: {nearest}");
    let _ = writeln!(out, "\t* DERP latency:");
    for region in by_latency(&report.regions) {
        let latency = region
            .latency_ms
            .map(|ms| go_duration(ms_to_nanos(ms), 100_000))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "\t\t- {:>3}: {latency:<7} ({})",
            region.code, region.name
        );
    }
    out
}

/// Answered regions fastest first, then the silent ones by id.
fn by_latency(regions: &[RegionLatency]) -> Vec<&RegionLatency> {
    let mut sorted: Vec<&RegionLatency> = regions.iter().collect();
    sorted.sort_by(|a, b| match (a.latency_ms, b.latency_ms) {
        (Some(x), Some(y)) => x.total_cmp(&y).then(a.id.cmp(&b.id)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.id.cmp(&b.id),
    });
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::EndpointReport;

    fn region(id: u16, code: &str, name: &str, latency_ms: Option<f64>) -> RegionLatency {
        RegionLatency {
            id,
            code: code.into(),
            name: name.into(),
            latency_ms,
        }
    }

    fn report() -> NetcheckReport {
        NetcheckReport {
            at: "2026-11-22T06:00:00Z".into(),
            udp: true,
            ipv4: true,
            global_v4: Some("198.18.0.3:41641".into()),
            ipv6: false,
            global_v6: None,
            os_has_ipv6: true,
            mapping_varies_by_dest_ip: Some(false),
            preferred_derp: 900,
            regions: vec![
                region(901, "far", "Far DERP", Some(25.04)),
                region(902, "off", "Silent DERP", None),
                region(900, "lab", "Lab DERP", Some(1.234)),
            ],
            endpoints: vec![
                EndpointReport {
                    addr: "10.0.1.2:41641".into(),
                    kind: "local".into(),
                },
                EndpointReport {
                    addr: "198.18.0.3:41641".into(),
                    kind: "stun".into(),
                },
            ],
        }
    }

    #[test]
    fn report_reads_like_tailscale_netcheck() {
        let text = format_report(&report());
        let expected = "\nReport:\n\
            \t* Time: 2026-11-22T06:00:00Z\n\
            \t* UDP: true\n\
            \t* IPv4: yes, 198.18.0.3:41641\n\
            \t* IPv6: no, but OS has support\n\
            \t* MappingVariesByDestIP: false\n\
            \t* PortMapping: not checked\n\
            \t* Nearest DERP: Lab DERP\n\
            \t* DERP latency:\n\
            \t\t- lab: 1.2ms   (Lab DERP)\n\
            \t\t- far: 25ms    (Far DERP)\n\
            \t\t- off:         (Silent DERP)\n\
            \t* Endpoints:\n\
            \t\t- 10.0.1.2:41641 (local)\n\
            \t\t- 198.18.0.3:41641 (stun)\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn report_without_udp_or_ipv6_says_so() {
        let mut r = report();
        r.udp = false;
        r.ipv4 = false;
        r.global_v4 = None;
        r.os_has_ipv6 = false;
        r.mapping_varies_by_dest_ip = None;
        r.preferred_derp = 0;
        for region in &mut r.regions {
            region.latency_ms = None;
        }
        r.endpoints.clear();
        let text = format_report(&r);
        assert!(text.contains("\t* UDP: false\n"), "{text}");
        assert!(text.contains("\t* IPv4: (no addr found)\n"), "{text}");
        assert!(text.contains("\t* IPv6: no, unavailable in OS\n"), "{text}");
        assert!(text.contains("\t* MappingVariesByDestIP: \n"), "{text}");
        assert!(
            text.contains("\t* Nearest DERP: unknown (no response to latency probes)\n"),
            "{text}"
        );
        assert!(!text.contains("DERP latency"), "{text}");
        assert!(!text.contains("Endpoints"), "{text}");
    }

    #[test]
    fn nearest_region_missing_from_the_map_is_named_by_id() {
        let mut r = report();
        r.preferred_derp = 999;
        assert!(format_report(&r).contains("\t* Nearest DERP: 999 (region not found in map)\n"));
        r.preferred_derp = 0;
        assert!(format_report(&r).contains("\t* Nearest DERP: [none]\n"));
    }
}
