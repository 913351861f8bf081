//! Bad input on the wire: a scripted libp2p peer (at the test's edge) sends a
//! running `cpushare-node` oversized messages, malformed messages and an unknown
//! protocol version. Each is rejected; the node keeps serving valid requests.

use std::io;
use std::time::Duration;

use anyhow::{bail, Result};
use async_trait::async_trait;
use cpushare_tests::swarm::{import, num, random_file, spawn};
use futures::prelude::*;
use libp2p::request_response::{self, OutboundFailure, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};

/// Sends bytes exactly as given (so frames can lie about their length) and
/// reads the reply to its end.
#[derive(Clone, Default)]
struct RawCodec;

#[async_trait]
impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;
    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(64 << 20).read_to_end(&mut v).await?;
        if v.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"));
        }
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&r).await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&r).await
    }
}

#[derive(NetworkBehaviour)]
struct Raw {
    v1: request_response::Behaviour<RawCodec>,
    v9: request_response::Behaviour<RawCodec>,
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

type Outcome = std::result::Result<Vec<u8>, String>;

async fn ask(swarm: &mut libp2p::Swarm<Raw>, peer: PeerId, v9: bool, bytes: Vec<u8>) -> Outcome {
    let want = if v9 {
        swarm.behaviour_mut().v9.send_request(&peer, bytes)
    } else {
        swarm.behaviour_mut().v1.send_request(&peer, bytes)
    };
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Err("no answer in 20 s".into()),
            ev = swarm.select_next_some() => {
                let ev = match ev {
                    SwarmEvent::Behaviour(RawEvent::V1(e)) | SwarmEvent::Behaviour(RawEvent::V9(e)) => e,
                    _ => continue,
                };
                match ev {
                    request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response }, ..
                    } if request_id == want => return Ok(response),
                    request_response::Event::OutboundFailure { request_id, error, .. } if request_id == want => {
                        return Err(match error {
                            OutboundFailure::UnsupportedProtocols => "unsupported protocol".to_string(),
                            e => e.to_string(),
                        })
                    }
                    _ => {}
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_rejects_oversized_malformed_and_unknown_versions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = spawn(&dir.path().join("buyer"), "buyer", &[], &[])?;
    let file = dir.path().join("img.raw");
    random_file(&file, 1 << 20, 9)?;
    let id = import(&node, &file)?;
    let image: [u8; 32] = hex::decode(&id)?.try_into().expect("32 bytes");
    let peer: PeerId = node.proc.peer_id.parse()?;
    let addr: Multiaddr = node.addr.parse()?;

    let cfg = || request_response::Config::default().with_request_timeout(Duration::from_secs(15));
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| Raw {
            v1: request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new("/cpushare/swarm/1"),
                    ProtocolSupport::Outbound,
                )],
                cfg(),
            ),
            v9: request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new("/cpushare/swarm/9"),
                    ProtocolSupport::Outbound,
                )],
                cfg(),
            ),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.add_peer_address(peer, addr);

    let mut get_manifest = vec![1u8];
    get_manifest.extend_from_slice(&image);

    // a length prefix far beyond the limit: refused before it is read
    let mut oversized = (200u32 << 20).to_le_bytes().to_vec();
    oversized.extend_from_slice(&[3u8; 4096]);
    let r = ask(&mut swarm, peer, false, oversized).await;
    assert!(r.is_err(), "oversized request answered: {r:?}");

    // an oversized Have list inside a small frame
    let mut have = vec![3u8];
    have.extend_from_slice(&image);
    have.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(ask(&mut swarm, peer, false, frame(&have)).await.is_err());

    // unknown message tag, truncated body, trailing garbage
    assert!(ask(&mut swarm, peer, false, frame(&[99])).await.is_err());
    assert!(ask(&mut swarm, peer, false, frame(&get_manifest[..10]))
        .await
        .is_err());
    let mut trailing = get_manifest.clone();
    trailing.push(0);
    assert!(ask(&mut swarm, peer, false, frame(&trailing))
        .await
        .is_err());

    // another protocol version: negotiation fails cleanly
    let r = ask(&mut swarm, peer, true, frame(&get_manifest)).await;
    assert_eq!(r, Err("unsupported protocol".to_string()));

    // and the node still serves a valid request: a manifest that verifies
    let r = match ask(&mut swarm, peer, false, frame(&get_manifest)).await {
        Ok(r) => r,
        Err(e) => bail!(
            "valid request failed after bad input: {e}\n{}",
            node.proc.log()
        ),
    };
    assert_eq!(r[4], 1, "expected a Manifest reply");
    let m = chunks::SignedManifest::decode_for(chunks::ImageId(image), &r[5..])?;
    assert_eq!(m.image_id().to_hex(), id);

    // status is refreshed a few times a second
    let mut st = node.proc.status()?;
    for _ in 0..50 {
        if num(&st["p2p"]["rejected"], "bad_messages") >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        st = node.proc.status()?;
    }
    assert!(num(&st["p2p"]["rejected"], "bad_messages") >= 4, "{st}");
    Ok(())
}
