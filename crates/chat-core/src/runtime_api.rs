//! The function's connection to the Lambda Runtime API, with Nagle's
//! algorithm off.
//!
//! A streamed response goes to the Runtime API as HTTP/1.1 chunks on a
//! connection `lambda_runtime` opens with hyper's `HttpConnector`, which
//! leaves Nagle's algorithm on and which the runtime offers no way to
//! configure. With Nagle on, a chunk written while the previous one is
//! not yet acknowledged waits for that ACK, and Linux delays the ACKs of
//! a connection used request/response-wise by up to 40 ms: a streamed
//! answer's first token came 42 ms late, and a JSON answer ended (so the
//! invocation, and its billed duration) 43 ms late. Measured against a
//! local Runtime API: BENCHMARKS.md ("Lambda's side of the stream").
//!
//! The socket is the runtime client's, so it is reached from outside:
//! found among the process's own descriptors (`/proc/self/fd`; its peer is
//! `AWS_LAMBDA_RUNTIME_API`), duplicated with `pidfd_getfd` (the
//! process's own descriptor; no unsafe code), and `TCP_NODELAY` is set on
//! the duplicate (the option belongs to the socket, which both
//! descriptors name). [`RuntimeSocket::ensure`] runs as each invocation
//! starts, before its response does: one `readlink` while the connection
//! is the one already set, a new search when the runtime has reconnected.
//! Where the system calls are refused (a kernel before 5.6, a seccomp
//! filter), or searches keep finding no connection to the endpoint, it
//! says so once and stays out of the way.

use std::net::SocketAddr;
use std::sync::Mutex;

/// What [`RuntimeSocket::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nodelay {
    /// The connection already had it (the same socket as last time).
    Kept,
    /// Set now on this many sockets (a new connection).
    Set(usize),
    /// No connection to the Runtime API was found.
    NotFound,
    /// Not possible here (see the log line); nothing more is tried.
    Off,
}

/// The Runtime API connection's socket, as last set.
pub struct RuntimeSocket {
    peer: Option<SocketAddr>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The descriptor set last and what it named (`socket:[inode]`).
    last: Option<(i32, std::path::PathBuf)>,
    /// Searches in a row that found no connection to the endpoint.
    empty: u8,
    off: bool,
}

/// After this many searches in a row find no connection to the Runtime
/// API (it is reached some other way), no more are made: each one reads
/// every descriptor of the process.
const EMPTY_SEARCHES: u8 = 3;

impl RuntimeSocket {
    /// For the Runtime API at `endpoint` (`AWS_LAMBDA_RUNTIME_API`, an
    /// `IP:port`; anything else turns this off).
    pub fn new(endpoint: &str) -> Self {
        let peer = endpoint.parse::<SocketAddr>().ok();
        if peer.is_none() {
            tracing::info!(
                endpoint,
                "the Runtime API is not at an IP address; its connection keeps Nagle's algorithm"
            );
        }
        Self {
            peer,
            state: Mutex::new(State {
                last: None,
                empty: 0,
                off: peer.is_none(),
            }),
        }
    }

    /// Makes sure the connection to the Runtime API has `TCP_NODELAY`.
    pub fn ensure(&self) -> Nodelay {
        let Ok(mut state) = self.state.lock() else {
            return Nodelay::Off;
        };
        let Some(peer) = self.peer.filter(|_| !state.off) else {
            return Nodelay::Off;
        };
        if let Some((fd, link)) = &state.last {
            if std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|l| &l == link) {
                return Nodelay::Kept;
            }
        }
        match set_on_peer(peer) {
            Ok(Some((n, last))) => {
                if state.last.is_none() {
                    tracing::info!(
                        runtime_api = %peer,
                        "Nagle's algorithm is off on the Runtime API connection"
                    );
                }
                state.last = Some(last);
                state.empty = 0;
                Nodelay::Set(n)
            }
            Ok(None) => {
                state.empty += 1;
                if state.empty < EMPTY_SEARCHES {
                    return Nodelay::NotFound;
                }
                state.off = true;
                tracing::warn!(
                    runtime_api = %peer,
                    "no connection to the Runtime API among this process's sockets; it keeps Nagle's algorithm"
                );
                Nodelay::Off
            }
            Err(e) => {
                state.off = true;
                tracing::warn!(
                    error = %e,
                    "cannot reach the Runtime API connection's socket; it keeps Nagle's algorithm (streamed events may be held up to 40 ms)"
                );
                Nodelay::Off
            }
        }
    }
}

/// Sets `TCP_NODELAY` on every socket of this process connected to
/// `peer`: how many, and the last one's descriptor and link.
#[cfg(target_os = "linux")]
fn set_on_peer(peer: SocketAddr) -> std::io::Result<Option<(usize, (i32, std::path::PathBuf))>> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    let mut found = None;
    let mut n = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !link.as_os_str().as_encoded_bytes().starts_with(b"socket:") {
            continue;
        }
        // Closed since the listing: skipped. Refused: the call is not
        // allowed here at all.
        let dup = match pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) {
            Ok(d) => d,
            Err(rustix::io::Errno::BADF) => continue,
            Err(e) => return Err(e.into()),
        };
        let Ok(Some(addr)) = rustix::net::getpeername(&dup) else {
            continue;
        };
        if SocketAddr::try_from(addr).ok() != Some(peer) {
            continue;
        }
        rustix::net::sockopt::set_tcp_nodelay(&dup, true)?;
        n += 1;
        found = Some((fd, link));
    }
    Ok(found.map(|f| (n, f)))
}

#[cfg(not(target_os = "linux"))]
fn set_on_peer(_: SocketAddr) -> std::io::Result<Option<(usize, (i32, std::path::PathBuf))>> {
    Err(std::io::Error::other("only on Linux"))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A connection of this process to a listener gets `TCP_NODELAY`, is
    /// then kept without a new search, and a new connection (the runtime
    /// reconnecting) is found and set again.
    #[test]
    fn the_connection_to_the_runtime_api_gets_nodelay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unrelated = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let first = std::net::TcpStream::connect(addr).unwrap();
        assert!(!first.nodelay().unwrap());
        let socket = RuntimeSocket::new(&addr.to_string());
        assert_eq!(socket.ensure(), Nodelay::Set(1));
        assert!(first.nodelay().unwrap());
        assert!(!unrelated.nodelay().unwrap(), "only the Runtime API's");
        assert_eq!(socket.ensure(), Nodelay::Kept);
        drop(first);
        let second = std::net::TcpStream::connect(addr).unwrap();
        assert!(!second.nodelay().unwrap());
        assert_eq!(socket.ensure(), Nodelay::Set(1));
        assert!(second.nodelay().unwrap());
        drop(second);
        assert_eq!(socket.ensure(), Nodelay::NotFound);
        // A connection found again starts the count over; only searches
        // in a row that find none turn it off.
        let third = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(socket.ensure(), Nodelay::Set(1));
        drop(third);
        assert_eq!(socket.ensure(), Nodelay::NotFound);
        assert_eq!(socket.ensure(), Nodelay::NotFound);
        assert_eq!(socket.ensure(), Nodelay::Off);
        assert_eq!(socket.ensure(), Nodelay::Off);
    }

    #[test]
    fn an_endpoint_that_is_not_an_address_turns_it_off() {
        let socket = RuntimeSocket::new("localhost:9001");
        assert_eq!(socket.ensure(), Nodelay::Off);
    }
}
