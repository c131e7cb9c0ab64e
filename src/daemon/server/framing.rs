//! Reading length-prefixed frames off a connection: a small first read (a hook's whole request), then only
//! what the announced length still needs, up to a deadline. The buffer grows only with what arrives.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{timeout_at, Instant};

use crate::protocol::{self, ErrorKind, MAX_FRAME_BYTES};

/// The first read of a request: enough for any hook's request.
pub(super) const FIRST_READ: usize = 4096;
/// Largest single read; a frame bigger than this arrives in several.
const READ_CHUNK: usize = 64 * 1024;

/// Appends up to `max` bytes from one read to `received`; returns how many (0 at end of stream).
pub(super) async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    received: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    // `read_buf` on a full Vec would only grow it by 64 bytes at a time.
    received.reserve(max);
    let mut limited = (&mut *stream).take(max as u64);
    limited.read_buf(received).await
}

/// Takes one frame's payload from `received`, reading more until it is complete. The buffer grows only with
/// what actually arrives, so a client announcing 1 MiB and sending nothing costs nothing.
pub(super) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    received: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, (ErrorKind, String)> {
    let mut needed = 4;
    let mut len = None;
    loop {
        if len.is_none() && received.len() >= 4 {
            let header = [received[0], received[1], received[2], received[3]];
            let frame_len = protocol::frame_len(header).map_err(|e| (e.kind(), e.to_string()))?;
            len = Some(frame_len);
            needed = 4 + frame_len;
        }
        if received.len() >= needed {
            if let Some(len) = len {
                debug_assert!(len <= MAX_FRAME_BYTES);
                let payload = received[4..needed].to_vec();
                received.drain(..needed);
                return Ok(payload);
            }
        }
        let want = (needed - received.len()).min(READ_CHUNK);
        match timeout_at(deadline, read_some(stream, received, want)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err((
                    ErrorKind::Malformed,
                    "connection closed in the middle of a request".to_owned(),
                ))
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                return Err((
                    ErrorKind::Timeout,
                    "request not complete within the client timeout".to_owned(),
                ))
            }
        }
    }
}
