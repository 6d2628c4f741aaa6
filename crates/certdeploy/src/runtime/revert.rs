//! TEMPORARY placeholder: the revert operation is built on another branch
//! and replaces this file. Until then every revert fails, so a group with
//! `on_failure = "revert"` ends `partial` when it had a deployed member.

use super::{Error, Runtime};

impl Runtime {
    /// Put back what deployment `deployment_id` replaced (journaled as
    /// `<ID>.revert`, outcome `reverted`).
    pub async fn revert(&self, deployment_id: &str) -> Result<certdeploy_core::Report, Error> {
        Err(Error::Group(format!("revert of {deployment_id}: revert is not built yet")))
    }
}
