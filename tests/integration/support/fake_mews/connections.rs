//! The listener that keeps a duplicate handle on every accepted socket, so a
//! request handler can drop its connection without a response.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};

use super::state::Shared;

pub(super) struct FakeListener {
    pub(super) inner: TcpListener,
    pub(super) shared: Arc<Shared>,
}

/// Per-connection information handed to the handler: the peer address and a
/// duplicate of the socket, used to close the connection without a response.
#[derive(Clone, Debug)]
pub(super) struct ConnHandle {
    pub(super) remote: SocketAddr,
    socket: Option<Arc<std::net::TcpStream>>,
}

impl ConnHandle {
    /// Shuts the connection down in both directions: the client reads EOF
    /// before any response byte.
    pub(super) fn drop_connection(&self) {
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Writes bytes straight to the socket, bypassing hyper (which writes
    /// nothing until the handler returns).
    pub(super) fn write_raw(&self, bytes: &[u8]) {
        use std::io::Write;
        if let Some(socket) = &self.socket {
            // A few hundred bytes into an idle socket's buffer: not blocking.
            let _ = (&**socket).write_all(bytes);
        }
    }
}

/// Splits a stream into the stream served by hyper and a duplicate handle of
/// the same socket.
fn with_duplicate(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let duplicate = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, duplicate))
}

impl Listener for FakeListener {
    type Io = TcpStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (TcpStream, ConnHandle) {
        loop {
            match self.inner.accept().await {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    if let Ok((stream, duplicate)) = with_duplicate(stream) {
                        let socket = Arc::new(duplicate);
                        self.shared.register_connection(Arc::clone(&socket));
                        return (
                            stream,
                            ConnHandle {
                                remote,
                                socket: Some(socket),
                            },
                        );
                    }
                    // Could not duplicate: the stream is gone, accept again.
                }
                // E.g. too many open files: back off briefly, like axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<ConnHandle> {
        Ok(ConnHandle {
            remote: self.inner.local_addr()?,
            socket: None,
        })
    }
}

impl Connected<IncomingStream<'_, FakeListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, FakeListener>) -> Self {
        stream.remote_addr().clone()
    }
}
