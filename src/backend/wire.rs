//! Bytes on the wire: the one place where NAR bytes leave for the target, counted per path and throttled by the
//! target's [`RateLimiter`].
//!
//! Every backend sends a NAR from its file with [`file_body`] (HTTP and S3 single PUTs, S3 and Cachix parts);
//! `file://` has no wire, so its "on the wire" is the compressed bytes written into the cache, through
//! [`MeteredWriter`]. The engine puts the path's [`Meter`] in scope around the backend's upload
//! ([`metered`]); the body picks it up when it is made, so backends need no extra parameter, and a body made
//! outside any scope (small documents, tests) is simply not metered.

use std::future::Future;
use std::io::{self, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::rate::RateLimiter;
use super::Error;

/// Read size of NAR bodies.
const READ_CHUNK: usize = 256 * 1024;

/// Where one path's bytes on the wire are counted and throttled.
#[derive(Debug, Clone)]
pub struct Meter {
    /// The target's limiter, shared by all its workers.
    pub limiter: Arc<RateLimiter>,
    /// This path's bytes on the wire (every try counts: bytes sent again were sent).
    pub sent: Arc<AtomicU64>,
}

impl Meter {
    /// A meter counting into a fresh counter.
    pub fn new(limiter: Arc<RateLimiter>) -> Meter {
        Meter {
            limiter,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }
}

tokio::task_local! {
    static CURRENT: Meter;
}

/// Runs `upload` with `meter` counting and throttling the NAR bodies it makes.
pub async fn metered<F: Future>(meter: Meter, upload: F) -> F::Output {
    CURRENT.scope(meter, upload).await
}

/// The meter in scope, if any.
pub fn current() -> Option<Meter> {
    CURRENT.try_with(Meter::clone).ok()
}

/// A request body streaming `length` bytes of `file` from `offset`, through the meter in scope. Opened afresh
/// for each try. Fails at once, without a retry worth trying, once the limiter was aborted.
pub async fn file_body(file: &Path, offset: u64, length: u64) -> Result<reqwest::Body, Error> {
    Ok(reqwest::Body::wrap_stream(
        file_stream(file, offset, length, current()).await?,
    ))
}

async fn file_stream(
    file: &Path,
    offset: u64,
    length: u64,
    meter: Option<Meter>,
) -> Result<BoxStream<'static, io::Result<Bytes>>, Error> {
    if meter.as_ref().is_some_and(|m| m.limiter.is_aborted()) {
        return Err(Error::Interrupted);
    }
    let mut handle = tokio::fs::File::open(file)
        .await
        .map_err(|e| Error::io(file, e))?;
    if offset > 0 {
        handle
            .seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::io(file, e))?;
    }
    let reader = tokio_util::io::ReaderStream::with_capacity(handle.take(length), READ_CHUNK);
    let Some(meter) = meter else {
        return Ok(reader.boxed());
    };
    let throttled = stream::unfold(
        (reader, meter, Bytes::new()),
        |(mut reader, meter, mut rest)| async move {
            if rest.is_empty() {
                match reader.next().await? {
                    Ok(chunk) => rest = chunk,
                    Err(e) => return Some((Err(e), (reader, meter, rest))),
                }
            }
            let piece = rest.split_to(rest.len().min(meter.limiter.burst()));
            if let Err(e) = meter.limiter.take(piece.len()).await {
                return Some((Err(io::Error::other(e)), (reader, meter, rest)));
            }
            meter.sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            Some((Ok(piece), (reader, meter, rest)))
        },
    );
    Ok(throttled.boxed())
}

/// A writer whose bytes are on the wire (`file://`: the cache file itself), counted and throttled like a body.
/// Blocking: for the NAR preparation threads.
pub struct MeteredWriter<W> {
    inner: W,
    meter: Meter,
}

impl<W: Write> MeteredWriter<W> {
    /// Meters writes to `inner`.
    pub fn new(inner: W, meter: Meter) -> MeteredWriter<W> {
        MeteredWriter { inner, meter }
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The inner writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for MeteredWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.meter.limiter.burst());
        // An abort is `ErrorKind::Other`: `write_all` retries `Interrupted` for ever.
        self.meter
            .limiter
            .take_blocking(n)
            .map_err(io::Error::other)?;
        self.inner.write_all(&buf[..n])?;
        self.meter.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_schedule::Rate;

    #[tokio::test]
    async fn bodies_in_scope_are_counted_and_bodies_outside_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nar");
        std::fs::write(&file, vec![7u8; 300_000]).unwrap();
        let meter = Meter::new(Arc::new(RateLimiter::new(Rate::Unlimited)));
        let mut stream = file_stream(&file, 1000, 200_000, Some(meter.clone()))
            .await
            .unwrap();
        let mut received = 0;
        while let Some(chunk) = stream.next().await {
            received += chunk.unwrap().len();
        }
        assert_eq!(received, 200_000);
        assert_eq!(meter.sent.load(Ordering::Relaxed), 200_000);
        assert_eq!(meter.limiter.total_sent(), 200_000);
        assert!(file_body(&file, 0, 10).await.is_ok());
        assert_eq!(meter.limiter.total_sent(), 200_000);
        meter.limiter.abort();
        let refused = metered(meter.clone(), file_body(&file, 0, 10)).await;
        assert!(matches!(refused, Err(Error::Interrupted)));
    }

    #[test]
    fn the_writer_counts_what_it_writes() {
        let meter = Meter::new(Arc::new(RateLimiter::new(Rate::Unlimited)));
        let mut writer = MeteredWriter::new(Vec::new(), meter.clone());
        writer.write_all(&[1u8; 200_000]).unwrap();
        assert_eq!(writer.into_inner().len(), 200_000);
        assert_eq!(meter.sent.load(Ordering::Relaxed), 200_000);
    }
}
