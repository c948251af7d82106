//! The outage journal: invalidations made while Redis was unusable, kept in memory and
//! appended to a file (fsynced) so they survive a restart, then replayed to Redis before it
//! serves again.
//!
//! File I/O never runs on the runtime's workers: one writer thread owns the file, appends in
//! batches with one `fsync` per batch, and confirms each append once it is durable. An
//! invalidation waits for that confirmation before it is acknowledged.
//!
//! Past `max_ops` pending operations the journal collapses into one invalidation of every
//! entry (plus the counters that make every earlier stamp stale), which stands for all of
//! them in both tiers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::Invalidation;

/// Told once a command's bytes are durable (or why they are not).
type Done = oneshot::Sender<Result<(), String>>;

enum Command {
    Append(Vec<u8>, Done),
    Rewrite(Vec<u8>, Done),
}

/// Pending invalidations and the file that keeps them.
#[derive(Debug)]
pub struct Journal {
    pending: Mutex<Vec<Invalidation>>,
    writer: Option<Mutex<mpsc::Sender<Command>>>,
    path: Option<PathBuf>,
    max_ops: usize,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// What [`Journal::append_if`] did.
pub enum Appended {
    /// Journaled; await it to know it is on disk.
    Queued(Option<oneshot::Receiver<Result<(), String>>>),
    /// The condition did not hold: nothing journaled.
    Declined,
}

fn line(op: &Invalidation) -> Vec<u8> {
    let mut line = serde_json::to_vec(op).unwrap_or_default();
    line.push(b'\n');
    line
}

fn write_all_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reports a journal that cannot be written once, not on every write, and says when it can
/// be written again.
#[derive(Default)]
struct Failing(bool);

impl Failing {
    fn report(&mut self, path: &Path, what: &str, result: &std::io::Result<()>) {
        match result {
            Err(e) if !self.0 => {
                self.0 = true;
                tracing::error!(path = %path.display(), error = %e, "cannot {what} the journal; invalidations are kept in memory only until it can be written (reported once)");
            }
            Ok(()) if self.0 => {
                self.0 = false;
                tracing::info!(path = %path.display(), "the journal can be written again");
            }
            _ => {}
        }
    }
}

/// Appends `appends` to the file with one sync, and confirms each.
fn append_all(path: &Path, appends: &mut Vec<(Vec<u8>, Done)>, failing: &mut Failing) {
    if appends.is_empty() {
        return;
    }
    let result = (|| -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        for (line, _) in appends.iter() {
            f.write_all(line)?;
        }
        f.sync_data()
    })();
    failing.report(path, "write", &result);
    let result = result.map_err(|e| e.to_string());
    for (_, done) in appends.drain(..) {
        let _ = done.send(result.clone());
    }
}

/// The writer thread: drains what is queued, writes it, syncs once, confirms each command.
fn run_writer(path: PathBuf, commands: mpsc::Receiver<Command>) {
    let mut failing = Failing::default();
    while let Ok(first) = commands.recv() {
        let mut appends = Vec::new();
        for command in std::iter::once(first).chain(commands.try_iter()) {
            match command {
                Command::Append(line, done) => appends.push((line, done)),
                Command::Rewrite(content, done) => {
                    append_all(&path, &mut appends, &mut failing);
                    let result = write_all_atomically(&path, &content);
                    failing.report(&path, "rewrite", &result);
                    let _ = done.send(result.map_err(|e| e.to_string()));
                }
            }
        }
        append_all(&path, &mut appends, &mut failing);
    }
}

impl Journal {
    /// Opens the journal at `path` (none: memory only), loading what a previous process left.
    /// A corrupt line is skipped with a warning.
    pub fn open(path: Option<PathBuf>, max_ops: usize) -> Self {
        let mut ops = Vec::new();
        if let Some(p) = &path {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        match serde_json::from_str::<Invalidation>(line) {
                            Ok(op) => ops.push(op.normalised()),
                            Err(e) => {
                                tracing::warn!(path = %p.display(), error = %e, "skipping a corrupt journal line")
                            }
                        }
                    }
                    if !ops.is_empty() {
                        tracing::warn!(count = ops.len(), path = %p.display(), "invalidations from a previous run will be replayed to redis before it serves");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "cannot read the journal")
                }
            }
        }
        let writer = path.clone().map(|p| {
            let (tx, rx) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("runcache-journal".into())
                .spawn(move || run_writer(p, rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the journal writer; invalidations are kept in memory only");
            }
            Mutex::new(tx)
        });
        Self {
            pending: Mutex::new(ops),
            writer,
            path,
            max_ops: max_ops.max(1),
        }
    }

    /// Where it is kept on disk.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn send(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        let writer = self.writer.as_ref()?;
        let (done, wait) = oneshot::channel();
        let sent = writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(command(done));
        sent.ok().map(|()| wait)
    }

    /// Operations pending.
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none are pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of what is pending (replayed into the memory tier after a snapshot load).
    pub fn pending(&self) -> Vec<Invalidation> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Journals `op` if `condition` holds, checked under the journal's lock (the probe closes
    /// the circuit under the same lock, so an invalidation is either journaled before the
    /// circuit closes or sees it closed). Past `max_ops`, everything pending collapses into
    /// `overflow()`.
    pub fn append_if(
        &self,
        op: &Invalidation,
        condition: impl FnOnce() -> bool,
        overflow: impl FnOnce() -> Invalidation,
    ) -> Appended {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !condition() {
            return Appended::Declined;
        }
        if pending.len() >= self.max_ops {
            let all = overflow();
            tracing::warn!(
                pending = pending.len(),
                "journal overflow: every entry will be invalidated when redis returns"
            );
            *pending = vec![all.clone()];
            let content = line(&all);
            return Appended::Queued(self.send(|done| Command::Rewrite(content, done)));
        }
        pending.push(op.clone());
        let content = line(op);
        Appended::Queued(self.send(|done| Command::Append(content, done)))
    }

    /// Puts `ops` in front of what is pending (a recovery that must run first, or the rest of
    /// a replay that failed).
    pub fn prepend(&self, ops: Vec<Invalidation>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.splice(0..0, ops);
    }

    /// Takes everything pending, for a replay.
    pub fn take(&self) -> Vec<Invalidation> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `close` under the journal's lock if nothing is pending, then makes the file match
    /// (empty). Returns whether it ran and returned true.
    pub fn close_if_empty(&self, close: impl FnOnce() -> bool) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() || !close() {
            return false;
        }
        drop(self.send(|done| Command::Rewrite(Vec::new(), done)));
        true
    }

    /// After part of a replay: the file keeps only what is still pending.
    pub fn compact(&self) {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let content: Vec<u8> = pending.iter().flat_map(line).collect();
        drop(self.send(|done| Command::Rewrite(content, done)));
    }
}

/// Waits for an append to be durable; `Err` when the file could not be written (the
/// operation stays pending in memory all the same).
pub async fn durable(
    appended: Option<oneshot::Receiver<Result<(), String>>>,
) -> Result<(), String> {
    match appended {
        None => Ok(()),
        Some(wait) => wait
            .await
            .unwrap_or_else(|_| Err("the journal writer stopped".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str) -> Invalidation {
        Invalidation {
            bump: vec![key.to_owned()],
            ..Invalidation::default()
        }
    }

    #[tokio::test]
    async fn appends_survive_a_reopen_and_overflow_collapses() {
        let path =
            std::env::temp_dir().join(format!("runcache-journal-{}.log", uuid::Uuid::new_v4()));
        let journal = Journal::open(Some(path.clone()), 3);
        for k in ["a", "b", "c"] {
            let Appended::Queued(wait) = journal.append_if(&op(k), || true, || op("all")) else {
                panic!("declined");
            };
            durable(wait).await.expect("durable");
        }
        assert!(matches!(
            journal.append_if(&op("x"), || false, || op("all")),
            Appended::Declined
        ));
        assert_eq!(Journal::open(Some(path.clone()), 3).len(), 3);
        let Appended::Queued(wait) = journal.append_if(&op("d"), || true, || op("all")) else {
            panic!("declined");
        };
        durable(wait).await.expect("durable");
        assert_eq!(journal.pending(), vec![op("all")]);
        assert_eq!(
            Journal::open(Some(path.clone()), 3).pending(),
            vec![op("all")]
        );
        assert_eq!(journal.take().len(), 1);
        assert!(journal.close_if_empty(|| true));
        // The rewrite is queued behind nothing else: wait for the file to empty.
        for _ in 0..100 {
            if Journal::open(Some(path.clone()), 3).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(Journal::open(Some(path.clone()), 3).is_empty());
        let _ = std::fs::remove_file(path);
    }
}
