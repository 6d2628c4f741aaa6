//! Counting what a deployment costs on the wire: the SFTP requests each
//! session sends and the round trips they take.
//!
//! The SFTP byte streams of a session are wrapped: every packet the client
//! writes (except the `INIT` greeting) is a request, every packet the
//! server writes (except its `VERSION` answer) is a response. A round trip
//! is a point where the client sends while nothing it sent before is still
//! awaited: requests that leave together (pipelined before anybody waits)
//! count as one, and a request sent while earlier ones are still in flight
//! rides on their round trip. On a session that one deployment uses at a
//! time (one deployment per host at a time) this is exactly the number of
//! times the deployment waited for the host; when deployments to several
//! targets of one host overlap, their waits overlap too and are counted
//! once (the count is then a lower bound per deployment).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// SFTP packet types that are not requests or responses.
const SSH_FXP_INIT: u8 = 1;
const SSH_FXP_VERSION: u8 = 2;

/// Totals over every session of a pool.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) requests: AtomicU64,
    pub(crate) round_trips: AtomicU64,
    /// Remote commands run (exec channels: validate, reload, lookups,
    /// directory syncs), each at least one round trip of its own.
    pub(crate) commands: AtomicU64,
}

/// One session's requests still awaiting their response.
#[derive(Debug)]
struct Session {
    outstanding: AtomicI64,
    totals: Arc<Totals>,
}

/// Wrap a session's two byte streams (client → server, server → client).
pub(crate) fn wrap<W, R>(totals: Arc<Totals>, w: W, r: R) -> (CountingWriter<W>, CountingReader<R>) {
    let s = Arc::new(Session { outstanding: AtomicI64::new(0), totals });
    (
        CountingWriter { inner: w, parse: Framer::default(), s: s.clone() },
        CountingReader { inner: r, parse: Framer::default(), s },
    )
}

/// Finds the packet boundaries of an SFTP byte stream (`u32` length, then
/// the type byte and the rest), fed in pieces.
#[derive(Clone, Copy, Debug, Default)]
struct Framer {
    header: [u8; 5],
    have: usize,
    /// Bytes of the current packet still to come after its header.
    rest: u64,
}

impl Framer {
    /// Consume `buf`; `each(type)` for every packet whose header completes.
    fn feed(&mut self, mut buf: &[u8], mut each: impl FnMut(u8)) {
        while !buf.is_empty() {
            if self.rest > 0 {
                let n = (self.rest.min(buf.len() as u64)) as usize;
                self.rest -= n as u64;
                buf = &buf[n..];
                continue;
            }
            let n = (5 - self.have).min(buf.len());
            self.header[self.have..self.have + n].copy_from_slice(&buf[..n]);
            self.have += n;
            buf = &buf[n..];
            if self.have == 5 {
                let len = u32::from_be_bytes([self.header[0], self.header[1], self.header[2], self.header[3]]);
                each(self.header[4]);
                self.rest = u64::from(len).saturating_sub(1);
                self.have = 0;
            }
        }
    }

    /// Requests (packets other than `INIT`) whose header completes in `bufs`.
    fn requests_in(&mut self, bufs: &[&[u8]]) -> i64 {
        let mut k = 0;
        for b in bufs {
            self.feed(b, |t| k += i64::from(t != SSH_FXP_INIT));
        }
        k
    }
}

/// The first `n` bytes of `bufs`.
fn prefix<'b>(bufs: &[&'b [u8]], mut n: usize) -> Vec<&'b [u8]> {
    let mut out = Vec::new();
    for b in bufs {
        if n == 0 {
            break;
        }
        let take = n.min(b.len());
        out.push(&b[..take]);
        n -= take;
    }
    out
}

/// The client → server stream: counts requests and round trips.
pub(crate) struct CountingWriter<W> {
    inner: W,
    parse: Framer,
    s: Arc<Session>,
}

/// The server → client stream: counts responses (requests no longer
/// awaited).
pub(crate) struct CountingReader<R> {
    inner: R,
    parse: Framer,
    s: Arc<Session>,
}

impl Session {
    /// Before `k` requests are offered to the stream: they are in flight
    /// from now (their responses may come back before the write returns).
    /// Whether nothing was in flight before them.
    fn offer(&self, k: i64) -> bool {
        k > 0 && self.outstanding.fetch_add(k, Ordering::SeqCst) <= 0
    }

    /// The write took `sent` of the `offered` requests (whether nothing
    /// was in flight before them: `idle`).
    fn sent(&self, offered: i64, sent: i64, idle: bool) {
        if sent < offered {
            self.outstanding.fetch_sub(offered - sent, Ordering::SeqCst);
        }
        if sent > 0 {
            self.totals.requests.fetch_add(sent as u64, Ordering::Relaxed);
            if idle {
                self.totals.round_trips.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> CountingWriter<W> {
    fn counted(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[&[u8]],
        write: impl FnOnce(Pin<&mut W>, &mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let offered = this.parse.clone().requests_in(bufs);
        let idle = this.s.offer(offered);
        let r = write(Pin::new(&mut this.inner), cx);
        let sent = match &r {
            Poll::Ready(Ok(n)) => this.parse.requests_in(&prefix(bufs, *n)),
            _ => 0,
        };
        this.s.sent(offered, sent, idle);
        r
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.counted(cx, &[buf], |w, cx| w.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        self.counted(cx, &slices, |w, cx| w.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let mut answered = 0;
            this.parse.feed(&buf.filled()[before..], |t| answered += i64::from(t != SSH_FXP_VERSION));
            if answered > 0 {
                this.s.outstanding.fetch_sub(answered, Ordering::SeqCst);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn packet(t: u8, body: usize) -> Vec<u8> {
        let mut p = ((body + 1) as u32).to_be_bytes().to_vec();
        p.push(t);
        p.extend(std::iter::repeat_n(7u8, body));
        p
    }

    #[test]
    fn packets_are_found_across_any_split() {
        let stream: Vec<u8> = [packet(1, 4), packet(3, 0), packet(6, 300), packet(4, 9)].concat();
        for step in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut f = Framer::default();
            let mut types = Vec::new();
            for chunk in stream.chunks(step) {
                f.feed(chunk, |t| types.push(t));
            }
            assert_eq!(types, [1, 3, 6, 4], "split every {step} bytes");
        }
    }

    /// Requests written together are one round trip; a request written
    /// while another is awaited rides on it; one written after every
    /// answer came back is a new round trip.
    #[tokio::test]
    async fn a_round_trip_is_a_send_while_nothing_is_awaited() {
        let totals = Arc::new(Totals::default());
        let (client_w, mut server_r) = tokio::io::duplex(1 << 16);
        let (mut server_w, client_r) = tokio::io::duplex(1 << 16);
        let (mut w, mut r) = wrap(totals.clone(), client_w, client_r);
        let rts = || totals.round_trips.load(Ordering::Relaxed);
        let reqs = || totals.requests.load(Ordering::Relaxed);
        let mut sink = vec![0u8; 1 << 16];
        let mut buf = vec![0u8; 1 << 16];

        // The greeting is neither a request nor a round trip.
        w.write_all(&packet(SSH_FXP_INIT, 4)).await.unwrap();
        server_w.write_all(&packet(SSH_FXP_VERSION, 4)).await.unwrap();
        let _ = r.read(&mut buf).await.unwrap();
        assert_eq!((reqs(), rts()), (0, 0));

        // Three requests in one write: one round trip.
        w.write_all(&[packet(3, 10), packet(6, 20), packet(16, 30)].concat()).await.unwrap();
        assert_eq!((reqs(), rts()), (3, 1));
        // A fourth while they are awaited: no new round trip.
        w.write_all(&packet(5, 10)).await.unwrap();
        assert_eq!((reqs(), rts()), (4, 1));
        let _ = server_r.read(&mut sink).await.unwrap();
        // Answers to all four, split oddly.
        let answers: Vec<u8> = [packet(102, 8), packet(101, 20), packet(105, 40), packet(103, 100)].concat();
        for c in answers.chunks(13) {
            server_w.write_all(c).await.unwrap();
            let _ = r.read(&mut buf).await.unwrap();
        }
        // Nothing awaited now: the next request is a new round trip.
        w.write_all(&packet(4, 8)).await.unwrap();
        assert_eq!((reqs(), rts()), (5, 2));
    }
}
