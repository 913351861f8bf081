//! Market messages over libp2p: one stream per message on the market protocol, a
//! length prefix and the `market::wire` encoding. The remote peer id comes from the
//! connection (Noise-authenticated), so a message's sender is known for sure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use market::MarketMsg;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::error::{Error, Result};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/cpushare/market/1");
/// How long one send may take, dial included.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a peer may take to hand over one message.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// The byte a reader answers once it has taken a whole message.
const TAKEN: u8 = 0x5a;
/// Sends tried before a message is given up: libp2p-stream drops an inbound stream
/// that arrives while the reader's one-slot queue is full, so a burst can lose one;
/// the cores are idempotent, so a message that arrives twice does no harm.
const SEND_ATTEMPTS: u32 = 4;

/// Inbound market streams libp2p-stream dropped because its one-slot accept queue
/// was full (a burst from one peer: the daemons retry theirs, others lose them).
/// libp2p-stream says so only in a debug event; [`dropped_streams_layer`] counts
/// those events, whatever the log level.
static DROPPED_STREAMS: AtomicU64 = AtomicU64::new(0);

/// The drops counted so far (this process has one daemon).
pub fn dropped_streams() -> u64 {
    DROPPED_STREAMS.load(Ordering::Relaxed)
}

/// A tracing layer that counts libp2p-stream's "dropping inbound stream" events
/// for the market protocol; the daemon's subscriber carries it beside the log.
pub fn dropped_streams_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    DroppedStreams.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target("libp2p_stream", tracing::Level::DEBUG),
    )
}

struct DroppedStreams;

/// The fields of one libp2p-stream event that tell a dropped market stream.
#[derive(Default)]
struct DropEvent {
    dropping: bool,
    market: bool,
}

impl tracing::field::Visit for DropEvent {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        match field.name() {
            "message" => self.dropping = v.contains("dropping inbound stream"),
            "protocol" => self.market = v.contains(PROTOCOL.as_ref()),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DroppedStreams {
    fn on_event(&self, ev: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut d = DropEvent::default();
        ev.record(&mut d);
        if d.dropping && d.market {
            DROPPED_STREAMS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone)]
pub struct MarketNet {
    control: libp2p_stream::Control,
    /// Messages refused as malformed or oversized.
    pub rejects: Arc<AtomicU64>,
}

impl MarketNet {
    pub fn new(control: libp2p_stream::Control) -> MarketNet {
        MarketNet {
            control,
            rejects: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sends `msg` to `peer` in the background (dialing it if needed); a failure is
    /// logged: the cores retry what matters (receipts, acks) on their own timers.
    pub fn send(&self, peer: PeerId, msg: MarketMsg) {
        let net = self.clone();
        tokio::spawn(async move {
            net.deliver(peer, &msg).await;
        });
    }

    /// Sends `msg` to `peer` now, trying up to SEND_ATTEMPTS times within
    /// SEND_TIMEOUT; true once the peer said it took the message.
    pub async fn deliver(&self, peer: PeerId, msg: &MarketMsg) -> bool {
        let mut control = self.control.clone();
        let bytes = market::encode(msg);
        for attempt in 1..=SEND_ATTEMPTS {
            let r = tokio::time::timeout(SEND_TIMEOUT / SEND_ATTEMPTS, async {
                let mut s = control
                    .open_stream(peer, PROTOCOL)
                    .await
                    .map_err(|e| e.to_string())?;
                s.write_all(&(bytes.len() as u32).to_be_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                s.write_all(&bytes).await.map_err(|e| e.to_string())?;
                // Half-close: the reader sees the end of the message, then says so.
                s.close().await.map_err(|e| e.to_string())?;
                let mut taken = [0u8; 1];
                s.read_exact(&mut taken).await.map_err(|e| e.to_string())?;
                if taken[0] != TAKEN {
                    return Err("the peer did not take the message".to_string());
                }
                Ok(())
            })
            .await;
            match r {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => debug!(%peer, attempt, error = %e, "market message not sent"),
                Err(_) => debug!(%peer, attempt, "market message timed out"),
            }
        }
        false
    }

    /// Accepts market streams; every well-formed message arrives on the channel with
    /// its sender. Malformed ones are counted and logged, never passed on.
    pub fn listen(&self) -> Result<mpsc::UnboundedReceiver<(PeerId, MarketMsg)>> {
        let mut incoming = self
            .control
            .clone()
            .accept(PROTOCOL)
            .map_err(|e| Error::P2p(format!("market protocol: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let rejects = self.rejects.clone();
        tokio::spawn(async move {
            while let Some((peer, mut stream)) = incoming.next().await {
                let tx = tx.clone();
                let rejects = rejects.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(READ_TIMEOUT, async {
                        let mut len = [0u8; 4];
                        stream
                            .read_exact(&mut len)
                            .await
                            .map_err(|e| e.to_string())?;
                        let len = u32::from_be_bytes(len) as usize;
                        if len > market::MAX_MSG {
                            return Err(format!("message of {len} bytes is over the limit"));
                        }
                        let mut buf = vec![0u8; len];
                        stream
                            .read_exact(&mut buf)
                            .await
                            .map_err(|e| e.to_string())?;
                        // One message per stream: anything after its frame is malformed.
                        let mut extra = [0u8; 1];
                        match stream.read(&mut extra).await {
                            Ok(0) => {}
                            Ok(_) => return Err("bytes after the message's frame".to_string()),
                            Err(e) => return Err(e.to_string()),
                        }
                        let msg = market::decode(&buf).map_err(|e| e.to_string())?;
                        let _ = stream.write_all(&[TAKEN]).await;
                        let _ = stream.close().await;
                        Ok(msg)
                    })
                    .await;
                    match r {
                        Ok(Ok(msg)) => {
                            let _ = tx.send((peer, msg));
                        }
                        Ok(Err(e)) => {
                            rejects.fetch_add(1, Ordering::Relaxed);
                            warn!(%peer, error = %e, "malformed market message refused");
                        }
                        Err(_) => {
                            rejects.fetch_add(1, Ordering::Relaxed);
                            warn!(%peer, "market message not finished in time: refused");
                        }
                    }
                });
            }
        });
        Ok(rx)
    }
}
