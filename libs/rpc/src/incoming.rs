//! Accepting connections for tonic: TLS, or plaintext from a mesh sidecar.
//!
//! Each accepted socket does its handshake in its own task (a slow or hostile client
//! cannot hold up the accept loop) with a deadline; the peer certificate is verified by
//! rustls and its workload identity parsed once per connection into [`PeerInfo`], which
//! tonic then puts into every request's extensions.
//!
//! In mesh mode ([`mesh_incoming_limited`]) there is no handshake: the sidecar did the
//! mTLS. The connection only records whether its peer is on loopback, i.e. may be the
//! sidecar; the caller's identity is per request (the sidecar multiplexes many callers
//! over one connection) and is read from the forwarded header by [`crate::mesh`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::identity::PeerInfo;
use crate::slots::{PeerSlots, Slot};
use crate::tls::{ReloadingServerConfig, certificate_serial, workload_identity};

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes finished but not yet picked up by the server.
const ACCEPT_BACKLOG: usize = 256;

/// An established connection with what we know of its peer.
#[derive(Debug)]
pub struct Connection {
    stream: Transport,
    peer: PeerInfo,
    /// The peer's connection slot, given back when the connection is dropped.
    _slot: Slot,
}

#[derive(Debug)]
enum Transport {
    Tls(Box<TlsStream<TcpStream>>),
    /// Mesh mode: the sidecar on loopback speaks plaintext HTTP/2.
    Plain(TcpStream),
}

/// Forwards a poll to whichever stream the connection has.
macro_rules! forward {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.stream {
            Transport::Tls($stream) => {
                let $stream = Pin::new(&mut **$stream);
                $call
            }
            Transport::Plain($stream) => {
                let $stream = Pin::new($stream);
                $call
            }
        }
    };
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        forward!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        forward!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        forward!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Transport::Tls(s) => s.is_write_vectored(),
            Transport::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, s => s.poll_shutdown(cx))
    }
}

/// Accepts TLS connections on `listener` until the returned stream is dropped (tonic
/// drops it when shutdown begins, which closes the listening socket). No limit on
/// connections per peer; see [`tls_incoming_limited`].
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
) -> ReceiverStream<Result<Connection, io::Error>> {
    tls_incoming_limited(listener, tls, PeerSlots::new(usize::MAX, usize::MAX))
}

/// [`tls_incoming`] holding each connection, from accept to close, in a slot of
/// `connections`: a peer at its limit has new sockets closed at once, before any TLS
/// work.
pub fn tls_incoming_limited(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
    connections: PeerSlots,
) -> ReceiverStream<Result<Connection, io::Error>> {
    accept_loop(listener, connections, move |socket, remote_addr, slot| {
        handshake(socket, remote_addr, tls.current(), slot)
    })
}

/// Mesh mode: accepts plaintext connections (the sidecar does the mTLS). A peer that is
/// not on loopback cannot be the sidecar: its connection is served, but nothing it
/// forwards is believed ([`PeerInfo::mesh_sidecar`] stays false).
pub fn mesh_incoming_limited(
    listener: TcpListener,
    connections: PeerSlots,
) -> ReceiverStream<Result<Connection, io::Error>> {
    accept_loop(
        listener,
        connections,
        |socket, remote_addr, slot| async move {
            socket.set_nodelay(true)?;
            Ok(Connection {
                stream: Transport::Plain(socket),
                peer: PeerInfo {
                    remote_addr: Some(remote_addr),
                    mesh_sidecar: remote_addr.ip().is_loopback(),
                    ..PeerInfo::default()
                },
                _slot: slot,
            })
        },
    )
}

/// Accepts sockets on `listener` until the returned stream is dropped, each set up by
/// `establish` in a task of its own with [`HANDSHAKE_TIMEOUT`].
fn accept_loop<F, Fut>(
    listener: TcpListener,
    connections: PeerSlots,
    establish: F,
) -> ReceiverStream<Result<Connection, io::Error>>
where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<Connection>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (socket, remote_addr) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = connections.try_acquire(Some(remote_addr.ip())) else {
                tracing::debug!(%remote_addr, "too many connections from this peer; closed");
                continue;
            };
            let tx = tx.clone();
            let established = establish(socket, remote_addr, slot);
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, established).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(err)) => tracing::debug!(%remote_addr, %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote_addr, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    socket: TcpStream,
    remote_addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    slot: Slot,
) -> io::Result<Connection> {
    socket.set_nodelay(true)?;
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(socket)
        .await?;
    let certs = stream.get_ref().1.peer_certificates();
    let leaf = certs.and_then(|c| c.first());
    let peer = PeerInfo {
        remote_addr: Some(remote_addr),
        client_certificate: leaf.is_some(),
        workload: leaf.and_then(workload_identity),
        certificate_serial: leaf.and_then(certificate_serial),
        mesh_sidecar: false,
    };
    Ok(Connection {
        stream: Transport::Tls(Box::new(stream)),
        peer,
        _slot: slot,
    })
}
