//! The pass-through client (`gateway.pass_through`, SPEC section 9): a request that is no
//! view's goes to the origin as a stream, and its answer comes back as one, so an upload or a
//! download of any size passes in bounded memory.
//!
//! A client of its own, built once (its connection pool apart from the views'), with the
//! views' connect time-out, no redirects followed, and no total time-out: `origin.timeout_ms`
//! bounds instead every pause of either body (an idle time-out, so a 200 MB download is never
//! cut for taking long) and the wait for the answer's head once the request is sent.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::{OriginError, map_err, without_hop_by_hop};
use crate::config::{OriginSettings, ms};

/// An error of a streamed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// Why a pass-through got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The origin failed, or was silent for longer than `origin.timeout_ms`.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// The client's request body paused for longer than `origin.timeout_ms`.
    #[error("the request body stalled")]
    ClientStalled,
}

/// The origin's answer: its status, its end-to-end headers, and its body as a stream.
pub struct Streamed {
    /// Status, as the origin sent it.
    pub status: StatusCode,
    /// The origin's headers without the hop-by-hop ones.
    pub headers: HeaderMap,
    /// The body, streamed; it fails if the origin pauses longer than `origin.timeout_ms`.
    pub body: BodyStream,
}

/// The pass-through client. Cloning shares the connection pool.
#[derive(Debug, Clone)]
pub struct StreamClient {
    client: reqwest::Client,
    base_url: String,
    idle: Duration,
}

impl StreamClient {
    /// Builds the client from settings (validated beforehand).
    pub fn new(settings: &OriginSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(ms(settings.connect_timeout_ms))
            .pool_idle_timeout(ms(settings.pool_idle_timeout_ms))
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            idle: ms(settings.timeout_ms),
        })
    }

    /// Sends `method` `path_and_query` (appended to `origin.base_url` as it is) with the
    /// client's `headers` (hop-by-hop ones, `Host` and `Expect` are left out here) and `body`,
    /// and returns the origin's answer as soon as its head arrives.
    #[tracing::instrument(name = "pass", skip_all, fields(method = %method, path = %path_and_query))]
    pub async fn send<S, E>(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Option<S>,
    ) -> Result<Streamed, PassError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let mut out = without_hop_by_hop(headers);
        // Host is the origin's (reqwest writes it from the URL); `Expect: 100-continue` was
        // answered here, by the server reading the body.
        out.remove(header::HOST);
        out.remove(header::EXPECT);
        let url = format!("{}{path_and_query}", self.base_url);
        let mut builder = self.client.request(method, url);
        let upload = body.map(|body| Upload::new(body, self.idle));
        let progress = upload.as_ref().map(|u| u.progress.clone());
        if let Some(upload) = upload {
            if !out.contains_key(header::CONTENT_LENGTH) {
                // This hop's framing (the client's was hop-by-hop): without it, hyper sends a
                // GET's body of unknown length as no body at all.
                out.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            builder = builder.body(reqwest::Body::wrap_stream(upload));
        }
        let pending = builder.headers(out).send();
        let resp = self.await_head(pending, progress).await?;
        let status = resp.status();
        let headers = without_hop_by_hop(resp.headers());
        let body = Box::pin(Idle::new(resp.bytes_stream(), self.idle));
        Ok(Streamed {
            status,
            headers,
            body,
        })
    }

    /// Waits for the answer's head: while the body is sent, for as long as it moves (no pause
    /// longer than the idle time-out); after it, for at most the idle time-out.
    async fn await_head(
        &self,
        pending: impl Future<Output = Result<reqwest::Response, reqwest::Error>>,
        progress: Option<Arc<Progress>>,
    ) -> Result<reqwest::Response, PassError> {
        let mut pending = std::pin::pin!(pending);
        let mut sending = progress.is_some();
        let progress = progress.unwrap_or_default();
        loop {
            let deadline = tokio::time::sleep(self.idle);
            tokio::select! {
                biased;
                resp = &mut pending => {
                    return match resp {
                        Ok(resp) => Ok(resp),
                        Err(_) if progress.client_failed.load(Ordering::Acquire) => {
                            Err(PassError::ClientStalled)
                        }
                        Err(e) => Err(map_err(e).into()),
                    };
                }
                () = progress.moved.notified(), if sending => {
                    sending = !progress.done.load(Ordering::Acquire);
                }
                () = deadline => {
                    return Err(if sending && progress.waiting_on_client.load(Ordering::Acquire) {
                        PassError::ClientStalled
                    } else {
                        OriginError::Timeout.into()
                    });
                }
            }
        }
    }
}

/// How an upload goes, seen from [`StreamClient::await_head`].
#[derive(Debug, Default)]
struct Progress {
    /// Notified at every chunk and at the end.
    moved: Notify,
    /// The whole body was read.
    done: AtomicBool,
    /// Waiting for the client's next chunk (rather than for the origin to take one).
    waiting_on_client: AtomicBool,
    /// The client's body failed (the connection was lost, or it paused too long).
    client_failed: AtomicBool,
}

/// The client's body on its way to the origin: reports its progress, and fails when the
/// client pauses longer than the idle time-out.
struct Upload<S> {
    inner: Pin<Box<S>>,
    progress: Arc<Progress>,
    pause: Pause,
}

impl<S> Upload<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner: Box::pin(inner),
            progress: Arc::default(),
            pause: Pause::new(idle),
        }
    }
}

impl<S, E> Stream for Upload<S>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Into<BoxError>,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let p = &this.progress;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Pending => {
                p.waiting_on_client.store(true, Ordering::Release);
                if this.pause.too_long(cx) {
                    p.client_failed.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err("the request body stalled".into())));
                }
                Poll::Pending
            }
            Poll::Ready(item) => {
                this.pause.end();
                p.waiting_on_client.store(false, Ordering::Release);
                match &item {
                    None => p.done.store(true, Ordering::Release),
                    Some(Err(_)) => p.client_failed.store(true, Ordering::Release),
                    Some(Ok(_)) => {}
                }
                p.moved.notify_one();
                Poll::Ready(item.map(|r| r.map_err(Into::into)))
            }
        }
    }
}

/// A wait for a stream's next item, bounded: the clock starts when a poll finds nothing yet,
/// and stops when an item comes. The time between an item and the next poll (a consumer slow
/// to ask, such as a client reading slowly) does not count.
struct Pause {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Pause {
    fn new(limit: Duration) -> Self {
        Self { limit, timer: None }
    }

    /// Whether the current wait has lasted the limit (starting the clock if none runs).
    fn too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        timer.as_mut().poll(cx).is_ready()
    }

    /// An item came.
    fn end(&mut self) {
        self.timer = None;
    }
}

/// A stream that fails when its next item takes longer than `limit` to come (see `Pause`).
pub struct Idle<S> {
    inner: S,
    pause: Pause,
}

impl<S> Idle<S> {
    /// `inner`, with `limit` on each wait.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            pause: Pause::new(limit),
        }
    }
}

impl<S, E> Stream for Idle<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(item) => {
                this.pause.end();
                Poll::Ready(item.map(|r| {
                    r.map_err(|e| {
                        let e = e.into();
                        tracing::warn!(error = %e, "the origin's answer ended early; passed-through body cut");
                        e
                    })
                }))
            }
            Poll::Pending if this.pause.too_long(cx) => {
                tracing::warn!(
                    idle_ms = this.pause.limit.as_millis() as u64,
                    "the origin's answer paused too long; passed-through body cut"
                );
                Poll::Ready(Some(Err("the origin's answer paused too long".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn only_a_wait_for_the_next_chunk_counts_against_the_idle_limit() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, BoxError>>(4);
        let mut body = Idle::new(stream_of(rx), Duration::from_millis(100));
        tx.send(Ok(Bytes::from_static(b"a"))).await.expect("send");
        assert_eq!(&body.next().await.expect("item").expect("a")[..], b"a");
        // A consumer that waits long before asking again is not a pause of the producer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(Ok(Bytes::from_static(b"b"))).await.expect("send");
        assert_eq!(&body.next().await.expect("item").expect("b")[..], b"b");
        // A producer silent past the limit is.
        let started = Instant::now();
        assert!(body.next().await.expect("item").is_err());
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(tx);
    }

    fn stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
