//! The human form of every outcome, in one place: the local commands and `--server`
//! mode print the same types through these, so their output is the same.

use stretch_core::deploy::Kind;
use stretch_core::deploy::apply::{ActionKind, ApplyOutcome, ChangeOp};
use stretch_core::outcome::{Built, Deployed, Release, Role};
use stretch_core::prune::Pruned;
use stretch_core::status::EnvironmentStatus;
use stretch_core::store::{LogLine, RunRecord};

use crate::printer::Printer;

/// What an outcome says to people: data lines (stdout) and remarks (stderr, silent
/// with `-q`), in order.
#[derive(Debug, Default, PartialEq)]
pub struct Lines(pub Vec<Line>);

#[derive(Debug, PartialEq)]
pub enum Line {
    Out(String),
    Info(String),
}

impl Lines {
    fn out(&mut self, s: impl Into<String>) {
        self.0.push(Line::Out(s.into()));
    }
    fn info(&mut self, s: impl Into<String>) {
        self.0.push(Line::Info(s.into()));
    }
}

/// An outcome with a human form; its JSON form is its `Serialize`.
pub trait Human {
    fn human(&self, l: &mut Lines);
}

/// Print `value` as `--json` asks: pretty JSON, or its human lines.
pub fn show<T: Human + serde::Serialize>(printer: &Printer, value: &T) {
    if printer.json {
        printer.json(value);
        return;
    }
    let mut lines = Lines::default();
    value.human(&mut lines);
    for line in lines.0 {
        match line {
            Line::Out(s) => printer.out(s),
            Line::Info(s) => printer.info(s),
        }
    }
}

/// One line of an instance's output (`app logs`): one JSON object a line, or
/// `HOST GROUP/INSTANCE | text`.
pub fn app_log_line(printer: &Printer, l: &stretch_core::agent::api::LogLine) {
    if printer.json {
        printer.out(serde_json::to_string(l).unwrap_or_default());
    } else {
        printer.out(format!(
            "{} {}/{} | {}",
            l.host, l.group, l.instance, l.line
        ));
    }
}

impl Human for stretch_core::app::Restarted {
    fn human(&self, l: &mut Lines) {
        let n: usize = self.groups.iter().map(|g| g.instances).sum();
        l.out(format!(
            "restarted {} instance(s) of environment `{}` on {} host group(s) (run {})",
            n,
            self.environment,
            self.groups.len(),
            self.run
        ));
    }
}

/// One log line of `logs`: one JSON object a line, or `at [stage] text`.
pub fn log_line(printer: &Printer, l: &LogLine) {
    if printer.json {
        printer.out(serde_json::to_string(l).unwrap_or_default());
    } else {
        printer.out(format!("{} [{}] {}", l.at, l.stage, l.text));
    }
}

impl Human for Built {
    fn human(&self, l: &mut Lines) {
        let verb = if self.reused { "unchanged:" } else { "built" };
        let r = &self.release;
        l.out(format!("{verb} release {} ({})", r.id, r.name));
        for i in &r.images {
            match &i.digest {
                Some(d) => l.info(format!("  image {} ({d})", i.name)),
                None => l.info(format!("  image {}", i.name)),
            }
        }
    }
}

impl Human for Deployed {
    fn human(&self, l: &mut Lines) {
        let verb = match self.kind {
            Kind::Rollback => "rolled back:",
            Kind::Deploy => "deployed:",
        };
        l.out(format!(
            "{verb} {} ({}) is live on `{}`",
            self.release.name.as_deref().unwrap_or(""),
            self.release.id,
            self.environment
        ));
    }
}

impl Human for ApplyOutcome {
    fn human(&self, l: &mut Lines) {
        let plan = &self.plan;
        let env = &plan.environment;
        if let Some(release) = &plan.release {
            l.out(format!("environment `{env}` runs release {release}"));
        }
        if plan.changes.is_empty() && plan.release.is_some() {
            l.out("no changes in its definition");
        }
        let show =
            |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        for c in &plan.changes {
            l.out(match c.op {
                ChangeOp::Added => format!("  + {}: {}", c.path, show(&c.new)),
                ChangeOp::Removed => format!("  - {}: {}", c.path, show(&c.old)),
                ChangeOp::Changed => {
                    format!("  ~ {}: {} -> {}", c.path, show(&c.old), show(&c.new))
                }
            });
        }
        if !plan.actions.is_empty() {
            l.out("actions:");
        }
        for a in &plan.actions {
            let (sign, what) = match a.kind {
                ActionKind::Start => ("+", "start (pull the running release's image)".to_string()),
                ActionKind::Stop => ("-", "stop".to_string()),
                ActionKind::Reload => (
                    "~",
                    format!(
                        "reload configuration {} -> {}",
                        a.from_config.as_deref().unwrap_or("-"),
                        a.to_config.as_deref().unwrap_or("-")
                    ),
                ),
                ActionKind::Replace => ("~", "replace instances (same image)".to_string()),
            };
            l.out(format!("  {sign} {:<20} {what}", a.target));
        }
        if let Some(note) = &self.note {
            l.info(note);
        } else if self.applied {
            l.out(format!(
                "applied: `{env}` converged ({} action(s))",
                plan.actions.len()
            ));
        }
    }
}

impl Human for EnvironmentStatus {
    fn human(&self, l: &mut Lines) {
        l.out(self.to_string().trim_end());
    }
}

impl Human for Vec<Release> {
    fn human(&self, l: &mut Lines) {
        if self.is_empty() {
            l.info("no releases yet: run `stretch build`");
        }
        for r in self {
            let uses: Vec<String> = r
                .environments
                .iter()
                .map(|u| match u.role {
                    Role::Current => format!("`{}`", u.environment),
                    Role::Rollback => format!("`{}` (rollback)", u.environment),
                })
                .collect();
            let marks = if uses.is_empty() {
                String::new()
            } else {
                format!("  runs on {}", uses.join(", "))
            };
            l.out(format!("{}  {:<24} {}{marks}", r.id, r.name, r.created_at));
        }
    }
}

impl Human for Pruned {
    fn human(&self, l: &mut Lines) {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        if self.removed.is_empty() {
            l.out("nothing to remove");
        }
        for r in &self.removed {
            l.out(format!("{verb} {} ({})", r.name, r.id));
            for i in &r.images {
                l.out(format!("  image {i}"));
            }
            for m in &r.registry {
                l.out(format!("  registry {m}"));
            }
            for n in &r.notes {
                l.out(format!("  note: {n}"));
            }
        }
        for k in &self.kept {
            l.out(format!("kept {} ({}): {}", k.name, k.id, k.why.join("; ")));
        }
    }
}

impl Human for Vec<RunRecord> {
    fn human(&self, l: &mut Lines) {
        if self.is_empty() {
            l.info("no builds or deploys yet");
        }
        let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        for r in self {
            l.out(format!(
                "{:>4}  {:<8} {:<12} {:<20} {:<20} {:<9} {}  {}",
                r.id,
                r.kind,
                dash(&r.environment),
                dash(&r.release),
                dash(&r.existing_release),
                r.status,
                r.started_at,
                dash(&r.ended_at)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stretch_core::status::ReleaseName;

    fn lines(v: &impl Human) -> Lines {
        let mut l = Lines::default();
        v.human(&mut l);
        l
    }

    #[test]
    fn deployed_and_rolled_back_read_as_before() {
        let d = Deployed {
            run: 3,
            kind: Kind::Rollback,
            environment: "production".into(),
            release: ReleaseName {
                id: "abc".into(),
                name: Some("easy-dove".into()),
            },
            existing_release: None,
        };
        assert_eq!(
            lines(&d),
            Lines(vec![Line::Out(
                "rolled back: easy-dove (abc) is live on `production`".into()
            )])
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["kind"], "rollback");
        assert_eq!(json["release"]["name"], "easy-dove");
        let back: Deployed = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn empty_lists_say_so_on_stderr() {
        assert_eq!(
            lines(&Vec::<Release>::new()),
            Lines(vec![Line::Info(
                "no releases yet: run `stretch build`".into()
            )])
        );
        assert_eq!(
            lines(&Vec::<RunRecord>::new()),
            Lines(vec![Line::Info("no builds or deploys yet".into())])
        );
    }
}
