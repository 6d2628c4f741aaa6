//! What each target holds now, by the journal: `certdeploy status` and the
//! expiry gauge. The journal keeps, with every plan, the leaf's subject and
//! notAfter (public facts, never key material), and its gc never collects
//! a target's last deployment that put a certificate in place.

use std::collections::BTreeMap;

use certdeploy_core::{CertificateInfo, Event, Outcome, Timestamp};
use certdeploy_journal::{DeploymentState, SledJournal};

/// One target's line of `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetStatus {
    pub target: String,
    /// The last finished deployment to this target, whatever its outcome.
    pub last: Option<Finished>,
    /// The last one that put a certificate in place (`deployed`,
    /// `unchanged` or `reverted`): what the target serves now, as far as certdeploy knows.
    pub in_place: Option<Finished>,
    /// The certificate `in_place` put there (`None` for deployments
    /// journaled before certificates were recorded).
    pub certificate: Option<CertificateInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    pub deployment_id: String,
    pub outcome: Outcome,
    pub finished_at: Timestamp,
}

impl TargetStatus {
    /// Whole days until notAfter, rounded down (negative once expired).
    pub fn days_left(&self, now: Timestamp) -> Option<i64> {
        let now_s = i64::try_from(now.0 / 1000).unwrap_or(i64::MAX);
        self.certificate.as_ref().map(|c| (c.not_after - now_s).div_euclid(86_400))
    }

    /// The `--json` object (`null` where unknown).
    pub fn to_json(&self, now: Timestamp) -> serde_json::Value {
        let last = self.last.as_ref();
        serde_json::json!({
            "target": self.target,
            "deployment_id": last.map(|f| f.deployment_id.clone()),
            "outcome": last.map(|f| f.outcome.as_str()),
            "finished_at": last.map(|f| f.finished_at.rfc3339()),
            "in_place_deployment_id": self.in_place.as_ref().map(|f| f.deployment_id.clone()),
            "subject": self.certificate.as_ref().map(|c| c.subject.clone()),
            "not_after": self.certificate.as_ref().map(|c| rfc3339_s(c.not_after)),
            "days_left": self.days_left(now),
        })
    }
}

fn rfc3339_s(unix_s: i64) -> String {
    Timestamp(u64::try_from(unix_s).unwrap_or(0).saturating_mul(1000)).rfc3339()
}

/// Every target the journal knows of, and every name in `configured` (a
/// configured target never deployed has a line with nothing known).
pub fn targets(j: &SledJournal, configured: &[String]) -> Result<Vec<TargetStatus>, certdeploy_journal::Error> {
    let mut by_target: BTreeMap<String, TargetStatus> = configured
        .iter()
        .map(|t| (t.clone(), TargetStatus { target: t.clone(), last: None, in_place: None, certificate: None }))
        .collect();
    for s in j.list()? {
        if s.state != DeploymentState::Finished {
            continue;
        }
        let Some(outcome) = s.outcome else { continue };
        let f = Finished { deployment_id: s.deployment_id.clone(), outcome, finished_at: s.updated_at };
        let e = by_target.entry(s.target.clone()).or_insert_with(|| TargetStatus {
            target: s.target.clone(),
            last: None,
            in_place: None,
            certificate: None,
        });
        if e.last.as_ref().is_none_or(|l| f.finished_at >= l.finished_at) {
            e.last = Some(f.clone());
        }
        if outcome.success() && e.in_place.as_ref().is_none_or(|l| f.finished_at >= l.finished_at) {
            e.in_place = Some(f);
        }
    }
    for st in by_target.values_mut() {
        let Some(f) = &st.in_place else { continue };
        // The certificate travels in the plan of the attempt's `Started`.
        st.certificate = j.records(&f.deployment_id)?.into_iter().rev().find_map(|r| match r.event {
            Event::Started { plan } => plan.certificate,
            _ => None,
        });
    }
    Ok(by_target.into_values().collect())
}
