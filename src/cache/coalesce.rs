//! In-process request coalescing: at most one fetch per key at a time. The fetch runs in a
//! spawned task, so it completes (and stores its answer) even if the request that started it
//! goes away; every request for the key awaits the same shared result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::origin::OriginError;

type Flight<T> = Shared<BoxFuture<'static, Result<T, OriginError>>>;

/// Fetches in progress, by key.
pub struct Flights<T> {
    map: Arc<Mutex<HashMap<String, Flight<T>>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
        }
    }
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Joins the fetch running for `key`, or starts `fetch` as the one. Returns the shared
    /// result and whether the caller joined a fetch another request had started.
    pub fn join_or_start<F>(&self, key: &str, fetch: F) -> (Flight<T>, bool)
    where
        F: FnOnce() -> BoxFuture<'static, Result<T, OriginError>>,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = map.get(key) {
            return (flight.clone(), true);
        }
        let fut = fetch();
        let registry = self.map.clone();
        let owned_key = key.to_owned();
        // The task cannot remove its entry before it is inserted: removal takes the lock
        // this function holds until the insert below.
        let task = tokio::spawn(async move {
            let result = fut.await;
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&owned_key);
            result
        });
        let flight = async move {
            task.await
                .unwrap_or_else(|_| Err(OriginError::Unreachable("fetch task failed".into())))
        }
        .boxed()
        .shared();
        map.insert(key.to_owned(), flight.clone());
        (flight, false)
    }

    /// Whether a fetch for `key` is running.
    pub fn is_running(&self, key: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let flights: Arc<Flights<u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..50 {
            let flights = flights.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                let (flight, joined) = flights.join_or_start("k", move || {
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(7)
                    }
                    .boxed()
                });
                (flight.await, joined)
            }));
        }
        let mut joined = 0;
        for h in handles {
            let (result, j) = h.await.expect("task");
            assert_eq!(result.expect("ok"), 7);
            joined += usize::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 49);
        assert!(!flights.is_running("k"), "finished flights are forgotten");
    }

    #[tokio::test]
    async fn errors_are_shared_and_not_remembered() {
        let flights: Flights<u32> = Flights::default();
        let (f, _) = flights.join_or_start("k", || async { Err(OriginError::Timeout) }.boxed());
        assert!(f.await.is_err());
        let (f, joined) = flights.join_or_start("k", || async { Ok(1) }.boxed());
        assert!(!joined);
        assert_eq!(f.await.expect("ok"), 1);
    }
}
