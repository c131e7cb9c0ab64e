//! A minimal HTTP/1.1 responder for `GET /metrics` (and `HEAD`): one request per connection, answered and closed.
//! Anything else gets 404 or 405. A request head is read within [`READ_TIMEOUT`] and at most
//! [`MAX_REQUEST_BYTES`], the answer written within [`WRITE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served
//! at once, so a slow or hostile client can hold neither memory nor the endpoint.
//!
//! The listener can be replaced while serving (a changed `metrics_listen` on SIGHUP): [`serve`] takes new
//! listeners from a channel, `None` meaning "stop listening".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::exposition::CONTENT_TYPE;
use super::listen::Bound;

/// Longest request head accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 8;

/// Produces the exposition text, or says why it cannot. Runs on a blocking thread (it reads the queue).
pub type Scrape = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// A response: status line, extra headers, body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
    send_body: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8")],
            body: format!("{body}\n"),
            send_body: true,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {}\r\n", self.status);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut bytes = head.into_bytes();
        if self.send_body {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// Serves `listener` (and each listener `rebind` brings) until `stop`.
pub async fn serve(
    mut listener: Option<Bound>,
    mut rebind: mpsc::UnboundedReceiver<Option<Bound>>,
    scrape: Scrape,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut rebind_open = true;
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let connection = tokio::select! {
            _ = stop.cancelled() => return,
            next = rebind.recv(), if rebind_open => {
                match next {
                    Some(new) => {
                        match &new {
                            Some(bound) => tracing::info!("serving metrics on {}", bound.describe()),
                            None => tracing::info!("no longer serving metrics"),
                        }
                        listener = new;
                    }
                    None => rebind_open = false,
                }
                continue;
            }
            connection = accept(listener.as_ref()) => connection,
        };
        let scrape = Arc::clone(&scrape);
        match connection {
            Ok(Connection::Tcp(stream)) => {
                tokio::spawn(async move {
                    answer(stream, &scrape).await;
                    drop(permit);
                });
            }
            Ok(Connection::Unix(stream)) => {
                tokio::spawn(async move {
                    answer(stream, &scrape).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

fn accept(
    listener: Option<&Bound>,
) -> Pin<Box<dyn Future<Output = std::io::Result<Connection>> + Send + '_>> {
    match listener {
        Some(Bound::Tcp(l)) => {
            Box::pin(async move { l.accept().await.map(|(s, _)| Connection::Tcp(s)) })
        }
        Some(Bound::Unix(l, _)) => {
            Box::pin(async move { l.accept().await.map(|(s, _)| Connection::Unix(s)) })
        }
        None => Box::pin(std::future::pending()),
    }
}

/// Reads one request from `stream`, answers it and closes.
pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, scrape: &Scrape) {
    let response = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text("408 Request Timeout", "no request within 5 s"),
        Ok(Err(response)) => response,
        Ok(Ok(head)) => respond(&head, scrape).await,
    };
    let _ = timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.encode()).await?;
        stream.shutdown().await
    })
    .await;
}

/// The request head, up to the blank line.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<String, Response> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|_| Response::text("400 Bad Request", "unreadable request"))?;
        if n == 0 {
            return Err(Response::text("400 Bad Request", "incomplete request"));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return String::from_utf8(head)
                .map_err(|_| Response::text("400 Bad Request", "request head is not UTF-8"));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Err(Response::text(
                "431 Request Header Fields Too Large",
                "request head over 8 KiB",
            ));
        }
    }
}

async fn respond(head: &str, scrape: &Scrape) -> Response {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Response::text("400 Bad Request", "malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text("505 HTTP Version Not Supported", "HTTP/1.x only");
    }
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Response::text("404 Not Found", "only /metrics is served here");
    }
    let send_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => {
            let mut response = Response::text("405 Method Not Allowed", "GET or HEAD only");
            response.headers.push(("Allow", "GET, HEAD"));
            return response;
        }
    };
    let scrape = Arc::clone(scrape);
    let result = tokio::task::spawn_blocking(move || scrape())
        .await
        .unwrap_or_else(|e| Err(format!("scrape task failed: {e}")));
    match result {
        Ok(body) => Response {
            status: "200 OK",
            headers: vec![("Content-Type", CONTENT_TYPE)],
            body,
            send_body,
        },
        Err(e) => {
            let e = crate::secret::scrub(&e);
            tracing::error!("metrics scrape failed: {e}");
            Response::text("500 Internal Server Error", &e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> Scrape {
        Arc::new(|| Ok("nixpush_up_to_date 1\n".to_owned()))
    }

    async fn exchange(request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move { answer(server, &scrape()).await });
        client.write_all(request).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        out
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition_and_closes() {
        let out = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("Content-Type: text/plain; version=0.0.4"),
            "{out}"
        );
        assert!(
            out.contains("Content-Length: 21\r\nConnection: close\r\n"),
            "{out}"
        );
        assert!(out.ends_with("\r\n\r\nnixpush_up_to_date 1\n"), "{out}");
        let head = exchange(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(
            head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn anything_else_is_refused_by_name() {
        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
            (
                b"GET /metrics SPDY/3\r\n\r\n",
                "505 HTTP Version Not Supported",
            ),
            (b"nonsense\r\n\r\n", "400 Bad Request"),
            (b"GET /metrics HTTP/1.1\r\n", "400 Bad Request"),
        ] {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let task = tokio::spawn(async move { answer(server, &scrape()).await });
            client.write_all(request).await.unwrap();
            client.shutdown().await.unwrap();
            let mut out = String::new();
            client.read_to_string(&mut out).await.unwrap();
            task.await.unwrap();
            assert!(out.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{out}");
        }
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'x', MAX_REQUEST_BYTES + 10));
        let out = exchange(&huge).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_answered_408_after_the_read_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { answer(server, &scrape()).await });
        client.write_all(b"GET /met").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert_eq!(started.elapsed(), READ_TIMEOUT);
    }
}
