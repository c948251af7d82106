//! In-process request coalescing: at most one fetch per key at a time, and a request joins a
//! fetch only if that fetch saw at least the invalidations the request saw (its [`Stamp`]
//! covers the request's). A request that misses after an acknowledged invalidation therefore
//! never joins a fetch that began before it: it starts its own, which replaces the old one for
//! later joiners. The fetch runs in a tracked task, so it completes (and stores its answer)
//! even if the request that started it goes away, and shutdown waits for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::origin::OriginError;
use crate::store::Stamp;
use crate::tasks::Tasks;

type Flight<T> = Shared<BoxFuture<'static, Result<T, OriginError>>>;

struct Running<T> {
    id: u64,
    stamp: Stamp,
    flight: Flight<T>,
}

/// Fetches in progress, by key.
pub struct Flights<T> {
    map: Arc<Mutex<HashMap<String, Running<T>>>>,
    next_id: AtomicU64,
    tasks: Tasks,
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// No flights yet; fetches are spawned on `tasks`.
    pub fn new(tasks: Tasks) -> Self {
        Self {
            map: Arc::default(),
            next_id: AtomicU64::new(0),
            tasks,
        }
    }

    /// Joins the fetch running for `key` if its stamp covers `stamp`, or starts `fetch` as the
    /// one. Returns the shared result and whether the caller joined a fetch another request
    /// had started.
    pub fn join_or_start<F>(&self, key: &str, stamp: &Stamp, fetch: F) -> (Flight<T>, bool)
    where
        F: FnOnce() -> BoxFuture<'static, Result<T, OriginError>>,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = map.get(key)
            && running.stamp.covers(stamp)
        {
            return (running.flight.clone(), true);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fut = fetch();
        let registry = self.map.clone();
        let owned_key = key.to_owned();
        // The task cannot remove its entry before it is inserted: removal takes the lock
        // this function holds until the insert below. A newer flight for the key may have
        // replaced it meanwhile, and stays.
        let task = self.tasks.spawn(async move {
            // Removed however the fetch ends: finished, cancelled, or panicked (a flight left
            // behind would be joined by every later request for the key and fail them all).
            let _leaving = Leaving {
                registry,
                key: owned_key,
                id,
            };
            fut.await
        });
        let flight = async move {
            match task.await {
                Ok(Some(result)) => result,
                Ok(None) => Err(OriginError::Unreachable("shutting down".into())),
                Err(_) => Err(OriginError::Unreachable("fetch task failed".into())),
            }
        }
        .boxed()
        .shared();
        map.insert(
            key.to_owned(),
            Running {
                id,
                stamp: stamp.clone(),
                flight: flight.clone(),
            },
        );
        (flight, false)
    }

    /// Whether a fetch for `key` is running (test and diagnostics).
    pub fn is_running(&self, key: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }
}

/// Takes a flight out of the map when its task ends, unless a newer one replaced it.
struct Leaving<T: Clone> {
    registry: Arc<Mutex<HashMap<String, Running<T>>>>,
    key: String,
    id: u64,
}

impl<T: Clone> Drop for Leaving<T> {
    fn drop(&mut self) {
        let mut map = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|r| r.id == self.id) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::store::{Source, Tier};

    fn stamp(counter: u64) -> Stamp {
        let source = Source {
            tier: Tier::Redis,
            incarnation: 0,
        };
        Stamp::new(source, vec![counter], 0)
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let flights: Arc<Flights<u32>> = Arc::new(Flights::new(Tasks::new()));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..50 {
            let flights = flights.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                let (flight, joined) = flights.join_or_start("k", &stamp(0), move || {
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
    async fn a_request_that_saw_an_invalidation_never_joins_an_older_fetch() {
        let flights: Flights<u32> = Flights::new(Tasks::new());
        let slow = || {
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(1)
            }
            .boxed()
        };
        let (old, _) = flights.join_or_start("k", &stamp(0), slow);
        let (new, joined) = flights.join_or_start("k", &stamp(1), || async { Ok(2) }.boxed());
        assert!(!joined);
        assert_eq!(new.await.expect("ok"), 2);
        let (late, joined) = flights.join_or_start("k", &stamp(0), || async { Ok(3) }.boxed());
        assert!(
            !joined || late.clone().await.expect("ok") != 1,
            "never the older fetch"
        );
        assert_eq!(old.await.expect("ok"), 1, "its own requesters still get it");
    }

    #[tokio::test]
    async fn errors_are_shared_and_not_remembered() {
        let flights: Flights<u32> = Flights::new(Tasks::new());
        let (f, _) = flights.join_or_start("k", &stamp(0), || {
            async { Err(OriginError::Timeout) }.boxed()
        });
        assert!(f.await.is_err());
        let (f, joined) = flights.join_or_start("k", &stamp(0), || async { Ok(1) }.boxed());
        assert!(!joined);
        assert_eq!(f.await.expect("ok"), 1);
    }

    /// A fetch that panics fails its requesters and is forgotten: the next request starts
    /// its own instead of joining a flight that can only fail.
    #[tokio::test]
    async fn a_fetch_that_panics_is_not_joined_afterwards() {
        let flights: Flights<u32> = Flights::new(Tasks::new());
        let (f, _) = flights.join_or_start("k", &stamp(0), || {
            async { panic!("a bug in a fetch") }.boxed()
        });
        assert!(f.await.is_err());
        assert!(!flights.is_running("k"));
        let (f, joined) = flights.join_or_start("k", &stamp(0), || async { Ok(1) }.boxed());
        assert!(!joined);
        assert_eq!(f.await.expect("ok"), 1);
    }
}
