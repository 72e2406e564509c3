//! Start-up: load the saved state and re-adopt what runs, without touching running
//! apps. Running instances of each group's current spec get their published ports read
//! back and their proxy reopened; a current instance that is stopped is started, one
//! that is gone is replaced; kept instances that run (a switch interrupted after it
//! reused them) are stopped; containers of this agent that the state does not list
//! (orphans, e.g. new instances of an interrupted switch) are removed, and so are
//! instance folders nothing refers to.

use std::collections::HashSet;

use super::groups::Agent;
use super::instances::{display, stop_timeout};
use super::proxy::Upstream;
use super::state::InstanceRecord;
use crate::Result;

impl Agent {
    /// Re-adopt every saved group; see the module's documentation.
    pub async fn adopt(&self) -> Result<()> {
        let records: Vec<_> = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.values().cloned().collect()
        };
        let inst = self.instances();
        for mut record in records {
            let key = record.key.clone();
            let name = display(&key);
            let Some(spec) = record.current.clone() else {
                continue;
            };
            let mut adopted: Vec<InstanceRecord> = Vec::new();
            for i in std::mem::take(&mut record.instances) {
                match self.docker.inspect_container(&i.container).await? {
                    Some(c) if c.running() => {
                        adopted.push(InstanceRecord {
                            port: c.host_port,
                            ..i
                        });
                    }
                    Some(_) => match inst.start(i.clone(), spec.port.is_some()).await {
                        Ok(r) => {
                            self.log
                                .line(format!("{name}: started stopped instance {}", r.name));
                            adopted.push(r);
                        }
                        Err(e) => {
                            self.log.line(format!("{name}: {e}"));
                            adopted.push(i);
                        }
                    },
                    None => match inst.start_fresh(&spec, i.index).await {
                        Ok(r) => {
                            self.log.line(format!(
                                "{name}: instance {} was gone; started {}",
                                i.name, r.name
                            ));
                            let _ = super::files::remove_instance(&self.data.instance_dir(&i.name));
                            adopted.push(r);
                        }
                        Err(e) => self.log.line(format!(
                            "{name}: instance {} is gone and cannot be replaced: {e}",
                            i.name
                        )),
                    },
                }
            }
            record.instances = adopted;

            let mut kept = Vec::new();
            for k in std::mem::take(&mut record.kept) {
                match self.docker.inspect_container(&k.container).await? {
                    Some(c) => {
                        if c.running() {
                            inst.stop_all(std::slice::from_ref(&k), stop_timeout(&spec))
                                .await;
                        }
                        kept.push(k);
                    }
                    None => {
                        let _ = super::files::remove_instance(&self.data.instance_dir(&k.name));
                    }
                }
            }
            record.kept = kept;

            let group = self.group(&key);
            let mut rt = group.ops.lock().await;
            group.pool.set_response_timeout(spec.response_timeout_ms);
            group.pool.replace(
                record
                    .instances
                    .iter()
                    .filter_map(|i| i.port.map(|p| Upstream::new(&i.container, p)))
                    .collect(),
            );
            // A missing ACME certificate is ordered here (bounded): rare, since the
            // stored one serves.
            match self.reroute(&group, &spec).await {
                Ok(retired) => drop(retired),
                Err(e) => self.log.line(format!("{name}: {e}")),
            }
            rt.monitor = self.monitor(&group, &spec);
            self.log.line(format!(
                "{name}: adopted {} instances of release {}",
                record.instances.len(),
                spec.release.name
            ));
            self.commit(record)?;
        }
        self.remove_orphans().await
    }

    async fn remove_orphans(&self) -> Result<()> {
        let known: HashSet<String> = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records
                .values()
                .flat_map(|r| r.instances.iter().chain(&r.kept))
                .flat_map(|i| [i.container.clone(), i.name.clone()])
                .collect()
        };
        let containers = self
            .docker
            .list_containers(&[("stretch.agent", &self.data.agent_id)])
            .await?;
        for c in containers {
            if !known.contains(&c.id) {
                self.log.line(format!(
                    "removing orphan container {} ({})",
                    c.name, c.state
                ));
                self.instances()
                    .remove(&c.id, &self.data.instance_dir(&c.name))
                    .await;
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.data.instances()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !known.contains(&name) {
                    let _ = super::files::remove_instance(&entry.path());
                }
            }
        }
        Ok(())
    }
}
