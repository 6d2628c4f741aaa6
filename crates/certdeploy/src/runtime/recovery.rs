//! Finishing what an earlier process left unfinished: one interrupted
//! deployment per the recovery table (after making sure its target lock is
//! still ours), or every unfinished deployment of the journal at start.

use std::sync::Arc;

use certdeploy_core::lock::LockRecord;
use certdeploy_core::{Deployment, Terminal, attempt};
use tracing::Instrument;

use super::locks::LiveToken;
use super::{Error, Failed, Runtime};

impl Runtime {
    /// Finish an interrupted deployment (journal key `key`) per the
    /// recovery table, first making sure its target lock is still ours.
    pub async fn resume(&self, key: &str) -> Result<Terminal, Error> {
        let records = self.journal.records(key)?;
        let plan = Deployment::replay(&records)?.plan().clone();
        let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
        let _live = plan.lock.as_deref().map(|t| LiveToken::new(&self.live_tokens, t));
        let span = tracing::info_span!("recovery", deployment_id = %plan.deployment_id, key, target = %plan.target);
        // The journal holds the plan, not the target's SSH settings: those of
        // the target as configured now (on the plan's host only).
        let cfg = self.cfg();
        let host = self.host(&plan, cfg.targets.get(&plan.target));
        let env = self.env(&host);
        let dead_own = |r: &LockRecord| self.dead_own(r);
        let w = self.worker(&dead_own);
        let t = attempt::resume(&env, &w, key, &records).instrument(span).await?;
        match &t {
            Terminal::Finished(r) => tracing::info!(key, outcome = %r.outcome, "recovered: {}", r.message),
            Terminal::Abandoned(why) => tracing::info!(key, "recovered: {why}"),
        }
        Ok(t)
    }

    /// Resume every unfinished deployment (targets in parallel, each
    /// target in order). Returns how many were resumed.
    pub async fn recover_all(self: &Arc<Self>) -> Result<usize, Error> {
        let ids = self.journal.unfinished()?;
        let n = ids.len();
        if n > 0 {
            tracing::info!("recovering {n} unfinished deployment(s)");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let rt = self.clone();
            tasks.spawn(async move {
                let _g = rt.ids.lock(&id).await;
                let r = rt.resume(&id).await;
                (id, r)
            });
        }
        let mut failed = Vec::new();
        while let Some(j) = tasks.join_next().await {
            match j {
                Ok((_, Ok(_))) => {}
                Ok((id, Err(error))) => failed.push(Failed { key: Some(id), error }),
                Err(e) => failed.push(Failed { key: None, error: Error::RecoveryTask(e) }),
            }
        }
        if !failed.is_empty() {
            return Err(Error::Recovery { failed });
        }
        Ok(n)
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use std::sync::Arc;

    use certdeploy_core::driver::DriveError;
    use certdeploy_core::{Event, Record};
    use certdeploy_testbed::certs::{TestCa, request};

    use super::super::{Error, Runtime};
    use crate::config::Config;

    /// A failed fsync poisons the journal; the runtime's error says so by
    /// its kind (not its text), with the journal's own error as the source,
    /// whether one deployment is resumed or recovery runs over all of them
    /// (the worker's start). Any other journal-side failure is not taken
    /// for a poisoned journal.
    #[tokio::test]
    async fn a_poisoned_journal_surfaces_as_such_from_the_runtime() {
        let _scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().expect("tempdir");
        let text = certdeploy_testbed::WEB1_CONFIG
            .replace("/tmp/unused", &dir.path().join("journal").display().to_string())
            .replace("[targets.web1]", &format!("[ssh]\ncontrol_dir = {:?}\n[targets.web1]", dir.path().display()));
        let cfg = Config::parse(&text, "runtime.toml", &[]).expect("test config");
        let body = request("poisoned-1", "web1", &TestCa::new().leaf("web1.example", 1), true);
        let v = crate::intake::validate_body(&body, &cfg, crate::clock::now()).expect("valid request");
        let (plan, _) = v.plan(1).expect("plan");
        let rt = Arc::new(Runtime::open(cfg).expect("runtime"));

        // Control: a journal that holds nothing for a key is an error too,
        // of another kind.
        let other = rt.resume("never-started").await.expect_err("nothing to resume");
        assert!(matches!(other, Error::Driver(DriveError::Core(_))) && !other.is_journal_poisoned(), "{other}");

        // An attempt left unfinished; its recovery journals `Recovering`
        // durably before it would touch the host, and that fsync fails.
        let started = Record { at: crate::clock::now(), event: Event::Started { plan } };
        rt.journal.append_record("poisoned-1", &started).expect("append");
        fail::cfg("journal_fsync", "return").expect("failpoint");
        let e = rt.resume("poisoned-1").await.expect_err("a resume whose journal sync failed");
        let Error::Journal(j) = &e else { panic!("not a journal error: {e}") };
        assert!(j.is_poisoned() && e.is_journal_poisoned(), "a failed fsync is not reported as poisoning: {e}");
        let source = std::error::Error::source(j).and_then(|s| s.downcast_ref::<certdeploy_journal::Error>());
        assert!(matches!(source, Some(certdeploy_journal::Error::Poisoned(_))), "source lost: {source:?}");

        // Still poisoned once fsync works again; recovery of every
        // unfinished deployment says so too.
        fail::remove("journal_fsync");
        match rt.recover_all().await {
            Err(e @ Error::Recovery { .. }) => assert!(e.is_journal_poisoned(), "recovery hides the poisoning: {e}"),
            other => panic!("recovery over a poisoned journal: {other:?}"),
        }
        rt.close_ssh().await;
    }
}

#[cfg(all(test, not(feature = "failpoints")))]
mod tests {
    #[test]
    #[ignore = "needs --features certdeploy/failpoints (a failed fsync is injected)"]
    fn a_poisoned_journal_surfaces_as_such_from_the_runtime() {}
}
