//! Leases: a replica holds each job it runs by renewing it every third of `executor.lease`;
//! a job nobody renewed for a lease is claimed by another replica. A renewal that finds a job
//! taken over stops its run here at once, without a word. The same tick looks for cancels
//! stored with the executions running here, in case the command that announced one was missed.

use std::{collections::HashSet, sync::Arc};

use csp_bus::EventId;

use super::{Executor, GROUP, JOBS, Run, Stop, lock};
use crate::{error::Error, repo};

impl Executor {
    pub(super) async fn renew_leases(&self) {
        let every = self.settings.executor.lease / 3;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.workers.cancelled() => return,
            }
            self.renew().await;
        }
    }

    async fn renew(&self) {
        let runs: Vec<Arc<Run>> = lock(&self.running).values().cloned().collect();
        if runs.is_empty() {
            return;
        }
        {
            let _renewing = self.renewing.lock().await;
            let runs: Vec<&Arc<Run>> =
                runs.iter().filter(|run| lock(&self.running).contains_key(&run.id)).collect();
            let jobs: Vec<EventId> = runs.iter().map(|run| run.job()).collect();
            match self.bus.touch(JOBS, GROUP, &self.me, &jobs).await {
                Ok(held) => {
                    let held: HashSet<EventId> = held.into_iter().collect();
                    for run in runs {
                        if !held.contains(&run.job()) && !run.is_done() && !run.silenced() {
                            tracing::warn!(execution_id = %run.id, "another replica has taken this execution over (its lease ran out); stopping it here");
                            metrics::counter!("csp_executor_lease_expiries_total").increment(1);
                            run.stop(Stop::Lost);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the leases of running executions"),
            }
        }
        let ids: Vec<String> =
            runs.iter().filter(|run| run.stopped().is_none()).map(|run| run.id.clone()).collect();
        match repo::cancels_requested(&self.db, &ids).await {
            Ok(cancels) => {
                for run in &runs {
                    if let Some(reason) = cancels.get(&run.id) {
                        run.stop(Stop::Cancelled(reason.clone()));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the cancels of running executions"),
        }
    }

    /// Whether this replica still holds a run's job (renewing it).
    pub(super) async fn holds(&self, run: &Run) -> Result<bool, Error> {
        let _renewing = self.renewing.lock().await;
        Ok(self.bus.touch(JOBS, GROUP, &self.me, &[run.job()]).await?.contains(&run.job()))
    }

    /// Hands a run's job back to the queue: another replica claims it at once. The run is
    /// forgotten here first, so no renewal holds the job again.
    pub(super) async fn hand_back(&self, run: &Run) {
        let _renewing = self.renewing.lock().await;
        lock(&self.running).remove(&run.id);
        if let Err(e) = self.bus.release(JOBS, GROUP, &self.me, &[run.job()]).await {
            tracing::warn!(execution_id = %run.id, error = %e, "cannot hand the job back; another replica takes it after the lease");
        }
    }
}
