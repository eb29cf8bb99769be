//! Event notifications to a webhook: JSON POSTs from one worker behind a
//! bounded queue, so a slow or dead receiver never holds up a health stream
//! (when the queue is full the event is still in the database, and counted).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::health::backoff::{Backoff, jitter};

const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 5;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of one notification.
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub host: String,
    pub kind: String,
    pub detail: String,
    /// RFC 3339 UTC.
    pub at: String,
    pub at_unix: i64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    queue: mpsc::Sender<Notification>,
    counters: Arc<Counters>,
}

// A webhook URL often carries a token in its path: it is never repeated in
// messages or logs.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook URL is not usable ({0}); give an http:// or https:// URL with a host")]
    BadUrl(String),
    #[error("webhook client: {0}")]
    Client(String),
}

impl Webhook {
    /// Checks `url` and starts the delivery worker.
    pub fn start(url: &str) -> Result<Webhook, WebhookError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| WebhookError::BadUrl(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(WebhookError::BadUrl(format!("scheme {}", parsed.scheme())));
        }
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        tokio::spawn(deliver(client, parsed, rx, counters.clone()));
        Ok(Webhook { queue, counters })
    }

    pub fn counts(&self) -> crate::health::metrics::WebhookCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        crate::health::metrics::WebhookCounts {
            delivered: get(&self.counters.delivered),
            failed: get(&self.counters.failed),
            dropped: get(&self.counters.dropped),
        }
    }

    /// Queues a notification; never waits.
    pub fn send(&self, notification: Notification) {
        if self.queue.try_send(notification).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("webhook queue full: an event was not sent (it is in the event log)");
        }
    }
}

async fn deliver(
    client: reqwest::Client,
    url: reqwest::Url,
    mut rx: mpsc::Receiver<Notification>,
    counters: Arc<Counters>,
) {
    while let Some(n) = rx.recv().await {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(16));
        let mut outcome = String::new();
        let mut delivered = false;
        for attempt in 1..=ATTEMPTS {
            match client.post(url.clone()).json(&n).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                // A receiver that refuses the request will refuse it again.
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    outcome = format!("answered {}", r.status());
                    break;
                }
                Ok(r) => outcome = format!("answered {}", r.status()),
                Err(e) => outcome = crate::error_chain(&e.without_url()),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff.next(jitter())).await;
            }
        }
        if delivered {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(host = %n.host, kind = %n.kind, "webhook delivery failed: {outcome}");
        }
    }
}
