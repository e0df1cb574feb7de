//! Medians of the runs of each VMM and a markdown table with nixvmm/QEMU ratios.

use std::time::Duration;

use crate::measure::Sample;

/// The runs of one VMM configuration.
pub struct Row {
    pub name: String,
    pub accel: String,
    pub samples: Vec<Sample>,
    /// Why this row has no numbers, if it has none.
    pub failure: Option<String>,
}

/// The median of the values present, if any run produced one.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

/// The medians of a row: first output, marker, exit (ms), peak RSS (MiB).
pub fn medians(row: &Row) -> [Option<f64>; 4] {
    let ok: Vec<&Sample> = row.samples.iter().filter(|s| !s.timed_out).collect();
    [
        median(ok.iter().filter_map(|s| ms(s.first_output)).collect()),
        median(ok.iter().filter_map(|s| ms(s.marker)).collect()),
        median(ok.iter().filter_map(|s| ms(s.exit)).collect()),
        median(
            ok.iter()
                .filter_map(|s| s.peak_rss_kib.map(|k| k as f64 / 1024.0))
                .collect(),
        ),
    ]
}

fn cell(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

/// The table: one line per VMM, then one ratio line per QEMU row.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| VMM | accel | runs ok | start → first output (ms) | start → marker (ms) | start → exit (ms) | peak RSS (MiB) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let m = medians(row);
        let ok = row
            .samples
            .iter()
            .filter(|s| !s.timed_out && s.marker.is_some())
            .count();
        let runs = match &row.failure {
            Some(why) => format!("0/{} ({why})", row.samples.len()),
            None => format!("{ok}/{}", row.samples.len()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.name,
            row.accel,
            runs,
            cell(m[0]),
            cell(m[1]),
            cell(m[2]),
            cell(m[3])
        ));
    }
    let (ours, theirs): (Vec<&Row>, Vec<&Row>) =
        rows.iter().partition(|r| r.name.starts_with("nixvmm"));
    for nixvmm in &ours {
        let ours = medians(nixvmm);
        for other in &theirs {
            let theirs = medians(other);
            let ratio = |i: usize| match (ours[i], theirs[i]) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                _ => "–".into(),
            };
            out.push_str(&format!(
                "| **{} / {}** | | | {} | {} | {} | {} |\n",
                nixvmm.name,
                other.name,
                ratio(0),
                ratio(1),
                ratio(2),
                ratio(3)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ms: u64, rss: u64) -> Sample {
        Sample {
            first_output: Some(Duration::from_millis(ms)),
            marker: Some(Duration::from_millis(ms * 2)),
            exit: Some(Duration::from_millis(ms * 3)),
            peak_rss_kib: Some(rss * 1024),
            exit_code: Some(0),
            timed_out: false,
        }
    }

    #[test]
    fn medians_ignore_timeouts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let mut timed_out = sample(1000, 1);
        timed_out.timed_out = true;
        let row = Row {
            name: "x".into(),
            accel: "kvm".into(),
            samples: vec![sample(10, 5), sample(30, 7), timed_out],
            failure: None,
        };
        assert_eq!(
            medians(&row),
            [Some(20.0), Some(40.0), Some(60.0), Some(6.0)]
        );
    }

    #[test]
    fn table_has_ratios() {
        let rows = [
            Row {
                name: "nixvmm".into(),
                accel: "kvm".into(),
                samples: vec![sample(10, 4)],
                failure: None,
            },
            Row {
                name: "qemu -M pc".into(),
                accel: "tcg".into(),
                samples: vec![sample(100, 40)],
                failure: None,
            },
        ];
        let t = table(&rows);
        assert!(
            t.contains("| nixvmm | kvm | 1/1 | 10.0 | 20.0 | 30.0 | 4.0 |"),
            "{t}"
        );
        assert!(
            t.contains("| **nixvmm / qemu -M pc** | | | 0.100 | 0.100 | 0.100 | 0.100 |"),
            "{t}"
        );
    }
}
