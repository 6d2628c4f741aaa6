//! Every host operation (and the TLS verification) timed into the step
//! histogram: [`Metered`] wraps a [`Host`], [`timed`] times one future.

use std::time::Instant;

use certdeploy_core::driver::{Fence, Host, LockWrite, PrunedLocked, Snapped, WrittenLocked};
use certdeploy_core::lock::{Created, LockFile};
use certdeploy_core::{ExecGuard, ExecResult, RestoreRequest, RestoreStatus, SnapshotRequest, StepError, WriteRequest};

use crate::metrics as m;

/// Times every host operation into the step histogram.
pub struct Metered<H>(pub H);

/// Run `f`, recording how long it took as `step` in the step histogram.
pub async fn timed<T>(step: &'static str, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = f.await;
    metrics::histogram!(m::STEP_SECONDS, "step" => step).record(t.elapsed().as_secs_f64());
    r
}

impl<H: Host> Host for Metered<H> {
    async fn snapshot(&self, id: &str, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        timed("snapshot", self.0.snapshot(id, files)).await
    }
    async fn inspect(&self, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        timed("inspect", self.0.inspect(files)).await
    }
    async fn write(&self, id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        timed("write", self.0.write(id, files)).await
    }
    async fn reinstate(&self, id: &str, files: &[RestoreRequest]) -> Vec<Result<(), StepError>> {
        timed("write", self.0.reinstate(id, files)).await
    }
    async fn exec(&self, command: &str, timeout_ms: u64) -> Result<ExecResult, StepError> {
        timed("exec", self.0.exec(command, timeout_ms)).await
    }
    async fn restore(&self, id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        timed("restore", self.0.restore(id, files)).await
    }
    async fn remove_backups(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        timed("cleanup", self.0.remove_backups(id, paths)).await
    }
    async fn prune(&self, id: &str, live_paths: &[String], keep: u32) -> Result<(), StepError> {
        timed("prune", self.0.prune(id, live_paths, keep)).await
    }
    async fn write_locked(&self, id: &str, files: &[(WriteRequest, &[u8])], lock: LockWrite<'_>) -> WrittenLocked {
        timed("write", self.0.write_locked(id, files, lock)).await
    }
    async fn prune_locked(&self, id: &str, live_paths: &[String], keep: u32, lock: LockWrite<'_>) -> PrunedLocked {
        timed("prune", self.0.prune_locked(id, live_paths, keep, lock)).await
    }
    async fn discard_temps(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        timed("cleanup", self.0.discard_temps(id, paths)).await
    }
    async fn exec_guarded(&self, command: &str, timeout_ms: u64, guard: &ExecGuard) -> Result<ExecResult, StepError> {
        timed("exec", self.0.exec_guarded(command, timeout_ms, guard)).await
    }
    async fn lock_create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
        timed("lock", self.0.lock_create(path, bytes)).await
    }
    async fn lock_replace(
        &self,
        path: &str,
        bytes: &[u8],
        durable: bool,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        timed("lock", self.0.lock_replace(path, bytes, durable, fence)).await
    }
    async fn lock_read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
        timed("lock", self.0.lock_read(path)).await
    }
    async fn lock_remove(&self, path: &str) -> Result<(), StepError> {
        timed("lock", self.0.lock_remove(path)).await
    }
    async fn lock_sweep(&self, lock: &str, before: u64) -> Result<u32, StepError> {
        timed("lock", self.0.lock_sweep(lock, before)).await
    }
    async fn resolve_path(&self, path: &str) -> Result<String, StepError> {
        self.0.resolve_path(path).await
    }
}
