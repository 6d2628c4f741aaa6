//! How the runtime reaches a plan's host over SSH: the account and the
//! target's rules for links, owners and sudo (only on the target's own
//! host), masters opened ahead of the first deployment, and closed at the
//! end.

use std::time::Duration;

use certdeploy_core::Plan;
use certdeploy_core::coalesce::ReloadKey;
use certdeploy_ssh::{HostAddr, SshHost, TargetPolicy};

use super::{Metered, Runtime, target_key};
use crate::config::TargetConfig;

impl Runtime {
    /// The SSH account of a plan; `target` is the configured target the plan
    /// was built from (none for an inline target).
    fn addr(plan: &Plan, target: Option<&TargetConfig>) -> HostAddr {
        let accept_new = target.is_some_and(|t| t.accept_new_host_key() && t.host == plan.remote.host);
        // sudo, like the link and owner rules, only on the target's own host.
        let sudo = target.filter(|t| t.sudo && t.host == plan.remote.host).map(|t| t.sftp_server.clone());
        HostAddr {
            host: plan.remote.host.clone(),
            port: plan.remote.port,
            user: plan.remote.user.clone(),
            accept_new_host_key: accept_new,
            sudo,
        }
    }

    /// The target's rules for links and owners on its host;
    /// an inline target has none of its own.
    fn host_policy(plan: &Plan, target: Option<&TargetConfig>) -> TargetPolicy {
        match target.filter(|t| t.host == plan.remote.host) {
            Some(t) => t.host_policy(),
            None => TargetPolicy::default(),
        }
    }

    /// The host a plan deploys to, every operation timed.
    pub(super) fn host(&self, plan: &Plan, target: Option<&TargetConfig>) -> Metered<SshHost<'_>> {
        Metered(SshHost::new(&self.pool, Self::addr(plan, target)).with_policy(Self::host_policy(plan, target)))
    }

    /// What deployments must have in common to share a validate and a
    /// reload: the account, and whether commands run through sudo there.
    pub(super) fn reload_key(plan: &Plan, target: Option<&TargetConfig>) -> ReloadKey {
        let runner = match Self::addr(plan, target).sudo {
            Some(sftp_server) => format!("sudo {sftp_server}"),
            None => String::new(),
        };
        ReloadKey::of(plan, &runner)
    }

    /// The key the plan's target is serialized on in this process.
    pub(super) fn target_key(plan: &Plan) -> String {
        target_key(&plan.remote.host, plan.remote.port, plan.cert_path())
    }

    /// Close every ssh master; the pool's own control directory goes too.
    pub async fn close_ssh(&self) {
        self.pool.close_all().await;
        self.pool.remove_control_dir();
    }

    /// Open an SSH master to every configured target, in parallel, bounded
    /// by the connect timeout. Failures are only logged: the deployment
    /// itself reports them.
    pub async fn warm_masters(&self) {
        let cfg = self.cfg();
        self.warm(cfg.targets.iter().map(|(n, t)| (n.clone(), t.host_addr())).collect()).await;
    }

    /// [`Self::warm_masters`] for the given targets (name, account): at
    /// most `max_masters` accounts (the first ones), since warming more
    /// would only close masters just opened.
    pub async fn warm(&self, targets: Vec<(String, HostAddr)>) {
        let limit = Duration::from_secs(self.cfg().ssh.connect_timeout_s.max(1) + 2);
        let mut accounts = std::collections::HashSet::new();
        let max = self.pool.config().max_masters;
        let targets: Vec<(String, HostAddr)> = targets
            .into_iter()
            .filter(|(_, a)| accounts.contains(a) || accounts.len() < max && accounts.insert(a.clone()))
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for (name, addr) in targets {
            let pool = self.pool.clone();
            set.spawn(async move {
                match tokio::time::timeout(limit, pool.warm(&addr)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(target = %name, "ssh master not opened: {e}"),
                    Err(_) => tracing::warn!(target = %name, "ssh master not opened: timed out"),
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
}
