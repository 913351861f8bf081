//! libp2p request-response codec: length-prefixed frames with hard size limits.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::prelude::*;
use libp2p::StreamProtocol;

use super::wire::{Request, Response, MAX_REQUEST, MAX_RESPONSE};

/// Counts the inbound messages it refused (libp2p drops those streams without
/// telling the behaviour, so the codec keeps the tally for `status`).
#[derive(Clone, Default)]
pub struct SwarmCodec {
    pub rejected: Arc<AtomicU64>,
}

impl SwarmCodec {
    fn reject(&self, e: io::Error) -> io::Error {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "rejected inbound message");
        e
    }
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        // refuse before allocating or reading: the stream is dropped
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    io.write_all(&(body.len() as u32).to_le_bytes()).await?;
    io.write_all(body).await?;
    io.flush().await
}

fn invalid(e: super::wire::WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[async_trait]
impl libp2p::request_response::Codec for SwarmCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let b = read_frame(io, MAX_REQUEST)
            .await
            .map_err(|e| self.reject(e))?;
        Request::decode(&b).map_err(|e| self.reject(invalid(e)))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let b = read_frame(io, MAX_RESPONSE).await?;
        Response::decode(&b).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.encode()).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res.encode()).await
    }
}
