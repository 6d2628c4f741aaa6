//! What the journal benchmarks append: one deployment's records, as the
//! driver writes them.

use certdeploy_core::testkit::test_plan;
use certdeploy_core::{Event, ExecResult, Outcome, Record, Report, Role, Step, Timestamp};

/// The 8 records of a deployed deployment, each with whether the driver
/// waits for it to be durable before its next side effect.
pub fn deployment(id: &str) -> Vec<(Record, bool)> {
    let (plan, _) = test_plan(id, b"CERT new nb=200\nnew-body\n", b"KEY\n", Some(b"CHAIN\n"), true, false);
    let at = Timestamp(1);
    let rec = |event| Record { at, event };
    let report = Report {
        deployment_id: id.into(),
        target: plan.target.clone(),
        host: plan.host.clone(),
        outcome: Outcome::Deployed,
        message: "certificate deployed to web1.internal:22".into(),
        details: Default::default(),
        attempts: 1,
        reload_shared_with: None,
        started_at: at,
        finished_at: at,
        reverts: None,
    };
    vec![
        (rec(Event::Started { plan }), true),
        (rec(Event::Begun { step: Step::Snapshot }), true),
        (rec(Event::BackupsRemoved { error: None }), false),
        (rec(Event::Begun { step: Step::Write }), true),
        (rec(Event::Written { role: Role::Cert }), false),
        (rec(Event::Begun { step: Step::Reload }), true),
        (
            rec(Event::Executed {
                step: Step::Reload,
                result: ExecResult { exit_code: Some(0), output: String::new() },
            }),
            false,
        ),
        (rec(Event::Finished { report }), true),
    ]
}
