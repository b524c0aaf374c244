//! Session re-checks for long-lived proxied responses. A Server-Sent Events stream (or any body
//! that keeps streaming) would otherwise go on delivering the user's data after logout for as
//! long as the upstream keeps it open; an upstream that does not re-check sessions itself would
//! never end it. Like a WebSocket tunnel, the body is re-checked every `session_recheck` while it
//! is still streaming: when the session has ended, the response is cut off with an error (not a
//! clean end, so a download cannot look complete; an `EventSource` reconnects and gets a 401).
//!
//! Short answers end before the first check and cost no timer at all: the timer is only made when
//! the body first waits for the upstream (or the re-check is already due), so the common
//! small response never registers one. A store outage does not end a stream (as for tunnels):
//! only an answer that the session is gone does — or a back-channel logout for it that this
//! replica holds because the store could not take it (checked before the store is asked).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::exchange::{Exchange, ExchangeError, LiveCheck};
use crate::session::SessionId;

/// Why a stream was cut off; the client only sees the connection end.
#[derive(Debug, thiserror::Error)]
#[error("the session ended while the response was streaming")]
pub struct SessionEnded;

type Check = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A response body that ends when its session does. It also holds whatever must live as long as
/// the body (the route's in-flight permit).
pub struct Rechecked<B, H> {
    inner: B,
    every: Duration,
    /// When the first re-check is due.
    first_due: tokio::time::Instant,
    /// Made only once the body waits or the first re-check is due.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    check: Option<Check>,
    exchange: Arc<Exchange>,
    id: Arc<SessionId>,
    /// What `resolve` knew: a pending back-channel logout ends the stream even while the store is down.
    known: Arc<LiveCheck>,
    prefix: Arc<str>,
    ended: bool,
    _held: H,
}

impl<B, H> Rechecked<B, H> {
    pub fn new(
        inner: B,
        every: Duration,
        exchange: Arc<Exchange>,
        id: SessionId,
        known: LiveCheck,
        prefix: &Arc<str>,
        held: H,
    ) -> Self {
        Self {
            inner,
            every,
            first_due: tokio::time::Instant::now() + every,
            timer: None,
            check: None,
            exchange,
            id: Arc::new(id),
            known: Arc::new(known),
            prefix: prefix.clone(),
            ended: false,
            _held: held,
        }
    }

    /// Drive the re-check: start one when the timer fires, and report whether the session ended.
    fn session_ended(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if let Some(check) = self.check.as_mut() {
                match check.as_mut().poll(cx) {
                    Poll::Pending => return false,
                    Poll::Ready(alive) => {
                        self.check = None;
                        if !alive {
                            return true;
                        }
                        let next = tokio::time::Instant::now() + self.every;
                        match self.timer.as_mut() {
                            Some(t) => t.as_mut().reset(next),
                            None => self.timer = Some(Box::pin(tokio::time::sleep_until(next))),
                        }
                    }
                }
            }
            let timer = match self.timer.as_mut() {
                Some(t) => t,
                // No timer yet: nothing to do before the first re-check is due.
                None if tokio::time::Instant::now() < self.first_due => return false,
                None => self.timer.insert(Box::pin(tokio::time::sleep_until(self.first_due))),
            };
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let (exchange, id, known) = (self.exchange.clone(), self.id.clone(), self.known.clone());
            self.check = Some(Box::pin(async move {
                !matches!(exchange.still_live(&id, &known).await, Err(ExchangeError::InvalidSession))
            }));
        }
    }
}

impl<B, H> Body for Rechecked<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
    H: Unpin,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if this.session_ended(cx) {
            this.ended = true;
            tracing::info!(route = %this.prefix, "session ended: streaming response cut off");
            return Poll::Ready(Some(Err(Box::new(SessionEnded))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(Into::into))),
            Poll::Pending => {
                // The body waits for the upstream: from now on the timer must wake us when the
                // re-check is due, even if the upstream stays silent.
                if this.timer.is_none() {
                    this.timer = Some(Box::pin(tokio::time::sleep_until(this.first_due)));
                    if this.session_ended(cx) {
                        this.ended = true;
                        tracing::info!(route = %this.prefix, "session ended: streaming response cut off");
                        return Poll::Ready(Some(Err(Box::new(SessionEnded))));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wrap a proxied response body so that it ends with its session.
pub fn rechecked<B, H>(
    body: B,
    every: Duration,
    exchange: Arc<Exchange>,
    id: SessionId,
    known: LiveCheck,
    prefix: &Arc<str>,
    held: H,
) -> axum::body::Body
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<axum::BoxError>,
    H: Unpin + Send + 'static,
{
    axum::body::Body::new(Rechecked::new(body, every, exchange, id, known, prefix, held))
}
