//! Accepting TLS connections for tonic.
//!
//! Each accepted socket does its handshake in its own task (a slow or hostile client
//! cannot hold up the accept loop) with a deadline; the peer certificate is verified by
//! rustls and its workload identity parsed once per connection into [`PeerInfo`], which
//! tonic then puts into every request's extensions.

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

/// An established TLS connection with what we know of its peer.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// The peer's connection slot, given back when the connection is dropped.
    _slot: Slot,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TLS connections on `listener` until the returned stream is dropped (tonic
/// drops it when shutdown begins, which closes the listening socket). No limit on
/// connections per peer; see [`tls_incoming_limited`].
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    tls_incoming_limited(listener, tls, PeerSlots::new(usize::MAX, usize::MAX))
}

/// [`tls_incoming`] holding each connection, from accept to close, in a slot of
/// `connections`: a peer at its limit has new sockets closed at once, before any TLS
/// work.
pub fn tls_incoming_limited(
    listener: TcpListener,
    tls: Arc<ReloadingServerConfig>,
    connections: PeerSlots,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
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
            let config = tls.current();
            tokio::spawn(async move {
                match tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    handshake(socket, remote_addr, config, slot),
                )
                .await
                {
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
) -> io::Result<TlsConnection> {
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
    };
    Ok(TlsConnection {
        stream,
        peer,
        _slot: slot,
    })
}
