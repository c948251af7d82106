//! Background work that must not outlive shutdown: fetches that finish after their requester
//! left, refreshes, clean-ups. Every such task is spawned here; on SIGTERM the service waits
//! for them (bounded by `server.shutdown_timeout_ms`), then cancels what is left.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tracked, cancellable background tasks. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// A new, empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `work`, tracked; cancelled (dropped at its next await) by [`Tasks::stop`].
    /// Resolves to `None` when it was cancelled.
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = cancel.cancelled() => None,
                out = work => Some(out),
            }
        })
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Stops accepting work and waits up to `grace` for what runs; cancels what is left and
    /// waits for it to unwind. Returns how many were cancelled.
    pub async fn stop(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.cancel.cancel();
        self.tracker.wait().await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_waits_for_short_work_and_cancels_long_work() {
        let tasks = Tasks::new();
        let short = tasks.spawn(async { 1 });
        let long = tasks.spawn(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            2
        });
        assert_eq!(tasks.stop(Duration::from_millis(50)).await, 1);
        assert_eq!(short.await.expect("join"), Some(1));
        assert_eq!(long.await.expect("join"), None);
    }
}
