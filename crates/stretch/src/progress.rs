//! What a running pipeline shows besides its lines: the core's progress events folded
//! into rows (one per counter, one per host at work), and the few lines worth keeping
//! (a finished batch). The terminal's bars (`printer.rs`) and the web view's run page
//! draw the same rows.

use serde::{Deserialize, Serialize};
use stretch_core::log::{BatchProgress, Event, HostState, Progress, Unit};

/// The rows of the stage that runs.
#[derive(Debug, Default)]
pub struct Board {
    pub stage: Option<String>,
    /// Counters not ended yet, in the order they first reported.
    tasks: Vec<Progress>,
    /// Every host heard of in this stage, in the order first heard of.
    hosts: Vec<Host>,
    batch: Option<BatchProgress>,
    /// A batch ran in this stage: between two, the next batch's row is all there is.
    batched: bool,
}

#[derive(Debug, Clone)]
struct Host {
    group: String,
    name: String,
    state: HostState,
}

/// One row: a counter (a bar, or a spinner while its total is unknown) or a host.
/// The server sends rows as JSON, and `--server` mode draws them as they come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Stable while the row lives: which bar to update.
    pub key: String,
    pub label: String,
    /// What it says: sizes, counts, a host's state.
    pub text: String,
    /// 0 to 100 where known.
    pub percent: Option<u64>,
    /// The counter behind a row (unit, done, total), for a bar's rate and estimate.
    pub counter: Option<(Unit, u64, Option<u64>)>,
    /// A failed host: its row is kept as a line when the stage fails.
    pub failed: bool,
}

impl Board {
    /// Fold one event in. Returns a line to keep in the scrollback, if any.
    pub fn apply(&mut self, event: &Event) -> Option<String> {
        match event {
            Event::StageStarted { stage } => {
                *self = Board {
                    stage: Some(stage.clone()),
                    ..Board::default()
                };
                None
            }
            Event::StageFinished { .. } => {
                *self = Board::default();
                None
            }
            Event::Progress(p) => {
                let at = self.tasks.iter().position(|t| t.task == p.task);
                match (at, p.ended) {
                    (Some(i), true) => {
                        self.tasks.remove(i);
                    }
                    (Some(i), false) => self.tasks[i] = p.clone(),
                    (None, false) => self.tasks.push(p.clone()),
                    (None, true) => {}
                }
                None
            }
            Event::Host(h) => {
                let at = self
                    .hosts
                    .iter()
                    .position(|x| x.group == h.group && x.name == h.host);
                let host = Host {
                    group: h.group.clone(),
                    name: h.host.clone(),
                    state: h.state.clone(),
                };
                match at {
                    Some(i) => self.hosts[i] = host,
                    None => self.hosts.push(host),
                }
                None
            }
            Event::Batch(b) => match b.ok {
                None => {
                    self.batch = Some(b.clone());
                    self.batched = true;
                    None
                }
                Some(ok) => {
                    self.batch = None;
                    Some(batch_line(b, ok, &self.hosts))
                }
            },
            Event::Line { .. } | Event::RunStarted { .. } => None,
        }
    }

    /// What to draw now.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self.tasks.iter().map(counter_row).collect();
        if let Some(b) = &self.batch {
            rows.push(Row {
                key: "batch".into(),
                label: format!("{} batch {}/{}", b.group, b.n, b.of),
                text: format!("{} host(s)", b.hosts.len()),
                percent: None,
                counter: None,
                failed: false,
            });
            for name in &b.hosts {
                let state = self
                    .hosts
                    .iter()
                    .find(|h| h.group == b.group && &h.name == name)
                    .map_or(HostState::Waiting, |h| h.state.clone());
                rows.push(host_row(&b.group, name, &state));
            }
            return rows;
        }
        if self.hosts.is_empty() || self.batched {
            return rows;
        }
        // No batch (specs going out, an apply): a count, and the hosts still at work
        // or failed; fifty hosts that are ready need no row each.
        let ready = self
            .hosts
            .iter()
            .filter(|h| {
                matches!(
                    h.state,
                    HostState::Ready | HostState::Switched | HostState::SwitchedBack
                )
            })
            .count();
        let total = self.hosts.len() as u64;
        rows.push(Row {
            key: "hosts".into(),
            label: "hosts".into(),
            text: format!("{ready} of {total} done"),
            percent: Some(ready as u64 * 100 / total.max(1)),
            counter: None,
            failed: false,
        });
        for h in &self.hosts {
            if matches!(
                h.state,
                HostState::Preparing
                    | HostState::Pulling { .. }
                    | HostState::Switching
                    | HostState::Checking { .. }
                    | HostState::Failed(_)
            ) {
                rows.push(host_row(&h.group, &h.name, &h.state));
            }
        }
        rows
    }

    /// The hosts that failed in this stage, as lines to keep when it fails.
    pub fn failed(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| matches!(h.state, HostState::Failed(_)))
            .map(|h| format!("{} ({}): {}", h.name, h.group, h.state))
            .collect()
    }

    /// The rows as the web view takes them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"stage": self.stage, "rows": self.rows()})
    }
}

fn counter_row(p: &Progress) -> Row {
    Row {
        key: format!("task {}", p.task),
        label: p.task.clone(),
        text: describe(p),
        percent: p.percent(),
        counter: Some((p.unit, p.done, p.total)),
        failed: false,
    }
}

fn host_row(group: &str, host: &str, state: &HostState) -> Row {
    Row {
        key: format!("host {group}/{host}"),
        label: format!("{host} ({group})"),
        text: state.to_string(),
        percent: match state {
            HostState::Pulling { done, total } if *total > 0 => Some(done * 100 / total),
            HostState::Checking { healthy, of } if *of > 0 => {
                Some(u64::from(*healthy) * 100 / u64::from(*of))
            }
            _ => None,
        },
        counter: None,
        failed: matches!(state, HostState::Failed(_)),
    }
}

/// `group `web` batch 1/3: 2 host(s) switched`, or which failed.
fn batch_line(b: &BatchProgress, ok: bool, hosts: &[Host]) -> String {
    let head = format!("group `{}` batch {}/{}", b.group, b.n, b.of);
    if ok {
        return format!("{head} done: {} host(s) switched", b.hosts.len());
    }
    let failed: Vec<&str> = hosts
        .iter()
        .filter(|h| h.group == b.group && matches!(h.state, HostState::Failed(_)))
        .filter(|h| b.hosts.contains(&h.name))
        .map(|h| h.name.as_str())
        .collect();
    format!("{head}: failed on {}", failed.join(", "))
}

/// A counter in words: `412.0 MiB of 917.0 MiB, 180.2 MiB written`, `3,120 files`,
/// `step 2 of 5`.
pub fn describe(p: &Progress) -> String {
    let n = |v: u64| amount(p.unit, v);
    let mut text = match (p.unit, p.total) {
        (Unit::Steps, Some(t)) => format!("step {} of {t}", (p.done + 1).min(t)),
        (Unit::Steps, None) => "starting".into(),
        (Unit::Layers, Some(t)) => format!("{} of {t} layer(s)", p.done),
        (_, Some(t)) => format!("{} of {}", n(p.done), n(t)),
        (_, None) => n(p.done),
    };
    if let Some(out) = p.out {
        text += &format!(", {} written", bytes(out));
    }
    text
}

fn amount(unit: Unit, v: u64) -> String {
    match unit {
        Unit::Bytes => bytes(v),
        Unit::Files => format!("{} files", grouped(v)),
        Unit::Steps => format!("{v} steps"),
        Unit::Layers => format!("{v} layer(s)"),
    }
}

/// Binary units, one decimal: `917.0 MiB`.
pub fn bytes(v: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if v < 1024 {
        return format!("{v} B");
    }
    let mut x = v as f64 / 1024.0;
    let mut unit = 0;
    while x >= 1024.0 && unit < UNITS.len() - 1 {
        x /= 1024.0;
        unit += 1;
    }
    format!("{x:.1} {}", UNITS[unit])
}

/// `10,001`.
fn grouped(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use stretch_core::log::HostProgress;

    fn progress(task: &str, unit: Unit, done: u64, total: Option<u64>) -> Event {
        Event::Progress(Progress {
            stage: "s".into(),
            task: task.into(),
            unit,
            done,
            total,
            out: None,
            ended: false,
        })
    }

    fn host(group: &str, host: &str, state: HostState) -> Event {
        Event::Host(HostProgress {
            stage: "change release".into(),
            group: group.into(),
            host: host.into(),
            state,
        })
    }

    fn batch(n: usize, of: usize, hosts: &[&str], ok: Option<bool>) -> Event {
        Event::Batch(BatchProgress {
            stage: "change release".into(),
            group: "web".into(),
            n,
            of,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ok,
        })
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(917 * 1024 * 1024), "917.0 MiB");
        assert_eq!(bytes(3 << 40), "3.0 TiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(grouped(10_001), "10,001");
        assert_eq!(grouped(999), "999");
    }

    #[test]
    fn counters_become_bars_with_percentages() {
        let mut b = Board::default();
        b.apply(&Event::StageStarted {
            stage: "archive".into(),
        });
        let mut p = Progress {
            stage: "archive".into(),
            task: "archive".into(),
            unit: Unit::Bytes,
            done: 412 << 20,
            total: Some(917 << 20),
            out: Some(180 << 20),
            ended: false,
        };
        b.apply(&Event::Progress(p.clone()));
        b.apply(&progress("sources", Unit::Files, 3120, None));
        let rows = b.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].label, "archive");
        assert_eq!(
            rows[0].text,
            "412.0 MiB of 917.0 MiB, 180.0 MiB written".to_string()
        );
        assert_eq!(rows[0].percent, Some(44));
        assert_eq!(rows[1].text, "3,120 files");
        assert_eq!(rows[1].percent, None);
        // An update keeps the row; the end removes it.
        p.done = 917 << 20;
        b.apply(&Event::Progress(p.clone()));
        assert_eq!(b.rows()[0].percent, Some(100));
        p.ended = true;
        b.apply(&Event::Progress(p));
        assert_eq!(b.rows().len(), 1);
        b.apply(&Event::StageFinished {
            stage: "archive".into(),
            elapsed: Default::default(),
            ok: true,
        });
        assert!(b.rows().is_empty());
        assert_eq!(b.stage, None);
    }

    #[test]
    fn steps_and_layers_count_in_words() {
        let mut b = Board::default();
        b.apply(&progress("image web", Unit::Steps, 1, Some(3)));
        b.apply(&progress("push web", Unit::Layers, 2, Some(5)));
        b.apply(&progress("image api", Unit::Steps, 3, Some(3)));
        let texts: Vec<_> = b.rows().into_iter().map(|r| (r.text, r.percent)).collect();
        assert_eq!(
            texts,
            vec![
                ("step 2 of 3".to_string(), Some(33)),
                ("2 of 5 layer(s)".to_string(), Some(40)),
                ("step 3 of 3".to_string(), Some(100)),
            ]
        );
    }

    #[test]
    fn a_batch_shows_its_hosts_then_leaves_one_line() {
        let mut b = Board::default();
        b.apply(&Event::StageStarted {
            stage: "change release".into(),
        });
        assert_eq!(b.apply(&batch(1, 2, &["a", "b"], None)), None);
        b.apply(&host("web", "a", HostState::Switching));
        let rows: Vec<_> = b.rows().into_iter().map(|r| (r.label, r.text)).collect();
        assert_eq!(
            rows,
            vec![
                ("web batch 1/2".to_string(), "2 host(s)".to_string()),
                (
                    "a (web)".to_string(),
                    "starting, health-checking".to_string()
                ),
                ("b (web)".to_string(), "waiting".to_string()),
            ]
        );
        b.apply(&host("web", "a", HostState::Switched));
        b.apply(&host("web", "b", HostState::Switched));
        assert_eq!(
            b.apply(&batch(1, 2, &["a", "b"], Some(true))).as_deref(),
            Some("group `web` batch 1/2 done: 2 host(s) switched")
        );
        // Between batches: nothing until the next begins.
        assert!(b.rows().is_empty());
        b.apply(&batch(2, 2, &["c"], None));
        b.apply(&host("web", "c", HostState::Failed("refused".into())));
        let rows = b.rows();
        assert_eq!(rows.len(), 2);
        assert!(rows[1].failed);
        assert_eq!(rows[1].text, "failed: refused");
        assert_eq!(
            b.apply(&batch(2, 2, &["c"], Some(false))).as_deref(),
            Some("group `web` batch 2/2: failed on c")
        );
        // The batch is over, its failed host is still known for the stage's end.
        assert!(b.rows().is_empty());
        assert_eq!(b.failed(), vec!["c (web): failed: refused".to_string()]);
    }

    #[test]
    fn many_hosts_getting_ready_show_a_count_and_those_at_work() {
        let mut b = Board::default();
        for i in 0..50 {
            b.apply(&host("web", &format!("h{i}"), HostState::Waiting));
        }
        for i in 0..20 {
            b.apply(&host("web", &format!("h{i}"), HostState::Ready));
        }
        b.apply(&host("web", "h20", HostState::Preparing));
        let rows = b.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].text.as_str(), rows[0].percent),
            ("20 of 50 done", Some(40))
        );
        assert_eq!(rows[1].label, "h20 (web)");
        assert_eq!(rows[1].text, "pulling image");
        let json = b.to_json();
        assert_eq!(json["rows"][0]["percent"], 40);
        assert_eq!(json["rows"][1]["text"], "pulling image");
    }
}
