//! A TCP proxy on loopback that adds a fixed delay in each direction: a
//! "host" far away. Every chunk read from one side is stamped with the time
//! it arrived and written to the other side at that time plus the delay, in
//! order. Reading never waits for writing, so the delay adds latency
//! without limiting throughput (a bandwidth-delay product is simply in
//! flight inside the proxy).

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A listening proxy to one upstream address. Dropping it stops accepting
/// and closes every connection it carries.
pub struct LatencyProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl LatencyProxy {
    /// Listen on 127.0.0.1 (an ephemeral port) and forward each connection
    /// to `upstream`, delaying every chunk by `one_way` in each direction
    /// (a round trip gains twice that).
    pub fn start(upstream: SocketAddr, one_way: Duration) -> LatencyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("testbed: bind the latency proxy");
        let addr = listener.local_addr().expect("testbed: proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let acceptor = thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                for s in [&client, &server] {
                    let _ = s.set_nodelay(true);
                    if let Ok(c) = s.try_clone() {
                        conns2.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                    }
                }
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
                pipe(client, s2, one_way);
                pipe(server, c2, one_way);
            }
        });
        LatencyProxy { addr, stop, conns, acceptor: Some(acceptor) }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Copy `from` to `to`, each chunk released `delay` after it was read: a
/// reader thread stamps chunks, a writer thread sleeps until each one is
/// due. End of stream is passed on (as a half close) when it is due.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now() + delay, None));
                    return;
                }
                Ok(n) => {
                    if tx.send((Instant::now() + delay, Some(buf[..n].to_vec()))).is_err() {
                        return;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        while let Ok((due, chunk)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).is_err() {
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    });
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback: what it reads, it writes back.
    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    #[test]
    fn a_round_trip_takes_twice_the_delay_and_bytes_arrive_intact_in_order() {
        let delay = Duration::from_millis(40);
        let proxy = LatencyProxy::start(echo_server(), delay);
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

        // One small round trip: no earlier than two delays.
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        let rtt = t.elapsed();
        assert_eq!(&got, b"ping");
        assert!(rtt >= 2 * delay, "a round trip took {rtt:?}, less than twice the {delay:?} delay");

        // 4 MiB in many writes, a counter pattern whose every position is
        // distinct modulo 251: a reordered, lost or doubled chunk shows.
        let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = thread::spawn(move || {
            for chunk in sent.chunks(1000) {
                w.write_all(chunk).unwrap();
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), data.len(), "every byte came back");
        let first_bad = back.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "the bytes came back intact and in order");
    }
}
