//! Bad input on the wire: a scripted libp2p peer (at the test's edge) sends a
//! running `cpushare-node` oversized messages, malformed messages and an unknown
//! protocol version. Each is rejected (the node drops that stream and counts
//! it); the node keeps serving valid requests on a new stream.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use cpushare_tests::swarm::{import, num, random_file, spawn};
use cpushare_tests::wait_until;
use futures::prelude::*;
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, Stream, StreamProtocol};

const V3: &str = "/cpushare/swarm/3";
/// What a node's reader sends back on a stream it reads.
const ACCEPT: u8 = 0xa5;

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Opens a fresh stream to the node and writes `bytes` on it.
async fn send(ctl: &mut libp2p_stream::Control, peer: PeerId, bytes: &[u8]) -> Result<Stream> {
    let mut s = ctl
        .open_stream(peer, StreamProtocol::new(V3))
        .await
        .context("opening a stream")?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .context("no accept byte in 10 s")??;
    assert_eq!(
        b[0], ACCEPT,
        "the node's reader answers a new stream with the accept byte"
    );
    s.write_all(bytes).await?;
    s.flush().await?;
    Ok(s)
}

/// Waits until the node has dropped our stream (a read ends or fails).
async fn dropped_by_node(mut s: Stream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
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

    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let mut ctl = swarm.behaviour().new_control();
    let mut replies = ctl.accept(StreamProtocol::new(V3))?;
    swarm.dial(addr)?;
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut up_tx = Some(up_tx);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => {
                    if let Some(tx) = up_tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    if let Some(tx) = up_tx.take() {
                        let _ = tx.send(Err(error.to_string()));
                    }
                }
                _ => {}
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(20), up_rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("cannot connect to the node: {e}"),
        _ => bail!("no connection to the node in 20 s"),
    }

    let mut get_manifest = vec![1u8];
    get_manifest.extend_from_slice(&image);
    get_manifest.push(0); // not waiting

    let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
    // a length prefix far beyond the limit: refused before it is read
    let mut oversized = (200u32 << 20).to_le_bytes().to_vec();
    oversized.extend_from_slice(&[3u8; 4096]);
    bad.push(("oversized length", oversized));
    // an oversized Have list inside a small frame
    let mut have = vec![6u8];
    have.extend_from_slice(&image);
    have.extend_from_slice(&u32::MAX.to_le_bytes());
    bad.push(("oversized have list", frame(&have)));
    // unknown message tag, truncated body, trailing garbage
    let mut unknown = vec![99u8];
    unknown.extend_from_slice(&image);
    bad.push(("unknown tag", frame(&unknown)));
    bad.push(("truncated", frame(&get_manifest[..10])));
    let mut trailing = get_manifest.clone();
    trailing.push(0);
    bad.push(("trailing bytes", frame(&trailing)));
    // a chunk for an index beyond the image
    let mut chunk = vec![8u8];
    chunk.extend_from_slice(&image);
    chunk.extend_from_slice(&u32::MAX.to_le_bytes());
    chunk.extend_from_slice(&[7u8; 100]);
    let st0 = node.proc.status()?;
    let before = num(&st0["p2p"]["rejected"], "bad_messages");
    for (what, bytes) in &bad {
        let s = send(&mut ctl, peer, bytes).await?;
        assert!(dropped_by_node(s).await, "{what}: the node kept the stream");
    }
    // well-formed but unasked for (a chunk of an image nobody fetches, at an
    // index beyond it): ignored, nothing stored, the node carries on
    send(&mut ctl, peer, &frame(&chunk)).await?;

    // another protocol version: negotiation fails cleanly
    match ctl
        .open_stream(peer, StreamProtocol::new("/cpushare/swarm/9"))
        .await
    {
        Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {}
        Err(e) => bail!("expected an unsupported-protocol error, got {e}"),
        Ok(_) => bail!("the node accepted an unknown protocol version"),
    }

    // and the node still serves a valid request on a new stream: a manifest
    // that verifies, on the node's own stream back to us
    let _s = send(&mut ctl, peer, &frame(&get_manifest)).await?;
    let reply = tokio::time::timeout(Duration::from_secs(20), async {
        let (_, mut s) = replies.next().await.context("no reply stream")?;
        // the node writes nothing until we say we read this stream
        s.write_all(&[ACCEPT]).await?;
        s.flush().await?;
        // a public image's grant (tag 13) comes first, for us to present elsewhere
        loop {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await?;
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut body).await?;
            if body.first() != Some(&13) {
                break anyhow::Ok(body);
            }
        }
    })
    .await;
    let r = match reply {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => bail!(
            "valid request failed after bad input: {e}\n{}",
            node.proc.log()
        ),
        Err(_) => bail!("no answer in 20 s after bad input\n{}", node.proc.log()),
    };
    assert_eq!(r[0], 2, "expected a Manifest reply");
    assert_eq!(&r[1..33], &image[..]);
    let m = chunks::SignedManifest::decode_for(chunks::ImageId(image), &r[33..])?;
    assert_eq!(m.image_id().to_hex(), id);

    // status is refreshed a few times a second
    let want = before + bad.len() as u64;
    let mut st = node.proc.status()?;
    wait_until(Duration::from_secs(5), || {
        st = node.proc.status().expect("status");
        num(&st["p2p"]["rejected"], "bad_messages") >= want
    });
    assert!(num(&st["p2p"]["rejected"], "bad_messages") >= want, "{st}");
    assert_eq!(st["store"], st0["store"], "bad input changed the store");
    Ok(())
}
